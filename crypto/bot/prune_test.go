package bot

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix/id"

	"github.com/sliding-e2ee/sdk/internal/minihs"
	"github.com/sliding-e2ee/sdk/internal/pgtest"
	"github.com/sliding-e2ee/sdk/slidingsync/sqlstore/dbopen"
)

func TestMain(m *testing.M) { os.Exit(pgtest.Main(m)) }

// botTables opens path (a SQLite file or a postgres:// URI) with this package's tables.
func botTables(t *testing.T, path string) *dbutil.Database {
	t.Helper()
	db, err := dbopen.Open(path, dbopen.Config{})
	require.NoError(t, err)
	t.Cleanup(func() { _ = db.Close() })
	botDB := db.Child(versionTableName, upgradeTable, nil)
	require.NoError(t, botDB.Upgrade(t.Context()))
	return botDB
}

// queue writes an inbox row.
func queue(t *testing.T, db *dbutil.Database, account, key string, room id.RoomID, seq int64, done bool) {
	t.Helper()
	_, err := db.Exec(t.Context(), `INSERT INTO ssbot_inbox (account, event_key, room_id, event, seq, queued_at, done)
		VALUES ($1, $2, $3, '{}', $4, 0, $5)`, account, key, room, seq, done)
	require.NoError(t, err)
}

func columnOf(t *testing.T, db *dbutil.Database, query string, args ...any) []string {
	t.Helper()
	rows, err := db.Query(t.Context(), query, args...)
	list, err := dbutil.NewRowIterWithError(rows, dbutil.ScanSingleColumn[string], err).AsList()
	require.NoError(t, err)
	return list
}

// Pruning keeps what a server can deliver again or a handler can run again: the newest
// keepPerRoom handled events of each room (a fresh connection re-sends a room's newest 5, and
// a limited timeline is filled back to the newest known event), every pending event, every
// handled invite, the recent sends and the old sends of pending events. The same SQL runs on
// SQLite and PostgreSQL.
func TestPruneKeepsWhatCanComeAgain(t *testing.T) {
	t.Run("sqlite", func(t *testing.T) { testPrune(t, botTables(t, filepath.Join(t.TempDir(), "bot.db"))) })
	t.Run("postgres", func(t *testing.T) { testPrune(t, botTables(t, pgtest.NewDatabase(t))) })
}

func testPrune(t *testing.T, db *dbutil.Database) {
	const account, other = "@bot:example.org|BOT", "@bot:example.org|OLD"
	roomA, roomB := id.RoomID("!a:example.org"), id.RoomID("!b:example.org")
	var seq int64
	next := func() int64 { seq++; return seq }
	for i := range keepPerRoom + 10 {
		queue(t, db, account, fmt.Sprintf("$a%02d", i), roomA, next(), true)
		if i < 3 {
			queue(t, db, account, fmt.Sprintf("$b%02d", i), roomB, next(), true)
		}
	}
	queue(t, db, account, "$pending", roomA, next(), false)
	queue(t, db, account, invitePrefix+"!c:example.org", "!c:example.org", 0, true)
	for i := range keepPerRoom + 10 {
		queue(t, db, other, fmt.Sprintf("$o%02d", i), roomA, next(), true) // another device's rows
	}

	now := time.Now()
	old, recent := now.Add(-outboxRetention-time.Minute).UnixMilli(), now.Add(-time.Minute).UnixMilli()
	sends := map[string]int64{
		eventKey("$pending") + ".0": old,    // its handler runs again: kept
		eventKey("$a00") + ".0":     old,    // handled long ago: deleted
		eventKey("$a01") + ".1":     recent, // kept
		"ssu0123.0":                 old,    // WithIdempotencyKey, past the retention: deleted
		"ssu0123.1":                 recent,
	}
	for txn, at := range sends {
		_, err := db.Exec(t.Context(), `INSERT INTO ssbot_outbox (account, txn_id, room_id, first_try) VALUES ($1, $2, $3, $4)`,
			account, txn, roomA, at)
		require.NoError(t, err)
	}

	in := &inbox{db: db, account: account}
	events, deleted, err := in.prune(t.Context(), now)
	require.NoError(t, err)
	assert.EqualValues(t, 10, events, "room A's 10 oldest handled events")
	assert.EqualValues(t, 2, deleted, "the old sends no pending event needs")

	var wantA []string
	for i := 10; i < keepPerRoom+10; i++ {
		wantA = append(wantA, fmt.Sprintf("$a%02d", i))
	}
	assert.Equal(t, wantA, columnOf(t, db, `SELECT event_key FROM ssbot_inbox WHERE account=$1 AND room_id=$2 AND done ORDER BY seq`, account, roomA))
	assert.Equal(t, []string{"$b00", "$b01", "$b02"}, columnOf(t, db, `SELECT event_key FROM ssbot_inbox WHERE account=$1 AND room_id=$2 ORDER BY seq`, account, roomB))
	assert.Equal(t, []string{"$pending"}, columnOf(t, db, `SELECT event_key FROM ssbot_inbox WHERE account=$1 AND NOT done`, account))
	assert.Equal(t, []string{invitePrefix + "!c:example.org"}, columnOf(t, db, `SELECT event_key FROM ssbot_inbox WHERE account=$1 AND room_id='!c:example.org'`, account))
	assert.Len(t, columnOf(t, db, `SELECT event_key FROM ssbot_inbox WHERE account=$1`, other), keepPerRoom+10, "another device's rows are its own")
	assert.ElementsMatch(t, []string{eventKey("$pending") + ".0", eventKey("$a01") + ".1", "ssu0123.1"},
		columnOf(t, db, `SELECT txn_id FROM ssbot_outbox WHERE account=$1`, account))

	events, deleted, err = in.prune(t.Context(), now)
	require.NoError(t, err)
	assert.Zero(t, events+deleted, "a second prune finds nothing")
}

// A running bot prunes its inbox when it starts (and hourly), and keeps only the key of an
// event it handled.
func TestRunPrunesAndKeepsNoHandledContent(t *testing.T) {
	ctx, _ := testCtx(t)
	f := newFixture(t, minihs.Options{})
	cli := f.client()
	r := f.start(ctx, cli, Config{}, nil)
	f.waitJoined(ctx, r)
	_, err := f.alice.SendEncrypted(ctx, f.room, "hello")
	require.NoError(t, err)
	require.Equal(t, []string{"echo: hello"}, f.replies(ctx, 1, 30*time.Second))
	db := botTables(t, f.db)
	wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	require.NoError(t, f.srv.WaitFor(wctx, func() bool {
		return len(columnOf(t, db, `SELECT event_key FROM ssbot_inbox WHERE room_id=$1 AND done AND event_key NOT LIKE 'invite|%'`, f.room)) == 1
	}), "the message is marked handled")
	require.ErrorIs(t, r.stop(), context.Canceled)
	assert.Equal(t, []string{""}, columnOf(t, db, `SELECT event FROM ssbot_inbox WHERE room_id=$1 AND done AND event_key NOT LIKE 'invite|%'`, f.room),
		"the handled message's row keeps its key only")
	quiet := id.RoomID("!quiet:" + minihs.ServerName)
	for i := range keepPerRoom + 5 {
		queue(t, db, accountKey(cli), fmt.Sprintf("$q%02d", i), quiet, int64(i+1), true)
	}

	f.start(ctx, f.client(), Config{}, nil)
	require.NoError(t, f.srv.WaitFor(wctx, func() bool {
		return len(columnOf(t, db, `SELECT event_key FROM ssbot_inbox WHERE room_id=$1`, quiet)) == keepPerRoom
	}), "the restarted bot pruned the room's oldest handled events")
}

// BenchmarkPrune prunes an inbox of 1 000 rooms with 60 handled events each (10 000 rows to
// delete) and 1 000 old sends on SQLite: the dispatcher does this, at most hourly, between
// two events.
func BenchmarkPrune(b *testing.B) {
	const rooms, perRoom = 1000, keepPerRoom + 10
	db, err := dbopen.Open(filepath.Join(b.TempDir(), "bot.db"), dbopen.Config{})
	require.NoError(b, err)
	defer db.Close()
	db = db.Child(versionTableName, upgradeTable, nil)
	require.NoError(b, db.Upgrade(b.Context()))
	const account = "@bot:example.org|BOT"
	in := &inbox{db: db, account: account}
	old := time.Now().Add(-2 * outboxRetention).UnixMilli()
	for range b.N {
		b.StopTimer()
		require.NoError(b, db.DoTxn(b.Context(), nil, func(ctx context.Context) error {
			seq := int64(0)
			for r := range rooms {
				room := fmt.Sprintf("!r%04d:example.org", r)
				for i := range perRoom {
					seq++
					if _, err := db.Exec(ctx, `INSERT INTO ssbot_inbox (account, event_key, room_id, event, seq, queued_at, done)
						VALUES ($1, $2, $3, '', $4, 0, true) ON CONFLICT DO NOTHING`, account, fmt.Sprintf("$%d-%d", r, i), room, seq); err != nil {
						return err
					}
				}
				if _, err := db.Exec(ctx, `INSERT INTO ssbot_outbox (account, txn_id, room_id, first_try) VALUES ($1, $2, $3, $4)
					ON CONFLICT DO NOTHING`, account, eventKey(fmt.Sprintf("$%d-0", r))+".0", room, old); err != nil {
					return err
				}
			}
			return nil
		}))
		b.StartTimer()
		events, sends, err := in.prune(b.Context(), time.Now())
		require.NoError(b, err)
		require.EqualValues(b, rooms*10, events)
		require.EqualValues(b, rooms, sends)
	}
}
