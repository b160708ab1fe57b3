-- What risk scoring remembers of each account's recent complete sign-ins (networks, countries,
-- the last place; a JSON document written by `risk::Risk`), so a restart forgets nothing.
CREATE TABLE risk_history (
    user_id TEXT PRIMARY KEY,
    body TEXT NOT NULL,
    updated_at BIGINT NOT NULL
);
