-- PostgreSQL variant of ../0005_device_revocation.sql: when a device's credential was revoked
-- (0 = not revoked).
ALTER TABLE devices ADD COLUMN revoked_at BIGINT NOT NULL DEFAULT 0;
