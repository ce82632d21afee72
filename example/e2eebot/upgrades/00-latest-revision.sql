-- v0 -> v1: Latest revision
CREATE TABLE e2eebot_session (
	user_id      TEXT   NOT NULL PRIMARY KEY,
	device_id    TEXT   NOT NULL,
	access_token TEXT   NOT NULL,
	pickle_key   BYTEA  NOT NULL,
	created_at   BIGINT NOT NULL
);

-- What the bot has to do, written in the transaction that commits the response it came from,
-- so that nothing is lost between a commit and the reply. done is set once handled.
CREATE TABLE e2eebot_task (
	event_id   TEXT    NOT NULL PRIMARY KEY,
	kind       TEXT    NOT NULL,
	room_id    TEXT    NOT NULL,
	event      TEXT    NOT NULL,
	tries      INTEGER NOT NULL DEFAULT 0,
	done       BOOLEAN NOT NULL DEFAULT false,
	seq        BIGINT  NOT NULL
);
CREATE INDEX e2eebot_task_pending_idx ON e2eebot_task (done, seq);
