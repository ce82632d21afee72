package sqlstore_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix/id"

	"github.com/sliding-e2ee/sdk/slidingsync"
	"github.com/sliding-e2ee/sdk/slidingsync/sqlstore"
	"github.com/sliding-e2ee/sdk/slidingsync/sqlstore/dbopen"
)

// The persistence benchmarks run in one process so that their numbers compare: committing the
// 10 000-room initial response is measured against decoding the same body.

const benchRooms = 10000

func benchRoomID(i int) id.RoomID { return id.RoomID(fmt.Sprintf("!bench%05d:synapse.example", i)) }

func benchStateEvent(buf *bytes.Buffer, typ, stateKey, sender, content string, ts int64, eventID string) {
	fmt.Fprintf(buf, `{"type":%q,"state_key":%q,"sender":%q,"content":%s,"origin_server_ts":%d,"unsigned":{"age":%d},"event_id":%q}`,
		typ, stateKey, sender, content, ts, 1000+ts%997, eventID)
}

// benchInitialBody is an initial response in the shape Synapse sends: every room with
// initial, four to six required state events, one timeline event, counts and prev_batch, and
// one list with a SYNC op over all rooms.
var benchInitialBody = sync.OnceValue(func() []byte {
	var buf bytes.Buffer
	fmt.Fprintf(&buf, `{"pos":"1","lists":{"all":{"count":%d,"ops":[{"op":"SYNC","range":[0,%d],"room_ids":[`, benchRooms, benchRooms-1)
	for i := range benchRooms {
		if i > 0 {
			buf.WriteByte(',')
		}
		fmt.Fprintf(&buf, "%q", benchRoomID(i))
	}
	buf.WriteString(`]}]}},"rooms":{`)
	for i := range benchRooms {
		if i > 0 {
			buf.WriteByte(',')
		}
		ts := int64(1795800000000 + i*1000)
		creator := fmt.Sprintf("@creator%05d:synapse.example", i)
		fmt.Fprintf(&buf, `%q:{"initial":true,"name":"Room %d","bump_stamp":%d,"joined_count":3,"invited_count":0,"notification_count":%d,"highlight_count":0,"required_state":[`,
			benchRoomID(i), i, 2000000-i, i%4)
		benchStateEvent(&buf, "m.room.create", "", creator, fmt.Sprintf(`{"room_version":"10","creator":%q}`, creator), ts, fmt.Sprintf("$create%d", i))
		buf.WriteByte(',')
		benchStateEvent(&buf, "m.room.name", "", creator, fmt.Sprintf(`{"name":"Room %d"}`, i), ts+1, fmt.Sprintf("$name%d", i))
		if i%2 == 0 {
			buf.WriteByte(',')
			benchStateEvent(&buf, "m.room.encryption", "", creator, `{"algorithm":"m.megolm.v1.aes-sha2"}`, ts+2, fmt.Sprintf("$enc%d", i))
		}
		for m := range 2 + i%2 {
			member := fmt.Sprintf("@member%05d-%d:synapse.example", i, m)
			buf.WriteByte(',')
			benchStateEvent(&buf, "m.room.member", member, member, fmt.Sprintf(`{"membership":"join","displayname":"Member %d-%d"}`, i, m), ts+3+int64(m), fmt.Sprintf("$member%d-%d", i, m))
		}
		fmt.Fprintf(&buf, `],"timeline":[{"type":"m.room.message","sender":%q,"content":{"msgtype":"m.text","body":"hello from room %d"},"origin_server_ts":%d,"unsigned":{"age":5},"event_id":"$msg%d"}],"limited":true,"prev_batch":"t%d-1000_1_1_1_1_1_1_1_1_1","num_live":0}`,
			creator, i, ts+10, i, i)
	}
	buf.WriteString(`},"extensions":{"to_device":{"next_batch":"1","events":[]},"e2ee":{"device_one_time_keys_count":{"signed_curve25519":50}}}}`)
	return buf.Bytes()
})

// updateFrom decodes a response and merges it on top of known, as Conn does, into the Update
// that Conn commits.
func updateFrom(body []byte, known *slidingsync.Checkpoint) (*slidingsync.Update, error) {
	resp, err := slidingsync.DecodeResponse(body)
	if err != nil {
		return nil, err
	}
	upd := &slidingsync.Update{
		Pos:        resp.Pos,
		Lists:      make(map[string]slidingsync.ListState),
		Rooms:      make(map[id.RoomID]*slidingsync.RoomState),
		Extensions: map[string]json.RawMessage{"to_device": json.RawMessage(`{"since":"` + resp.Pos + `"}`)},
	}
	for name, lr := range resp.Lists {
		ls, err := slidingsync.MergeList(known.Lists[name], lr)
		if err != nil {
			return nil, err
		}
		upd.Lists[name] = ls
	}
	for roomID, rr := range resp.Rooms {
		upd.Rooms[roomID] = slidingsync.MergeRoom(known.Rooms[roomID], roomID, rr, 0)
	}
	return upd, nil
}

var benchInitialUpdate = sync.OnceValue(func() *slidingsync.Update {
	upd, err := updateFrom(benchInitialBody(), &slidingsync.Checkpoint{})
	if err != nil {
		panic(err)
	}
	return upd
})

// benchIncrementalUpdate is a five-room incremental response on top of the initial one: one
// or two new messages per room and a new count.
func benchIncrementalUpdate(tb testing.TB, pos int) *slidingsync.Update {
	var buf bytes.Buffer
	fmt.Fprintf(&buf, `{"pos":"%d","lists":{"all":{"count":%d}},"rooms":{`, pos, benchRooms)
	for n, i := range []int{0, 17, 4242, 9000, benchRooms - 1} {
		if n > 0 {
			buf.WriteByte(',')
		}
		fmt.Fprintf(&buf, `%q:{"bump_stamp":%d,"notification_count":%d,"timeline":[{"type":"m.room.message","sender":"@x:synapse.example","content":{"msgtype":"m.text","body":"news %d"},"origin_server_ts":%d,"event_id":"$news%d-%d"}],"limited":false,"num_live":1}`,
			benchRoomID(i), 3000000+pos, n, pos, 1795900000000+pos, i, pos)
	}
	buf.WriteString(`}}`)
	known := &slidingsync.Checkpoint{Lists: benchInitialUpdate().Lists, Rooms: benchInitialUpdate().Rooms}
	upd, err := updateFrom(buf.Bytes(), known)
	require.NoError(tb, err)
	return upd
}

// countingLogger counts what dbutil reports: transactions begun and committed, and statements.
type countingLogger struct {
	dbutil.DatabaseLogger
	begins, commits, stmts atomic.Int64
}

func (c *countingLogger) QueryTiming(ctx context.Context, method, query string, args []any, nrows int, duration time.Duration, err error) {
	switch method {
	case "Begin":
		c.begins.Add(1)
	case "Commit":
		c.commits.Add(1)
	case "Exec", "Query", "QueryRow":
		c.stmts.Add(1)
	}
}

func (c *countingLogger) reset() {
	c.begins.Store(0)
	c.commits.Store(0)
	c.stmts.Store(0)
}

// openCounting opens target with a logger that counts transactions on the parent database.
func openCounting(tb testing.TB, b backend, target string) (*dbutil.Database, *sqlstore.Store, *countingLogger) {
	db, s := open(tb, b, target)
	counter := &countingLogger{DatabaseLogger: dbutil.NoopLogger}
	db.Log = counter
	return db, s, counter
}

func benchBackends() []backend {
	// The default waits for fsync on every commit; the relaxed one shows what that costs.
	relaxed := sqliteBackend(dbopen.DriverModernc)
	relaxed.name += "-relaxed"
	relaxed.cfg.RelaxedSync = true
	backends := []backend{sqliteBackend(dbopen.DriverModernc), relaxed}
	if cgoDriver != "" {
		backends = append(backends, sqliteBackend(cgoDriver))
	}
	return append(backends, postgresBackend)
}

// diskBytes is the space the store's data takes: the SQLite file after a WAL checkpoint, or
// PostgreSQL's total size (with indexes and TOAST) of the store's tables.
func diskBytes(tb testing.TB, b backend, target string, db *dbutil.Database) int64 {
	ctx := context.Background()
	if db.Dialect == dbutil.Postgres {
		var size int64
		require.NoError(tb, db.QueryRow(ctx, `SELECT SUM(pg_total_relation_size(c.oid))::BIGINT FROM pg_class c WHERE c.relname LIKE 'slidingsync\_%' AND c.relkind = 'r'`).Scan(&size))
		return size
	}
	_, err := db.Exec(ctx, `PRAGMA wal_checkpoint(TRUNCATE)`)
	require.NoError(tb, err)
	st, err := os.Stat(target)
	require.NoError(tb, err)
	return st.Size()
}

func BenchmarkPersistence(b *testing.B) {
	body := benchInitialBody()
	b.Run("Decode10k", func(b *testing.B) {
		b.SetBytes(int64(len(body)))
		for b.Loop() {
			if _, err := slidingsync.DecodeResponse(body); err != nil {
				b.Fatal(err)
			}
		}
	})
	upd := benchInitialUpdate()
	var jsonBytes int
	for _, rs := range upd.Rooms {
		data, _ := json.Marshal(rs)
		jsonBytes += len(data)
	}
	for _, bk := range benchBackends() {
		b.Run("Commit10k/"+bk.name, func(b *testing.B) {
			target := bk.newTarget(b)
			db, s, counter := openCounting(b, bk, target)
			defer db.Close()
			before := diskBytes(b, bk, target, db)
			ctx := context.Background()
			counter.reset()
			n := 0
			for b.Loop() {
				n++
				key := slidingsync.ConnKey{UserID: "@bench:example.org", DeviceID: "BENCH", ConnID: fmt.Sprintf("c%d", n)}
				if err := s.Commit(ctx, key, upd); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(counter.begins.Load())/float64(n), "txn/op")
			b.ReportMetric(float64(counter.stmts.Load())/float64(n), "stmts/op")
			b.ReportMetric(float64(diskBytes(b, bk, target, db)-before)/float64(n*benchRooms), "disk-B/room")
			b.ReportMetric(float64(jsonBytes)/benchRooms, "json-B/room")
		})
		b.Run("Commit5/"+bk.name, func(b *testing.B) {
			target := bk.newTarget(b)
			db, s, counter := openCounting(b, bk, target)
			defer db.Close()
			ctx := context.Background()
			key := slidingsync.ConnKey{UserID: "@bench:example.org", DeviceID: "BENCH", ConnID: "c"}
			require.NoError(b, s.Commit(ctx, key, upd))
			updates := make([]*slidingsync.Update, 64)
			for i := range updates {
				updates[i] = benchIncrementalUpdate(b, i+2)
			}
			counter.reset()
			n := 0
			for b.Loop() {
				if err := s.Commit(ctx, key, updates[n%len(updates)]); err != nil {
					b.Fatal(err)
				}
				n++
			}
			b.ReportMetric(float64(counter.begins.Load())/float64(n), "txn/op")
			b.ReportMetric(float64(counter.stmts.Load())/float64(n), "stmts/op")
		})
		b.Run("Load10k/"+bk.name, func(b *testing.B) {
			target := bk.newTarget(b)
			db, s := open(b, bk, target)
			defer db.Close()
			ctx := context.Background()
			key := slidingsync.ConnKey{UserID: "@bench:example.org", DeviceID: "BENCH", ConnID: "c"}
			require.NoError(b, s.Commit(ctx, key, upd))
			for b.Loop() {
				cp, err := s.Load(ctx, key)
				if err != nil || len(cp.Rooms) != benchRooms {
					b.Fatal(err, len(cp.Rooms))
				}
			}
		})
	}
}

// TestOneTransactionPerCommit counts the transactions dbutil begins and commits for a large
// update (several INSERT batches) and a small one.
func TestOneTransactionPerCommit(t *testing.T) {
	for _, bk := range []backend{sqliteBackend(dbopen.DriverModernc), postgresBackend} {
		t.Run(bk.name, func(t *testing.T) {
			db, s, counter := openCounting(t, bk, bk.newTarget(t))
			defer db.Close()
			ctx := context.Background()
			key := slidingsync.ConnKey{UserID: "@count:example.org", DeviceID: "COUNT", ConnID: "c"}
			big := &slidingsync.Update{Pos: "1", Rooms: make(map[id.RoomID]*slidingsync.RoomState)}
			for i := range 2500 {
				big.Rooms[benchRoomID(i)] = &slidingsync.RoomState{ID: benchRoomID(i), Name: "r"}
			}
			big.Lists = map[string]slidingsync.ListState{"all": {Count: 2500}}
			big.Extensions = map[string]json.RawMessage{"to_device": json.RawMessage(`{}`), "e2ee": json.RawMessage(`{}`)}
			small := &slidingsync.Update{Pos: "2", Rooms: map[id.RoomID]*slidingsync.RoomState{benchRoomID(1): {ID: benchRoomID(1)}}}
			for _, upd := range []*slidingsync.Update{big, small} {
				counter.reset()
				require.NoError(t, s.Commit(ctx, key, upd))
				require.Equal(t, int64(1), counter.begins.Load(), "transactions begun for pos %s", upd.Pos)
				require.Equal(t, int64(1), counter.commits.Load(), "transactions committed for pos %s", upd.Pos)
			}
		})
	}
}
