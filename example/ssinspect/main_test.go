package main

import (
	"context"
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"maunium.net/go/mautrix"
	mcrypto "maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/sliding-e2ee/sdk/crypto"
	"github.com/sliding-e2ee/sdk/slidingsync"
	"github.com/sliding-e2ee/sdk/slidingsync/sqlstore"
	"github.com/sliding-e2ee/sdk/slidingsync/sqlstore/dbopen"
)

func TestInspectPrintsStoredState(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "bot.db")
	db, err := dbopen.Open(path, dbopen.Config{})
	require.NoError(t, err)
	store := sqlstore.New(db, nil)
	require.NoError(t, store.Upgrade(ctx))
	key := slidingsync.ConnKey{UserID: "@bot:example.org", DeviceID: "BOT"}
	empty := ""
	enc := &slidingsync.RoomResponse{Initial: true, Name: slidingsync.Some("Secret"), BumpStamp: slidingsync.Some(int64(9)),
		JoinedCount: slidingsync.Some(3), Limited: true,
		RequiredState: []*event.Event{{Type: event.StateEncryption, StateKey: &empty, Content: event.Content{VeryRaw: json.RawMessage(`{"algorithm":"m.megolm.v1.aes-sha2"}`)}}}}
	plain := &slidingsync.RoomResponse{Initial: true, Name: slidingsync.Some("Lobby"), BumpStamp: slidingsync.Some(int64(2))}
	require.NoError(t, store.Commit(ctx, key, &slidingsync.Update{
		Pos:   "42",
		Lists: map[string]slidingsync.ListState{"all": {Count: 2, Rooms: []id.RoomID{"!enc:x", "!plain:x"}}},
		Rooms: map[id.RoomID]*slidingsync.RoomState{
			"!enc:x":   slidingsync.MergeRoom(nil, "!enc:x", enc, 0),
			"!plain:x": slidingsync.MergeRoom(nil, "!plain:x", plain, 0),
		},
		Extensions: map[string]json.RawMessage{
			"e2ee":      json.RawMessage(`{"active":true,"otk_counts_known":true,"otk_counts":{"signed_curve25519":50}}`),
			"to_device": json.RawMessage(`{"since":"17"}`),
		},
	}))
	require.NoError(t, db.Close())

	var out strings.Builder
	require.NoError(t, run(ctx, &out, path, 1))
	got := out.String()
	for _, want := range []string{
		"connection @bot:example.org / BOT / (default)",
		"pos", "42",
		"list all", "2 rooms, 2 in the window",
		"2 known, 1 with stale membership",
		"one-time keys map[signed_curve25519:50], unused fallback keys never reported",
		"acknowledged up to 17",
		"!enc:x", "Secret", "yes", "limited,members-stale",
	} {
		assert.Contains(t, got, want)
	}
	assert.NotContains(t, got, "Lobby", "-rooms 1 shows only the most recently active room")
}

func TestInspectMissingDatabase(t *testing.T) {
	var out strings.Builder
	err := run(context.Background(), &out, filepath.Join(t.TempDir(), "none.db"), 5)
	require.Error(t, err)
}

func TestInspectPrintsCryptoState(t *testing.T) {
	ctx := context.Background()
	path := filepath.Join(t.TempDir(), "bot.db")
	db, err := dbopen.Open(path, dbopen.Config{})
	require.NoError(t, err)
	store := sqlstore.New(db, nil)
	require.NoError(t, store.Upgrade(ctx))
	require.NoError(t, store.Commit(ctx, slidingsync.ConnKey{UserID: "@bot:example.org", DeviceID: "BOT"}, &slidingsync.Update{Pos: "1"}))
	cs := mcrypto.NewSQLCryptoStore(db, nil, "", "BOT", []byte("key"))
	require.NoError(t, cs.DB.Upgrade(ctx))
	cli, err := mautrix.NewClient("https://example.org", "@bot:example.org", "")
	require.NoError(t, err)
	cli.DeviceID = "BOT"
	olm := mcrypto.NewOlmMachine(cli, nil, cs, nil)
	require.NoError(t, olm.Load(ctx))
	mach, err := crypto.New(cli, olm, crypto.Config{})
	require.NoError(t, err)
	require.NoError(t, mach.Upgrade(ctx))
	for _, q := range []string{
		`INSERT INTO crypto_tracked_user (user_id, devices_outdated) VALUES ('@alice:x', true), ('@bob:x', false)`,
		`INSERT INTO sdkcrypto_outdated_user (user_id, gen) VALUES ('@alice:x', 3)`,
		`INSERT INTO sdkcrypto_fallback_key (account_id, upload_pending, uploaded, rotated_at) VALUES ('@bot:example.org|BOT', true, false, 1700000000000)`,
	} {
		_, err := db.Exec(ctx, q)
		require.NoError(t, err)
	}
	require.NoError(t, db.Close())

	var out strings.Builder
	require.NoError(t, run(ctx, &out, path, 5))
	got := out.String()
	for _, want := range []string{
		"tracked users", "2, 1 with outdated devices",
		"users to query", "@alice:x (generation 3)",
		"fallback key @bot:example.org|BOT", "generated, upload pending, the server reported it used, last rotated 2023-11-14T22:13:20Z",
	} {
		assert.Contains(t, got, want)
	}
	assert.NotContains(t, got, "bot events", "no bot tables in this database")
}
