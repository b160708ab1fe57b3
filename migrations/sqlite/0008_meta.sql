-- Facts about the database itself, one value per name: `master_key_check` holds a value sealed
-- with the master key the database was first used with, so a command run with another key is
-- refused before it seals anything the gateways could never open.
CREATE TABLE meta (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
