-- PostgreSQL variant of ../0006_operator_users.sql: named operator users with site scopes and
-- revocation; the name (the audit actor) is unique and never reused.
ALTER TABLE operator_tokens ADD COLUMN sites_json TEXT NOT NULL DEFAULT '[]';
ALTER TABLE operator_tokens ADD COLUMN revoked_at BIGINT NOT NULL DEFAULT 0;
CREATE UNIQUE INDEX operator_tokens_by_name ON operator_tokens (name);
