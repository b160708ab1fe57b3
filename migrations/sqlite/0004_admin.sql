-- One-time enrolment links: an admin (or `portcullis admin bootstrap`) lets one user set a
-- password and register their own second factor without anyone else handling the secret.
CREATE TABLE enrolment_links (
    -- SHA-256 of the link token (256 random bits); the token itself is never stored.
    token_hash TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    -- Who issued it: `cli:<os user>` or an admin's email.
    created_by TEXT NOT NULL,
    -- 1 when only a security key may be registered through it (admins).
    key_only BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    used_at BIGINT
);
CREATE INDEX enrolment_links_by_user ON enrolment_links (user_id);
CREATE INDEX audit_events_at ON audit_events (at);
CREATE INDEX audit_events_account ON audit_events (account_id, id);
