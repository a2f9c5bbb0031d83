-- Initial schema of the control plane's store.
--
-- Runs inside one transaction opened by the migration runner, which also records the
-- version in schema_migrations: no BEGIN/COMMIT here, and no PRAGMA (foreign_keys and
-- journal_mode cannot change inside a transaction; the backend sets them at open).
-- Times are Unix milliseconds (UTC). *_json columns hold JSON text the store does not parse,
-- except labels_json (an object of strings, filtered on by list_devices).

CREATE TABLE operator_tokens (
  id          TEXT PRIMARY KEY,
  token_hash  TEXT NOT NULL UNIQUE,
  role        TEXT NOT NULL,
  name        TEXT NOT NULL,
  created_at  INTEGER NOT NULL
);

CREATE TABLE enrollment_tokens (
  id           TEXT PRIMARY KEY,
  token_hash   TEXT NOT NULL UNIQUE,
  site         TEXT NOT NULL,
  labels_json  TEXT NOT NULL DEFAULT '{}',
  uses_left    INTEGER,  -- NULL: unlimited
  expires_at   INTEGER,  -- NULL: never
  created_at   INTEGER NOT NULL,
  created_by   TEXT NOT NULL
);

CREATE TABLE devices (
  id               TEXT PRIMARY KEY,
  site             TEXT NOT NULL,
  labels_json      TEXT NOT NULL DEFAULT '{}',
  facts_json       TEXT NOT NULL DEFAULT '{}',
  public_key       TEXT NOT NULL,
  credential_hash  TEXT NOT NULL,
  enrolled_at      INTEGER NOT NULL,
  last_seen        INTEGER NOT NULL DEFAULT 0,
  generation       INTEGER NOT NULL DEFAULT 0,
  desired_json     TEXT NOT NULL DEFAULT '{}',
  desired_hash     TEXT NOT NULL DEFAULT '',
  status_json      TEXT NOT NULL DEFAULT '{}',
  status_at        INTEGER NOT NULL DEFAULT 0,
  schedule_json    TEXT NOT NULL DEFAULT '{}',
  cordoned         INTEGER NOT NULL DEFAULT 0 CHECK (cordoned IN (0, 1))
);
CREATE INDEX devices_by_site ON devices (site);

-- Blob metadata; the blobs themselves live on disk under their digest.
CREATE TABLE artifacts (
  digest      TEXT PRIMARY KEY,  -- "sha256:<hex>"
  size        INTEGER NOT NULL,
  media_type  TEXT NOT NULL,
  created_at  INTEGER NOT NULL
);

-- Model versions are immutable once written (content_hash guards re-pushes).
CREATE TABLE model_versions (
  model         TEXT NOT NULL,
  version       TEXT NOT NULL,
  content_hash  TEXT NOT NULL,
  created_at    INTEGER NOT NULL,
  PRIMARY KEY (model, version)
);

-- Variants keep their order (idx) because selection takes the first that fits a device.
-- artifact_digest is deliberately not a foreign key: the registry decides whether blobs must
-- be uploaded first, and artifact garbage collection looks variants up by digest instead.
CREATE TABLE model_variants (
  model            TEXT NOT NULL,
  version          TEXT NOT NULL,
  idx              INTEGER NOT NULL,
  selector_json    TEXT NOT NULL DEFAULT '{}',
  needs_json       TEXT NOT NULL DEFAULT '{}',
  artifact_digest  TEXT NOT NULL,
  format           TEXT NOT NULL,
  metadata_json    TEXT NOT NULL DEFAULT '{}',
  PRIMARY KEY (model, version, idx),
  FOREIGN KEY (model, version) REFERENCES model_versions (model, version) ON DELETE CASCADE
);
CREATE INDEX model_variants_by_artifact ON model_variants (artifact_digest);

CREATE TABLE deployments (
  name           TEXT PRIMARY KEY,
  revision       INTEGER NOT NULL CHECK (revision >= 1),
  manifest_json  TEXT NOT NULL,
  spec_hash      TEXT NOT NULL,
  created_at     INTEGER NOT NULL,
  updated_at     INTEGER NOT NULL
);

-- History of every revision ever applied. No foreign key to deployments: revisions outlive
-- a deleted deployment (for audit, and so a re-created name never reuses a revision number).
CREATE TABLE deployment_revisions (
  name           TEXT NOT NULL,
  revision       INTEGER NOT NULL,
  manifest_json  TEXT NOT NULL,
  spec_hash      TEXT NOT NULL,
  created_at     INTEGER NOT NULL,
  created_by     TEXT NOT NULL,
  PRIMARY KEY (name, revision)
);

-- Append-only, hash-chained: hash covers the entry and prev_hash (see audit_entry_hash()).
CREATE TABLE audit_log (
  seq           INTEGER PRIMARY KEY,
  time          INTEGER NOT NULL,
  actor         TEXT NOT NULL,
  action        TEXT NOT NULL,
  target        TEXT NOT NULL,
  details_json  TEXT NOT NULL DEFAULT '{}',
  prev_hash     TEXT NOT NULL,
  hash          TEXT NOT NULL
);
CREATE INDEX audit_log_by_time ON audit_log (time);

-- Entries never change once written; a later retention feature may delete old ones (and
-- record the new chain start), which is why only UPDATE is refused.
CREATE TRIGGER audit_log_is_append_only BEFORE UPDATE ON audit_log
BEGIN
  SELECT RAISE(ABORT, 'audit_log entries cannot be modified');
END;
