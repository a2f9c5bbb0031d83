-- Delta updates (issue 18): for a blob (a model variant, an app bundle) and one of the earlier
-- versions it replaces, the zstd patch-from delta that turns the base into it, itself stored as
-- an artifact. 'skipped' rows record why none was kept (not smaller enough, too large, failed),
-- so the server does not make the same delta again at every start.
CREATE TABLE artifact_deltas (
  target TEXT NOT NULL,            -- digest the delta rebuilds
  base TEXT NOT NULL,              -- digest the device must hold
  delta TEXT NOT NULL DEFAULT '',  -- digest of the delta artifact ('' unless state = 'ready')
  delta_size INTEGER NOT NULL DEFAULT 0,
  target_size INTEGER NOT NULL DEFAULT 0,
  state TEXT NOT NULL,             -- 'ready' | 'skipped'
  detail TEXT NOT NULL DEFAULT '', -- why it was skipped; how it was made
  created_at INTEGER NOT NULL,
  PRIMARY KEY (target, base)
);
