-- The audit trail searched by the address a sign-in typed: attempts on addresses no user has
-- (password spraying) are found by it.
CREATE INDEX audit_events_email ON audit_events (email, id);
