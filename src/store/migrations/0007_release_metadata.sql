-- Signed release metadata (issue 17): every root version ever accepted (devices walk the chain
-- from the one they trust), and each version of the targets and timestamp documents the server
-- signed. Versions only grow; the newest of each role is what devices are served.
CREATE TABLE release_metadata (
  role TEXT NOT NULL,          -- 'root' | 'targets' | 'timestamp'
  version INTEGER NOT NULL,
  body TEXT NOT NULL,          -- the signed document, byte for byte as served
  created_at INTEGER NOT NULL,
  PRIMARY KEY (role, version)
);
