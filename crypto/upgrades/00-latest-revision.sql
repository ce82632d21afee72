-- v0 -> v1: Latest revision
CREATE TABLE sdkcrypto_outdated_user (
	user_id TEXT   NOT NULL PRIMARY KEY,
	gen     BIGINT NOT NULL
);
