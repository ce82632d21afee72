-- v0 -> v1: Latest revision

-- The session the bot logged in with, kept so that a restart reuses the device.
CREATE TABLE ssbot_session (
	user_id      TEXT   NOT NULL PRIMARY KEY,
	device_id    TEXT   NOT NULL,
	access_token TEXT   NOT NULL,
	-- the key the Olm account is pickled with, unless Config.PickleKey gives one
	pickle_key   BYTEA  NOT NULL,
	-- unix milliseconds of the first start: older events are history, not dispatched
	created_at   BIGINT NOT NULL
);

-- Events to dispatch, written in the transaction that commits the response they came in.
CREATE TABLE ssbot_inbox (
	account   TEXT    NOT NULL,
	-- the event ID, or "invite|<room ID>" for an invite
	event_key TEXT    NOT NULL,
	room_id   TEXT    NOT NULL,
	event     TEXT    NOT NULL,
	seq       BIGINT  NOT NULL,
	-- unix milliseconds of the commit that queued it
	queued_at BIGINT  NOT NULL,
	done      BOOLEAN NOT NULL DEFAULT false,
	PRIMARY KEY (account, event_key)
);
CREATE INDEX ssbot_inbox_pending_idx ON ssbot_inbox (account, done, seq);

-- Sends made under an idempotency key, by transaction ID: a row is written before the first
-- attempt and gets the event ID once the server is known to have the event.
CREATE TABLE ssbot_outbox (
	account   TEXT   NOT NULL,
	txn_id    TEXT   NOT NULL,
	room_id   TEXT   NOT NULL,
	-- unix milliseconds of the first attempt
	first_try BIGINT NOT NULL,
	event_id  TEXT,
	PRIMARY KEY (account, txn_id)
);
