-- Every status report a device sent, in the device's own order (seq), so an operator sees
-- what happened while it was offline. Bounded per device by the store (newest kept).
CREATE TABLE device_status_log (
  device_id    TEXT NOT NULL REFERENCES devices (id) ON DELETE CASCADE,
  seq          INTEGER NOT NULL,
  received_at  INTEGER NOT NULL,
  status_json  TEXT NOT NULL,
  PRIMARY KEY (device_id, seq)
) WITHOUT ROWID;

-- The seq of the report in devices.status_json: a late, older report never replaces it.
ALTER TABLE devices ADD COLUMN status_seq INTEGER NOT NULL DEFAULT 0;
