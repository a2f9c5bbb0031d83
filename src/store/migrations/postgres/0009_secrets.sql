-- PostgreSQL variant of ../0009_secrets.sql: named secrets and the versions still of use; the
-- ciphertext is sealed by the server and opaque here.
CREATE TABLE secrets (
  name TEXT COLLATE "C" PRIMARY KEY,
  created_at BIGINT NOT NULL,
  updated_at BIGINT NOT NULL
);
CREATE TABLE secret_versions (
  name TEXT COLLATE "C" NOT NULL REFERENCES secrets (name) ON DELETE CASCADE,
  version BIGINT NOT NULL,
  keys_json TEXT NOT NULL,
  ciphertext TEXT NOT NULL,
  activate_at BIGINT NOT NULL,
  created_at BIGINT NOT NULL,
  created_by TEXT NOT NULL,
  PRIMARY KEY (name, version)
);
