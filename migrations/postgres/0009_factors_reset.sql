-- When an administrator last removed a user's second factors (or a "this wasn't me" report
-- removed the ones set up since the reported sign-in), Unix seconds; NULL if never. An account
-- in that state enrols again only through an enrolment link: its password alone may be the
-- thief's.
ALTER TABLE users ADD COLUMN factors_reset_at BIGINT;
