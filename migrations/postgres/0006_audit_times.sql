-- How many times an event happened: 1, or for a summary of a run of repeated refusals (see
-- `Audit::record_repeated`) how many attempts the row stands for.
ALTER TABLE audit_events ADD COLUMN times BIGINT NOT NULL DEFAULT 1;
