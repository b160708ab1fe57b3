-- "Remember this device": until when a device may stand in for the second factor, and the
-- public key (JSON) it must prove possession of at sign-in.
ALTER TABLE devices ADD COLUMN remembered_until BIGINT;
ALTER TABLE devices ADD COLUMN remember_key TEXT;
