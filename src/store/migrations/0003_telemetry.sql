-- Telemetry (issue 5): series, raw points, hourly rollups, events, per-device ingest state
-- and fleet running totals. Histogram buckets are BLOBs of (float64 le, uint64 count) pairs,
-- little-endian, le ascending, +infinity for the open bucket.

-- One row per distinct label set; points refer to it by id (ids are cached by the server).
CREATE TABLE telemetry_series (
  id INTEGER PRIMARY KEY,
  device_id TEXT NOT NULL,
  site TEXT NOT NULL,
  metric TEXT NOT NULL,
  deployment TEXT NOT NULL,
  revision INTEGER NOT NULL,
  model TEXT NOT NULL,
  version TEXT NOT NULL,
  role TEXT NOT NULL,
  detail TEXT NOT NULL,
  UNIQUE (device_id, metric, site, deployment, revision, model, version, role, detail)
);
CREATE INDEX telemetry_series_by_metric ON telemetry_series (metric);

-- A point: one value of one series at one time (histograms: value = count, plus sum and
-- buckets). The hour (time / 3600000) leads the key: inserts touch only the current hours,
-- rolling up an hour reads one contiguous range grouped by series, and retention deletes a
-- prefix. seq (the device's record seq) keeps two samples of one millisecond apart.
CREATE TABLE telemetry_points (
  hour INTEGER NOT NULL,
  series_id INTEGER NOT NULL,
  time INTEGER NOT NULL,
  seq INTEGER NOT NULL,
  value REAL NOT NULL,
  sum REAL,
  buckets BLOB,
  PRIMARY KEY (hour, series_id, time, seq)
) WITHOUT ROWID;

-- One hour of one series: counters sum, gauges avg (value_sum / points) / min / max / last,
-- histograms merged (value_sum = observations, hist_sum, buckets).
CREATE TABLE telemetry_rollups (
  hour INTEGER NOT NULL,
  series_id INTEGER NOT NULL,
  points INTEGER NOT NULL,
  value_sum REAL NOT NULL,
  value_min REAL NOT NULL,
  value_max REAL NOT NULL,
  last_time INTEGER NOT NULL,
  last_value REAL NOT NULL,
  hist_sum REAL,
  buckets BLOB,
  PRIMARY KEY (hour, series_id)
) WITHOUT ROWID;

CREATE TABLE telemetry_events (
  device_id TEXT NOT NULL,
  seq INTEGER NOT NULL,
  time INTEGER NOT NULL,
  deployment TEXT NOT NULL,
  revision INTEGER NOT NULL,
  event TEXT NOT NULL,
  message TEXT NOT NULL,
  PRIMARY KEY (device_id, seq)
) WITHOUT ROWID;
CREATE INDEX telemetry_events_by_time ON telemetry_events (time);

-- acked_seq is the exactly-once watermark: records at or below it are duplicates.
CREATE TABLE telemetry_devices (
  device_id TEXT PRIMARY KEY,
  acked_seq INTEGER NOT NULL,
  dropped_samples INTEGER NOT NULL,
  dropped_health INTEGER NOT NULL,
  dropped_aggregates INTEGER NOT NULL,
  dropped_events INTEGER NOT NULL,
  last_ingest_at INTEGER NOT NULL,
  last_health_at INTEGER NOT NULL,
  sync_lag_s REAL,
  batches INTEGER NOT NULL,
  records INTEGER NOT NULL
) WITHOUT ROWID;

-- Fleet running totals, updated in the ingest transaction; never expire.
CREATE TABLE telemetry_totals (
  deployment TEXT NOT NULL,
  model TEXT NOT NULL,
  version TEXT NOT NULL,
  role TEXT NOT NULL,
  requests INTEGER NOT NULL,
  served INTEGER NOT NULL,
  errors INTEGER NOT NULL,
  invalid INTEGER NOT NULL,
  fallbacks INTEGER NOT NULL,
  latency_count INTEGER NOT NULL,
  latency_sum REAL NOT NULL,
  latency_buckets BLOB NOT NULL,
  confidence_count INTEGER NOT NULL,
  confidence_sum REAL NOT NULL,
  confidence_buckets BLOB NOT NULL,
  PRIMARY KEY (deployment, model, version, role)
) WITHOUT ROWID;

-- rolled_up_hour: hours below it are in telemetry_rollups. raw_from_hour: raw points of
-- hours below it were deleted (queries read rollups there).
CREATE TABLE telemetry_state (
  id INTEGER PRIMARY KEY CHECK (id = 1),
  rolled_up_hour INTEGER NOT NULL,
  raw_from_hour INTEGER NOT NULL
);
INSERT INTO telemetry_state (id, rolled_up_hour, raw_from_hour) VALUES (1, 0, 0);
