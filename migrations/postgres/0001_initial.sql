-- Users, second factors, signing keys and the audit trail.
CREATE TABLE users (
    id TEXT PRIMARY KEY,
    email TEXT NOT NULL UNIQUE,
    account_id TEXT NOT NULL,
    is_admin BIGINT NOT NULL DEFAULT 0,
    disabled BIGINT NOT NULL DEFAULT 0,
    password_hash TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    sessions_valid_after_ms BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE totp_credentials (
    user_id TEXT PRIMARY KEY REFERENCES users(id) ON DELETE CASCADE,
    secret_sealed BYTEA NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE recovery_codes (
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    code_hash TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    used_at BIGINT,
    PRIMARY KEY (user_id, code_hash)
);

CREATE TABLE signing_keys (
    kid TEXT PRIMARY KEY,
    alg TEXT NOT NULL,
    public_jwk TEXT NOT NULL,
    private_sealed BYTEA NOT NULL,
    created_at BIGINT NOT NULL,
    retire_at BIGINT
);

CREATE TABLE audit_events (
    id BIGSERIAL PRIMARY KEY,
    at BIGINT NOT NULL,
    event TEXT NOT NULL,
    outcome TEXT NOT NULL,
    user_id TEXT,
    email TEXT,
    account_id TEXT,
    ip TEXT,
    user_agent TEXT,
    reason TEXT,
    actor TEXT
);
CREATE INDEX audit_events_user ON audit_events (user_id, id);
CREATE INDEX audit_events_event ON audit_events (event, id);
