-- Secrets (issue 18): named sets of key/value pairs, delivered sealed to each device whose
-- deployments name them. Values never reach the store in plaintext: `ciphertext` is sealed by
-- the server (XChaCha20-Poly1305 under the master key in DATA/secrets.key, with the secret's name
-- and version as associated data), so a copy of the database alone reveals names, key names and
-- times, nothing else.
CREATE TABLE secrets (
  name TEXT PRIMARY KEY,
  created_at INTEGER NOT NULL,
  updated_at INTEGER NOT NULL
);
-- Every version still of use: the one active now and any staged after it (activate_at in the
-- future: `secret update --rotate-at`). Older ones are deleted when a newer version is added.
CREATE TABLE secret_versions (
  name TEXT NOT NULL REFERENCES secrets (name) ON DELETE CASCADE,
  version INTEGER NOT NULL,        -- 1, 2, 3...
  keys_json TEXT NOT NULL,         -- JSON array of the key names, sorted (metadata only)
  ciphertext TEXT NOT NULL,        -- base64 of nonce || XChaCha20-Poly1305 ciphertext || tag
  activate_at INTEGER NOT NULL,    -- when devices switch to it (ms); its creation time if at once
  created_at INTEGER NOT NULL,
  created_by TEXT NOT NULL,
  PRIMARY KEY (name, version)
);
