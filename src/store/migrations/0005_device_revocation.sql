-- `outpost device revoke`: when a device's credential was revoked (0 = not revoked). A revoked
-- device is refused on every call; the row stays for its history and audit.
ALTER TABLE devices ADD COLUMN revoked_at INTEGER NOT NULL DEFAULT 0;
