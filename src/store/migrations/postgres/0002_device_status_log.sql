-- PostgreSQL variant of ../0002_device_status_log.sql: every status report a device sent, in
-- the device's own order (seq), bounded per device by the store (newest kept).
CREATE TABLE device_status_log (
  device_id    TEXT COLLATE "C" NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
  seq          BIGINT NOT NULL,
  received_at  BIGINT NOT NULL,
  status_json  TEXT NOT NULL,
  PRIMARY KEY (device_id, seq)
);

-- The seq of the report in devices.status_json: a late, older report never replaces it.
ALTER TABLE devices ADD COLUMN status_seq BIGINT NOT NULL DEFAULT 0;
