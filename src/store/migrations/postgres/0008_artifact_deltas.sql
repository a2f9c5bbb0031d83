-- PostgreSQL variant of ../0008_artifact_deltas.sql: zstd patch-from deltas between blobs, and
-- the pairs for which none was kept (and why).
CREATE TABLE artifact_deltas (
  target TEXT COLLATE "C" NOT NULL,
  base TEXT COLLATE "C" NOT NULL,
  delta TEXT NOT NULL DEFAULT '',
  delta_size BIGINT NOT NULL DEFAULT 0,
  target_size BIGINT NOT NULL DEFAULT 0,
  state TEXT NOT NULL,
  detail TEXT NOT NULL DEFAULT '',
  created_at BIGINT NOT NULL,
  PRIMARY KEY (target, base)
);
