-- Named operator users (issue 17): each operator token is one user, with a role, the sites it
-- is scoped to, and when it was revoked. A revoked token is refused on every call; the row
-- stays so the name, which the audit log records as the actor, is never reused.

-- JSON array of site glob patterns (fnmatch, as deployment selectors use them); [] = every site.
ALTER TABLE operator_tokens ADD COLUMN sites_json TEXT NOT NULL DEFAULT '[]';
-- When `outpost user revoke` refused the token (0 = not revoked).
ALTER TABLE operator_tokens ADD COLUMN revoked_at INTEGER NOT NULL DEFAULT 0;
-- The user name is the audit actor (user:NAME): one row per name.
CREATE UNIQUE INDEX operator_tokens_by_name ON operator_tokens (name);
