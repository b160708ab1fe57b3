-- An account created without a password (its password set only through an enrolment link)
-- sets up its first second factor through such a link only, as after a reset of its factors:
-- a password learnt while the link's setup was cut short sets up nothing. Accounts created so
-- before this rule, still without a password, are marked as new ones are.
UPDATE users SET factors_reset_at = created_at
 WHERE password_hash = '' AND factors_reset_at IS NULL;
