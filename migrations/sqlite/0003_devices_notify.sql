-- Devices that completed a sign-in, mail waiting to be sent, and "this wasn't me" links.
ALTER TABLE users ADD COLUMN locked BIGINT NOT NULL DEFAULT 0;

CREATE TABLE devices (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    -- SHA-256 of the device cookie (256 random bits); the cookie itself is never stored.
    token_hash TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    user_agent TEXT NOT NULL,
    binding TEXT NOT NULL,
    status TEXT NOT NULL,
    first_seen BIGINT NOT NULL,
    last_seen BIGINT NOT NULL,
    last_ip TEXT NOT NULL
);
CREATE INDEX devices_by_user ON devices (user_id);

CREATE TABLE mail_queue (
    id TEXT PRIMARY KEY,
    to_addr TEXT NOT NULL,
    subject TEXT NOT NULL,
    body TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    attempts BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    sent_at BIGINT,
    last_error TEXT
);
CREATE INDEX mail_queue_due ON mail_queue (sent_at, next_attempt_at);

CREATE TABLE report_links (
    -- SHA-256 of the link token (256 random bits).
    token_hash TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    device_id TEXT,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    used_at BIGINT
);
