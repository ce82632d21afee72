-- v1 -> v2: Remember which dialect and server issued a connection's pos
ALTER TABLE slidingsync_conn ADD COLUMN origin TEXT NOT NULL DEFAULT '';
