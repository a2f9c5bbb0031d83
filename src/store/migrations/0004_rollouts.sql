-- Staged rollouts (src/server/rollouts/): which revision each device runs while a new one
-- moves wave by wave, the rollouts themselves, revisions marked bad, and sites (time zones
-- for maintenance windows).

-- The revision devices without an assignment run. A new deployment starts at its first
-- revision; an update leaves it where it is until its rollout completes.
ALTER TABLE deployments ADD COLUMN stable_revision INTEGER NOT NULL DEFAULT 0;
UPDATE deployments SET stable_revision = revision;

-- Why a revision was rolled back ('' = not bad). An apply of the same spec is refused.
ALTER TABLE deployment_revisions ADD COLUMN bad_reason TEXT NOT NULL DEFAULT '';

-- A device held at (or moved to) another revision than the deployment's stable one.
CREATE TABLE revision_assignments (
  deployment  TEXT NOT NULL,
  device_id   TEXT NOT NULL,
  revision    INTEGER NOT NULL,
  PRIMARY KEY (deployment, device_id)
) WITHOUT ROWID;

-- doc_json is the controller's plan and progress (device order, waves, times, gate values,
-- history); the store does not interpret it.
CREATE TABLE rollouts (
  id             INTEGER PRIMARY KEY,
  deployment     TEXT NOT NULL,
  from_revision  INTEGER NOT NULL,
  to_revision    INTEGER NOT NULL,
  state          TEXT NOT NULL
                 CHECK (state IN ('running', 'paused', 'completed', 'rolled_back', 'aborted',
                                  'superseded')),
  doc_json       TEXT NOT NULL DEFAULT '{}',
  created_at     INTEGER NOT NULL,
  updated_at     INTEGER NOT NULL,
  created_by     TEXT NOT NULL
);
CREATE INDEX rollouts_by_deployment ON rollouts (deployment, id);
CREATE INDEX rollouts_active ON rollouts (state) WHERE state IN ('running', 'paused');

CREATE TABLE sites (
  name        TEXT PRIMARY KEY,
  timezone    TEXT NOT NULL DEFAULT 'UTC',
  region      TEXT NOT NULL DEFAULT '',
  updated_at  INTEGER NOT NULL
);
