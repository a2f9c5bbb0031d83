-- Initial schema of the control plane's store, PostgreSQL variant of ../0001_init.sql (same
-- tables, columns and meaning; only the SQL dialect differs).
--
-- Runs inside one transaction opened by the migration runner, which also records the version
-- in schema_migrations: no BEGIN/COMMIT here. Differences from SQLite, everywhere below:
-- integers are BIGINT (times are Unix milliseconds), REAL is DOUBLE PRECISION, BLOB is BYTEA,
-- and identifier columns that queries sort by are COLLATE "C", so that ORDER BY gives SQLite's
-- byte order whatever the database's default collation is.

CREATE TABLE operator_tokens (
  id          TEXT COLLATE "C" PRIMARY KEY,
  token_hash  TEXT NOT NULL UNIQUE,
  role        TEXT NOT NULL,
  name        TEXT COLLATE "C" NOT NULL,
  created_at  BIGINT NOT NULL
);

CREATE TABLE enrollment_tokens (
  id           TEXT COLLATE "C" PRIMARY KEY,
  token_hash   TEXT NOT NULL UNIQUE,
  site         TEXT NOT NULL,
  labels_json  TEXT NOT NULL DEFAULT '{}',
  uses_left    BIGINT,  -- NULL: unlimited
  expires_at   BIGINT,  -- NULL: never
  created_at   BIGINT NOT NULL,
  created_by   TEXT NOT NULL
);

CREATE TABLE devices (
  id               TEXT COLLATE "C" PRIMARY KEY,
  site             TEXT COLLATE "C" NOT NULL,
  labels_json      TEXT NOT NULL DEFAULT '{}',
  facts_json       TEXT NOT NULL DEFAULT '{}',
  public_key       TEXT NOT NULL,
  credential_hash  TEXT NOT NULL,
  enrolled_at      BIGINT NOT NULL,
  last_seen        BIGINT NOT NULL DEFAULT 0,
  generation       BIGINT NOT NULL DEFAULT 0,
  desired_json     TEXT NOT NULL DEFAULT '{}',
  desired_hash     TEXT NOT NULL DEFAULT '',
  status_json      TEXT NOT NULL DEFAULT '{}',
  status_at        BIGINT NOT NULL DEFAULT 0,
  schedule_json    TEXT NOT NULL DEFAULT '{}',
  cordoned         BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE INDEX devices_by_site ON devices (site);

-- Blob metadata; the blobs themselves live on disk under their digest.
CREATE TABLE artifacts (
  digest      TEXT COLLATE "C" PRIMARY KEY,  -- "sha256:<hex>"
  size        BIGINT NOT NULL,
  media_type  TEXT NOT NULL,
  created_at  BIGINT NOT NULL
);

-- Model versions are immutable once written (content_hash guards re-pushes). `ord` stands in
-- for SQLite's rowid: versions pushed in the same millisecond list in the order they came.
CREATE TABLE model_versions (
  model         TEXT COLLATE "C" NOT NULL,
  version       TEXT COLLATE "C" NOT NULL,
  content_hash  TEXT NOT NULL,
  created_at    BIGINT NOT NULL,
  ord           BIGINT GENERATED ALWAYS AS IDENTITY,
  PRIMARY KEY (model, version)
);

-- Variants keep their order (idx) because selection takes the first that fits a device.
-- artifact_digest is deliberately not a foreign key (see ../0001_init.sql).
CREATE TABLE model_variants (
  model            TEXT COLLATE "C" NOT NULL,
  version          TEXT COLLATE "C" NOT NULL,
  idx              BIGINT NOT NULL,
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
  name           TEXT COLLATE "C" PRIMARY KEY,
  revision       BIGINT NOT NULL CHECK (revision >= 1),
  manifest_json  TEXT NOT NULL,
  spec_hash      TEXT NOT NULL,
  created_at     BIGINT NOT NULL,
  updated_at     BIGINT NOT NULL
);

-- History of every revision ever applied; no foreign key to deployments (revisions outlive a
-- deleted deployment, and a re-created name never reuses a revision number).
CREATE TABLE deployment_revisions (
  name           TEXT COLLATE "C" NOT NULL,
  revision       BIGINT NOT NULL,
  manifest_json  TEXT NOT NULL,
  spec_hash      TEXT NOT NULL,
  created_at     BIGINT NOT NULL,
  created_by     TEXT NOT NULL,
  PRIMARY KEY (name, revision)
);

-- Append-only, hash-chained: hash covers the entry and prev_hash (see audit_entry_hash()).
-- seq is assigned by the store (head + 1, under a table lock), not by a sequence: a sequence
-- would leave gaps where a transaction rolled back.
CREATE TABLE audit_log (
  seq           BIGINT PRIMARY KEY,
  time          BIGINT NOT NULL,
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
CREATE FUNCTION audit_log_refuse_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION 'audit_log entries cannot be modified';
END
$$;
CREATE TRIGGER audit_log_is_append_only BEFORE UPDATE ON audit_log
  FOR EACH ROW EXECUTE FUNCTION audit_log_refuse_update();
