package sqlstore_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/require"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/sliding-e2ee/sdk/slidingsync"
	"github.com/sliding-e2ee/sdk/slidingsync/sqlstore"
	"github.com/sliding-e2ee/sdk/slidingsync/sqlstore/dbopen"
	"github.com/sliding-e2ee/sdk/slidingsync/storetest"
)

// fuzzReader turns fuzz input into choices; past the end every choice is zero.
type fuzzReader struct{ data []byte }

func (r *fuzzReader) byte() byte {
	if len(r.data) == 0 {
		return 0
	}
	b := r.data[0]
	r.data = r.data[1:]
	return b
}

func (r *fuzzReader) intn(n int) int { return int(r.byte()) % n }

func (r *fuzzReader) done() bool { return len(r.data) == 0 }

var fuzzWords = []string{"", "a", "Zoë", "\"quoted\"", "<b>&amp;</b>", "line\nbreak", "☃", "\\u0000", "tab\t", "日本語"}

func (r *fuzzReader) word() string { return fuzzWords[r.intn(len(fuzzWords))] }

func (r *fuzzReader) event(state bool) *event.Event {
	raw := map[string]any{
		"type":             []string{"m.room.member", "m.room.name", "m.room.message", "com.example.x"}[r.intn(4)],
		"sender":           "@" + []string{"a", "b"}[r.intn(2)] + ":x",
		"event_id":         fmt.Sprintf("$e%d", r.byte()),
		"origin_server_ts": int(r.byte()) * 1000,
		"content":          map[string]any{"body": r.word(), "n": r.intn(3), "list": []any{r.word(), nil, true}},
	}
	if state {
		raw["state_key"] = r.word()
	}
	if r.intn(4) == 0 {
		raw["unsigned"] = map[string]any{"age": r.intn(100)}
	}
	data, err := json.Marshal(raw)
	if err != nil {
		panic(err)
	}
	var evt event.Event
	if err = json.Unmarshal(data, &evt); err != nil {
		panic(err)
	}
	return &evt
}

func (r *fuzzReader) room(roomID id.RoomID) *slidingsync.RoomState {
	rs := &slidingsync.RoomState{
		ID:                roomID,
		Name:              r.word(),
		IsDM:              r.intn(2) == 1,
		Membership:        []event.Membership{"", event.MembershipJoin, event.MembershipInvite, event.MembershipLeave}[r.intn(4)],
		PrevBatch:         r.word(),
		Limited:           r.intn(2) == 1,
		MembersStale:      r.intn(2) == 1,
		NumLive:           r.intn(5),
		JoinedCount:       r.intn(256),
		InvitedCount:      r.intn(3),
		NotificationCount: r.intn(256),
		HighlightCount:    r.intn(3),
		BumpStamp:         int64(r.byte()) << 32,
	}
	if n := r.intn(3); n > 0 {
		rs.State = make(map[slidingsync.StateKey]*event.Event)
		for range n {
			evt := r.event(true)
			rs.State[slidingsync.StateKey{Type: evt.Type.Type, StateKey: *evt.StateKey}] = evt
		}
	}
	for range r.intn(3) {
		rs.Timeline = append(rs.Timeline, r.event(false))
	}
	for range r.intn(2) {
		rs.Heroes = append(rs.Heroes, slidingsync.Hero{UserID: id.UserID("@" + r.word() + ":x"), DisplayName: r.word()})
	}
	if r.intn(4) == 0 {
		rs.InviteState = []*event.Event{r.event(true)}
	}
	return rs
}

func (r *fuzzReader) checkpoint() json.RawMessage {
	switch r.intn(5) {
	case 0:
		return nil
	case 1:
		return json.RawMessage(fmt.Sprintf(`{"since":"%d"}`, r.byte()))
	case 2:
		return json.RawMessage(`"` + strings.ReplaceAll(r.word(), `"`, `\"`) + `"`)
	case 3:
		// Not JSON at all, and not UTF-8: a store keeps the bytes.
		return json.RawMessage{r.byte(), 0xff, 0x00, r.byte()}
	default:
		return json.RawMessage(`[]`)
	}
}

// update decodes one Update: a few rooms, lists and extension checkpoints from small pools,
// so that later updates overwrite earlier ones.
func (r *fuzzReader) update(pos string) *slidingsync.Update {
	upd := &slidingsync.Update{Pos: pos}
	if n := r.intn(4); n > 0 {
		upd.Rooms = make(map[id.RoomID]*slidingsync.RoomState)
		for range n {
			roomID := id.RoomID(fmt.Sprintf("!r%d:x", r.intn(6)))
			upd.Rooms[roomID] = r.room(roomID)
		}
	}
	if n := r.intn(3); n > 0 {
		upd.Lists = make(map[string]slidingsync.ListState)
		for range n {
			ls := slidingsync.ListState{Count: r.intn(10)}
			for range r.intn(4) {
				ls.Rooms = append(ls.Rooms, id.RoomID([]string{"", "!r0:x", "!r1:x", "!r5:x"}[r.intn(4)]))
			}
			upd.Lists[[]string{"all", "dms", "☃"}[r.intn(3)]] = ls
		}
	}
	if n := r.intn(3); n > 0 {
		upd.Extensions = make(map[string]json.RawMessage)
		for range n {
			upd.Extensions[[]string{"to_device", "e2ee", "account_data"}[r.intn(3)]] = r.checkpoint()
		}
	}
	return upd
}

var fuzzConnCounter atomic.Int64

var hookFailure = errors.New("hook failed")

// FuzzDifferential applies a random sequence of updates, some with failing transaction hooks
// and some after reopening the database, to the memory store and to the SQLite store, and
// requires both to load the same checkpoints.
func FuzzDifferential(f *testing.F) {
	f.Add([]byte{})
	f.Add([]byte{0, 3, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20})
	f.Add([]byte("the quick brown fox jumps over the lazy dog, again and again and again"))
	f.Add([]byte{1, 2, 2, 2, 0, 0, 0, 4, 4, 4, 4, 255, 254, 253, 7, 7, 7, 9, 9, 1, 3, 3, 3, 3, 3, 2, 2, 1, 0, 6})

	b := sqliteBackend(dbopen.DriverModernc)
	path := filepath.Join(f.TempDir(), "fuzz.db")
	db, s := open(f, b, path)
	f.Cleanup(func() { _ = db.Close() })
	f.Fuzz(func(t *testing.T, data []byte) {
		differential(t, b, path, s, data)
	})
}

func differential(t *testing.T, b backend, path string, s *sqlstore.Store, data []byte) {
	ctx := context.Background()
	r := &fuzzReader{data: data}
	n := fuzzConnCounter.Add(1)
	keys := []slidingsync.ConnKey{
		{UserID: "@fuzz:x", DeviceID: "D", ConnID: fmt.Sprintf("c%d", n)},
		{UserID: "@fuzz:x", DeviceID: id.DeviceID(fmt.Sprintf("D%d", n)), ConnID: "c"},
	}
	mem := slidingsync.NewMemoryStore()
	sql := slidingsync.Store(s)
	var reopened func() error
	defer func() {
		if reopened != nil {
			require.NoError(t, reopened())
		}
	}()
	for step := 0; !r.done() && step < 64; step++ {
		key := keys[r.intn(len(keys))]
		switch r.intn(8) {
		case 0:
			// Reopen: read back through a new handle on the same file.
			if reopened != nil {
				require.NoError(t, reopened())
			}
			db2, err := dbopen.Open(path, b.cfg)
			require.NoError(t, err)
			reopened = db2.Close
			sql = sqlstore.New(db2, nil)
		case 1:
			upd := r.update(fmt.Sprintf("fail%d", step))
			upd.TxnHooks = []func(context.Context) error{func(context.Context) error { return hookFailure }}
			require.ErrorIs(t, mem.Commit(ctx, key, upd), hookFailure)
			require.ErrorIs(t, sql.Commit(ctx, key, upd), hookFailure)
		default:
			upd := r.update(fmt.Sprintf("p%d", step))
			require.NoError(t, mem.Commit(ctx, key, upd))
			require.NoError(t, sql.Commit(ctx, key, upd))
		}
	}
	for _, key := range keys {
		want, err := mem.Load(ctx, key)
		require.NoError(t, err)
		got, err := sql.Load(ctx, key)
		require.NoError(t, err)
		storetest.AssertEqual(t, want, got, "key %+v", key)
	}
}
