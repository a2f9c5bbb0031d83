-- PostgreSQL variant of ../0007_release_metadata.sql: every signed release metadata version.
CREATE TABLE release_metadata (
  role TEXT NOT NULL,          -- 'root' | 'targets' | 'timestamp'
  version BIGINT NOT NULL,
  body TEXT NOT NULL,          -- the signed document, byte for byte as served
  created_at BIGINT NOT NULL,
  PRIMARY KEY (role, version)
);
