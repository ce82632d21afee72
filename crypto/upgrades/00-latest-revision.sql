-- v0 -> v1: Latest revision
CREATE TABLE sdkcrypto_outdated_user (
	user_id TEXT   NOT NULL PRIMARY KEY,
	gen     BIGINT NOT NULL
);

CREATE TABLE sdkcrypto_fallback_key (
	account_id     TEXT    NOT NULL PRIMARY KEY,
	-- the server said it holds no unused fallback key, or this device never uploaded one
	upload_pending BOOLEAN NOT NULL DEFAULT false,
	-- the current key was uploaded
	uploaded       BOOLEAN NOT NULL DEFAULT false,
	-- unix milliseconds of the last rotation; 0 before the first
	rotated_at     BIGINT  NOT NULL DEFAULT 0,
	-- unix milliseconds after which the previous private key is forgotten; 0 when none is kept
	forget_at      BIGINT  NOT NULL DEFAULT 0
);
