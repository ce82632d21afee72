-- v0 -> v2: Latest revision
CREATE TABLE slidingsync_conn (
	user_id   TEXT NOT NULL,
	device_id TEXT NOT NULL,
	conn_id   TEXT NOT NULL,
	pos       TEXT NOT NULL,
	-- The dialect and server that issued pos; empty when not known.
	origin    TEXT NOT NULL DEFAULT '',

	PRIMARY KEY (user_id, device_id, conn_id)
);

CREATE TABLE slidingsync_list (
	user_id   TEXT  NOT NULL,
	device_id TEXT  NOT NULL,
	conn_id   TEXT  NOT NULL,
	name      TEXT  NOT NULL,
	-- ListState as JSON.
	state     TEXT  NOT NULL,

	PRIMARY KEY (user_id, device_id, conn_id, name),
	CONSTRAINT slidingsync_list_conn_fkey FOREIGN KEY (user_id, device_id, conn_id)
		REFERENCES slidingsync_conn (user_id, device_id, conn_id) ON DELETE CASCADE
);

CREATE TABLE slidingsync_room (
	user_id   TEXT  NOT NULL,
	device_id TEXT  NOT NULL,
	conn_id   TEXT  NOT NULL,
	room_id   TEXT  NOT NULL,
	-- RoomState as JSON (RoomState.MarshalJSON).
	state     TEXT  NOT NULL,

	PRIMARY KEY (user_id, device_id, conn_id, room_id),
	CONSTRAINT slidingsync_room_conn_fkey FOREIGN KEY (user_id, device_id, conn_id)
		REFERENCES slidingsync_conn (user_id, device_id, conn_id) ON DELETE CASCADE
);

CREATE TABLE slidingsync_extension (
	user_id    TEXT  NOT NULL,
	device_id  TEXT  NOT NULL,
	conn_id    TEXT  NOT NULL,
	name       TEXT  NOT NULL,
	-- Opaque bytes; NULL for an empty checkpoint.
	checkpoint bytea,

	PRIMARY KEY (user_id, device_id, conn_id, name),
	CONSTRAINT slidingsync_extension_conn_fkey FOREIGN KEY (user_id, device_id, conn_id)
		REFERENCES slidingsync_conn (user_id, device_id, conn_id) ON DELETE CASCADE
);

CREATE TABLE slidingsync_lease (
	user_id    TEXT   NOT NULL,
	device_id  TEXT   NOT NULL,
	name       TEXT   NOT NULL,
	holder     TEXT   NOT NULL,
	-- Milliseconds since the Unix epoch, by the database's clock.
	expires_at BIGINT NOT NULL,

	PRIMARY KEY (user_id, device_id, name)
);
