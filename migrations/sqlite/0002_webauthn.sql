-- Security keys and passkeys (WebAuthn). `passkey` holds the serialised credential (public key,
-- counter, flags) as JSON; it contains no secret. `sign_count` mirrors the counter so a sign-in
-- can raise it with a compare-and-set and parallel sign-ins can never lower it.
CREATE TABLE webauthn_credentials (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    credential_id TEXT NOT NULL UNIQUE,
    passkey TEXT NOT NULL,
    name TEXT NOT NULL,
    aaguid TEXT,
    sign_count BIGINT NOT NULL DEFAULT 0,
    created_at BIGINT NOT NULL,
    last_used_at BIGINT,
    suspended_at BIGINT,
    suspended_reason TEXT
);
CREATE INDEX webauthn_credentials_user ON webauthn_credentials (user_id, created_at);
