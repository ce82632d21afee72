package storetest

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/sliding-e2ee/sdk/slidingsync"
)

// Opened is one open handle on a store.
type Opened struct {
	// Store is the store under test.
	Store slidingsync.Store
	// Close closes the handle. Nil means there is nothing to close.
	Close func() error
	// Side, if not nil, is a key-value table in the same database as Store. The suite writes
	// it from transaction hooks to check that they run inside the commit's transaction.
	Side Side
}

// Side is a key-value table that shares a database, and a transaction, with the store: Put
// called with the context a transaction hook receives must commit or roll back with the
// update.
type Side interface {
	Put(ctx context.Context, key, value string) error
	Get(ctx context.Context, key string) (value string, ok bool, err error)
}

// Opener opens a new handle on one database; every call sees what earlier handles committed.
type Opener func(t *testing.T) Opened

// Run runs the suite as subtests of t. newDB creates an empty database for one test and
// returns the Opener for it; it may register cleanups on t.
func Run(t *testing.T, newDB func(t *testing.T) Opener) {
	tests := []struct {
		name string
		fn   func(t *testing.T, h *harness)
	}{
		{"EmptyLoad", testEmptyLoad},
		{"CommitThenLoad", testCommitThenLoad},
		{"IncrementalMerge", testIncrementalMerge},
		{"RoomReplacedWhole", testRoomReplacedWhole},
		{"KeysIsolated", testKeysIsolated},
		{"ExtensionCheckpoints", testExtensionCheckpoints},
		{"TxnHooks", testTxnHooks},
		{"FailingHookCommitsNothing", testFailingHook},
		{"LargeUpdate", testLargeUpdate},
		{"EventsRoundTrip", testEventsRoundTrip},
		{"LoadReturnsCopies", testLoadReturnsCopies},
		{"ConcurrentKeys", testConcurrentKeys},
		{"RoomLoader", testRoomLoader},
		{"OriginKeptUntilReplaced", testOrigin},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			tc.fn(t, &harness{t: t, open: newDB(t)})
		})
	}
}

type harness struct {
	t    *testing.T
	open Opener
}

// with opens a handle, runs fn, and closes the handle.
func (h *harness) with(fn func(o Opened)) {
	h.t.Helper()
	o := h.open(h.t)
	require.NotNil(h.t, o.Store, "Opener returned no store")
	defer func() {
		if o.Close != nil {
			require.NoError(h.t, o.Close(), "close store")
		}
	}()
	fn(o)
}

func (h *harness) commit(key slidingsync.ConnKey, upd *slidingsync.Update) {
	h.t.Helper()
	h.with(func(o Opened) {
		require.NoError(h.t, o.Store.Commit(context.Background(), key, upd))
	})
}

func (h *harness) load(key slidingsync.ConnKey) *slidingsync.Checkpoint {
	h.t.Helper()
	var cp *slidingsync.Checkpoint
	h.with(func(o Opened) {
		var err error
		cp, err = o.Store.Load(context.Background(), key)
		require.NoError(h.t, err)
		require.NotNil(h.t, cp, "Load returned a nil checkpoint")
	})
	return cp
}

var keyA = slidingsync.ConnKey{UserID: "@alice:example.org", DeviceID: "ALICEDEV", ConnID: "main"}

// Apply returns the checkpoint that results from committing upd on top of cp, as a Store must
// compute it: pos replaced, the origin replaced when the update sets one, and lists, rooms and extension checkpoints upserted by name. cp is
// not modified; nil means the empty checkpoint.
func Apply(cp *slidingsync.Checkpoint, upd *slidingsync.Update) *slidingsync.Checkpoint {
	next := &slidingsync.Checkpoint{
		Pos:        upd.Pos,
		Lists:      make(map[string]slidingsync.ListState),
		Rooms:      make(map[id.RoomID]*slidingsync.RoomState),
		Extensions: make(map[string]json.RawMessage),
	}
	if cp != nil {
		next.Origin = cp.Origin
		maps.Copy(next.Lists, cp.Lists)
		maps.Copy(next.Rooms, cp.Rooms)
		maps.Copy(next.Extensions, cp.Extensions)
	}
	if upd.Origin != "" {
		next.Origin = upd.Origin
	}
	maps.Copy(next.Lists, upd.Lists)
	maps.Copy(next.Rooms, upd.Rooms)
	maps.Copy(next.Extensions, upd.Extensions)
	return next
}

type canonical struct {
	Pos        string                        `json:"pos"`
	Origin     string                        `json:"origin"`
	Lists      map[string]json.RawMessage    `json:"lists"`
	Rooms      map[id.RoomID]json.RawMessage `json:"rooms"`
	Extensions map[string]string             `json:"extensions"`
}

// canonicalJSON encodes a checkpoint so that two checkpoints a store must treat as equal encode
// to equal bytes: nil and empty maps, slices and checkpoints are the same, rooms and lists are
// compared by their JSON encoding.
func canonicalJSON(cp *slidingsync.Checkpoint) (string, error) {
	c := canonical{
		Lists:      map[string]json.RawMessage{},
		Rooms:      map[id.RoomID]json.RawMessage{},
		Extensions: map[string]string{},
	}
	if cp == nil {
		cp = &slidingsync.Checkpoint{}
	}
	c.Pos, c.Origin = cp.Pos, cp.Origin
	for name, ls := range cp.Lists {
		if len(ls.Rooms) == 0 {
			ls.Rooms = nil
		}
		data, err := json.Marshal(ls)
		if err != nil {
			return "", err
		}
		c.Lists[name] = data
	}
	for roomID, rs := range cp.Rooms {
		if rs == nil {
			return "", fmt.Errorf("room %s is nil", roomID)
		}
		data, err := json.Marshal(rs)
		if err != nil {
			return "", err
		}
		c.Rooms[roomID] = data
	}
	for name, raw := range cp.Extensions {
		var buf bytes.Buffer
		if len(raw) > 0 {
			buf.Write(raw)
		}
		c.Extensions[name] = buf.String()
	}
	data, err := json.MarshalIndent(c, "", " ")
	return string(data), err
}

// AssertEqual fails the test unless the checkpoints are equal by [Canonical].
func AssertEqual(t testing.TB, want, got *slidingsync.Checkpoint, msgAndArgs ...any) bool {
	t.Helper()
	w, err := canonicalJSON(want)
	require.NoError(t, err)
	g, err := canonicalJSON(got)
	require.NoError(t, err)
	return assert.Equal(t, w, g, msgAndArgs...)
}

func mustEvent(raw string) *event.Event {
	var evt event.Event
	if err := json.Unmarshal([]byte(raw), &evt); err != nil {
		panic(fmt.Errorf("storetest: bad event %s: %w", raw, err))
	}
	return &evt
}

func simpleRoom(roomID id.RoomID, marker string) *slidingsync.RoomState {
	name := mustEvent(fmt.Sprintf(`{"type":"m.room.name","state_key":"","sender":"@a:x","event_id":"$n%s","origin_server_ts":1,"content":{"name":%q}}`, marker, marker))
	msg := mustEvent(fmt.Sprintf(`{"type":"m.room.message","sender":"@a:x","event_id":"$m%s","origin_server_ts":2,"content":{"msgtype":"m.text","body":%q}}`, marker, marker))
	return &slidingsync.RoomState{
		ID:          roomID,
		Name:        marker,
		State:       map[slidingsync.StateKey]*event.Event{{Type: "m.room.name"}: name},
		Timeline:    []*event.Event{msg},
		JoinedCount: len(marker),
	}
}

func testEmptyLoad(t *testing.T, h *harness) {
	cp := h.load(keyA)
	assert.Empty(t, cp.Pos)
	assert.Empty(t, cp.Rooms)
	assert.Empty(t, cp.Lists)
	assert.Empty(t, cp.Extensions)
}

func testCommitThenLoad(t *testing.T, h *harness) {
	upd := &slidingsync.Update{
		Pos:        "p1",
		Lists:      map[string]slidingsync.ListState{"all": {Count: 3, Rooms: []id.RoomID{"!a:x", "", "!b:x"}}},
		Rooms:      map[id.RoomID]*slidingsync.RoomState{"!a:x": simpleRoom("!a:x", "a1"), "!b:x": simpleRoom("!b:x", "b1")},
		Extensions: map[string]json.RawMessage{"to_device": json.RawMessage(`{"since":"s1"}`)},
	}
	h.commit(keyA, upd)
	got := h.load(keyA)
	assert.Equal(t, "p1", got.Pos)
	AssertEqual(t, Apply(nil, upd), got)
}

func testIncrementalMerge(t *testing.T, h *harness) {
	u1 := &slidingsync.Update{
		Pos:        "p1",
		Lists:      map[string]slidingsync.ListState{"all": {Count: 2, Rooms: []id.RoomID{"!a:x", "!b:x"}}, "dms": {Count: 0}},
		Rooms:      map[id.RoomID]*slidingsync.RoomState{"!a:x": simpleRoom("!a:x", "a1"), "!b:x": simpleRoom("!b:x", "b1")},
		Extensions: map[string]json.RawMessage{"to_device": json.RawMessage(`{"since":"s1"}`), "e2ee": json.RawMessage(`{"n":1}`)},
	}
	u2 := &slidingsync.Update{
		Pos:        "p2",
		Lists:      map[string]slidingsync.ListState{"all": {Count: 3, Rooms: []id.RoomID{"!c:x", "!a:x", "!b:x"}}},
		Rooms:      map[id.RoomID]*slidingsync.RoomState{"!c:x": simpleRoom("!c:x", "c2"), "!a:x": simpleRoom("!a:x", "a2")},
		Extensions: map[string]json.RawMessage{"to_device": json.RawMessage(`{"since":"s2"}`)},
	}
	u3 := &slidingsync.Update{Pos: "p3"}
	want := (*slidingsync.Checkpoint)(nil)
	for _, u := range []*slidingsync.Update{u1, u2, u3} {
		h.commit(keyA, u)
		want = Apply(want, u)
		AssertEqual(t, want, h.load(keyA), "after %s", u.Pos)
	}
	got := h.load(keyA)
	assert.Equal(t, "p3", got.Pos)
	assert.Len(t, got.Rooms, 3)
	assert.Equal(t, "a2", got.Rooms["!a:x"].Name)
	assert.Equal(t, "b1", got.Rooms["!b:x"].Name)
	assert.JSONEq(t, `{"since":"s2"}`, string(got.Extensions["to_device"]))
	assert.JSONEq(t, `{"n":1}`, string(got.Extensions["e2ee"]))
	assert.Equal(t, 0, got.Lists["dms"].Count)
	assert.Equal(t, []id.RoomID{"!c:x", "!a:x", "!b:x"}, got.Lists["all"].Rooms)
}

func testRoomReplacedWhole(t *testing.T, h *harness) {
	full := simpleRoom("!a:x", "a1")
	full.MembersStale = true
	full.Heroes = []slidingsync.Hero{{UserID: "@h:x"}}
	h.commit(keyA, &slidingsync.Update{Pos: "1", Rooms: map[id.RoomID]*slidingsync.RoomState{"!a:x": full}})
	bare := &slidingsync.RoomState{ID: "!a:x", Name: "bare"}
	h.commit(keyA, &slidingsync.Update{Pos: "2", Rooms: map[id.RoomID]*slidingsync.RoomState{"!a:x": bare}})
	got := h.load(keyA).Rooms["!a:x"]
	require.NotNil(t, got)
	assert.Equal(t, "bare", got.Name)
	assert.False(t, got.MembersStale, "a stored room is replaced, not merged field by field")
	assert.Empty(t, got.Heroes)
	assert.Empty(t, got.Timeline)
	assert.Empty(t, got.State)
}

func testKeysIsolated(t *testing.T, h *harness) {
	keys := []slidingsync.ConnKey{
		keyA,
		{UserID: "@bob:example.org", DeviceID: keyA.DeviceID, ConnID: keyA.ConnID},
		{UserID: keyA.UserID, DeviceID: "OTHERDEV", ConnID: keyA.ConnID},
		{UserID: keyA.UserID, DeviceID: keyA.DeviceID, ConnID: "second"},
		{UserID: keyA.UserID, DeviceID: keyA.DeviceID, ConnID: ""},
	}
	wants := make([]*slidingsync.Checkpoint, len(keys))
	for i, key := range keys {
		marker := fmt.Sprintf("k%d", i)
		upd := &slidingsync.Update{
			Pos:        "pos-" + marker,
			Lists:      map[string]slidingsync.ListState{"all": {Count: i}},
			Rooms:      map[id.RoomID]*slidingsync.RoomState{"!shared:x": simpleRoom("!shared:x", marker)},
			Extensions: map[string]json.RawMessage{"to_device": json.RawMessage(`"` + marker + `"`)},
		}
		h.commit(key, upd)
		wants[i] = Apply(nil, upd)
	}
	for i, key := range keys {
		AssertEqual(t, wants[i], h.load(key), "key %+v", key)
	}
	assert.Empty(t, h.load(slidingsync.ConnKey{UserID: "@carol:example.org", DeviceID: keyA.DeviceID, ConnID: keyA.ConnID}).Pos)
}

func testExtensionCheckpoints(t *testing.T, h *harness) {
	u1 := &slidingsync.Update{Pos: "1", Extensions: map[string]json.RawMessage{
		"to_device": json.RawMessage(`{"since":"a"}`),
		"empty":     nil,
		"unicode":   json.RawMessage(`{"s":"é\u0000😀"}`),
	}}
	h.commit(keyA, u1)
	got := h.load(keyA)
	AssertEqual(t, Apply(nil, u1), got)
	assert.Contains(t, got.Extensions, "empty", "a nil checkpoint is still stored under its name")
	assert.Empty(t, got.Extensions["empty"])
	u2 := &slidingsync.Update{Pos: "2", Extensions: map[string]json.RawMessage{"empty": json.RawMessage(`[1]`)}}
	h.commit(keyA, u2)
	AssertEqual(t, Apply(Apply(nil, u1), u2), h.load(keyA))
}

type hookErr struct{}

func (hookErr) Error() string { return "hook failed on purpose" }

func testTxnHooks(t *testing.T, h *harness) {
	var calls []string
	var side bool
	h.with(func(o Opened) {
		side = o.Side != nil
		upd := &slidingsync.Update{Pos: "1", TxnHooks: []func(ctx context.Context) error{
			func(ctx context.Context) error {
				calls = append(calls, "first")
				if o.Side != nil {
					return o.Side.Put(ctx, "hook", "1")
				}
				return nil
			},
			func(ctx context.Context) error {
				calls = append(calls, "second")
				return nil
			},
		}}
		require.NoError(t, o.Store.Commit(context.Background(), keyA, upd))
	})
	assert.Equal(t, []string{"first", "second"}, calls, "every hook runs once, in order")
	assert.Equal(t, "1", h.load(keyA).Pos)
	if side {
		h.with(func(o Opened) {
			v, ok, err := o.Side.Get(context.Background(), "hook")
			require.NoError(t, err)
			assert.True(t, ok, "the hook's write was committed")
			assert.Equal(t, "1", v)
		})
	}
}

func testFailingHook(t *testing.T, h *harness) {
	base := &slidingsync.Update{
		Pos:        "1",
		Rooms:      map[id.RoomID]*slidingsync.RoomState{"!a:x": simpleRoom("!a:x", "a1")},
		Lists:      map[string]slidingsync.ListState{"all": {Count: 1, Rooms: []id.RoomID{"!a:x"}}},
		Extensions: map[string]json.RawMessage{"to_device": json.RawMessage(`"1"`)},
	}
	h.commit(keyA, base)
	var side bool
	h.with(func(o Opened) {
		side = o.Side != nil
		bad := &slidingsync.Update{
			Pos:        "2",
			Rooms:      map[id.RoomID]*slidingsync.RoomState{"!a:x": simpleRoom("!a:x", "a2"), "!b:x": simpleRoom("!b:x", "b2")},
			Lists:      map[string]slidingsync.ListState{"all": {Count: 2, Rooms: []id.RoomID{"!b:x", "!a:x"}}, "new": {Count: 5}},
			Extensions: map[string]json.RawMessage{"to_device": json.RawMessage(`"2"`), "e2ee": json.RawMessage(`{}`)},
			TxnHooks: []func(ctx context.Context) error{
				func(ctx context.Context) error {
					if o.Side != nil {
						return o.Side.Put(ctx, "failed", "2")
					}
					return nil
				},
				func(ctx context.Context) error { return hookErr{} },
			},
		}
		err := o.Store.Commit(context.Background(), keyA, bad)
		require.Error(t, err)
		assert.True(t, errors.Is(err, hookErr{}), "the hook's error is wrapped: %v", err)
	})
	AssertEqual(t, Apply(nil, base), h.load(keyA), "a failed hook commits nothing")
	if side {
		h.with(func(o Opened) {
			_, ok, err := o.Side.Get(context.Background(), "failed")
			require.NoError(t, err)
			assert.False(t, ok, "the write of the first hook was rolled back")
		})
	}
}

func testLargeUpdate(t *testing.T, h *harness) {
	n := 5000
	if testing.Short() {
		n = 1000
	}
	upd := &slidingsync.Update{Pos: "big", Rooms: make(map[id.RoomID]*slidingsync.RoomState, n)}
	window := make([]id.RoomID, 0, n)
	for i := range n {
		roomID := id.RoomID(fmt.Sprintf("!room%05d:example.org", i))
		upd.Rooms[roomID] = simpleRoom(roomID, fmt.Sprintf("r%d", i))
		window = append(window, roomID)
	}
	upd.Lists = map[string]slidingsync.ListState{"all": {Count: n, Rooms: window}}
	h.commit(keyA, upd)
	got := h.load(keyA)
	assert.Len(t, got.Rooms, n)
	AssertEqual(t, Apply(nil, upd), got)
	// An incremental update on top touches a few rooms only.
	small := &slidingsync.Update{Pos: "small", Rooms: map[id.RoomID]*slidingsync.RoomState{
		"!room00007:example.org": simpleRoom("!room00007:example.org", "changed"),
	}}
	h.commit(keyA, small)
	AssertEqual(t, Apply(Apply(nil, upd), small), h.load(keyA))
}

func testEventsRoundTrip(t *testing.T, h *harness) {
	create := mustEvent(`{"type":"m.room.create","state_key":"","sender":"@a:x","event_id":"$c","origin_server_ts":1,"content":{"creator":"@a:x","room_version":"11"}}`)
	member := mustEvent(`{"type":"m.room.member","state_key":"@b:x","sender":"@b:x","event_id":"$mb","origin_server_ts":2,"content":{"membership":"join","displayname":"B <b> & \"quotes\""},"unsigned":{"age":5,"prev_content":{"membership":"invite"}}}`)
	enc := mustEvent(`{"type":"m.room.encryption","state_key":"","sender":"@a:x","event_id":"$e","origin_server_ts":3,"content":{"algorithm":"m.megolm.v1.aes-sha2","rotation_period_ms":604800000}}`)
	custom := mustEvent(`{"type":"com.example.custom","state_key":"weird key ☃","sender":"@a:x","event_id":"$x","origin_server_ts":4,"content":{"nested":{"a":[1,2.5,null,true],"big":12345678901234567}}}`)
	msg := mustEvent(`{"type":"m.room.encrypted","sender":"@b:x","event_id":"$t1","origin_server_ts":10,"content":{"algorithm":"m.megolm.v1.aes-sha2","ciphertext":"AwgAEn...","session_id":"s","device_id":"D","sender_key":"k"}}`)
	redaction := mustEvent(`{"type":"m.room.redaction","sender":"@a:x","event_id":"$t2","origin_server_ts":11,"redacts":"$t1","content":{"redacts":"$t1","reason":"oops"}}`)
	invite := mustEvent(`{"type":"m.room.member","state_key":"@me:x","sender":"@a:x","content":{"membership":"invite"}}`)
	rs := &slidingsync.RoomState{
		ID:         "!rt:x",
		Name:       "Round ✓ trip",
		Avatar:     "mxc://x/avatar",
		Heroes:     []slidingsync.Hero{{UserID: "@b:x", DisplayName: "B", AvatarURL: "mxc://x/b"}, {UserID: "@c:x"}},
		IsDM:       true,
		Membership: event.MembershipJoin,
		State: map[slidingsync.StateKey]*event.Event{
			{Type: "m.room.create"}:                               create,
			{Type: "m.room.member", StateKey: "@b:x"}:             member,
			{Type: "m.room.encryption"}:                           enc,
			{Type: "com.example.custom", StateKey: "weird key ☃"}: custom,
		},
		Timeline:          []*event.Event{msg, redaction},
		PrevBatch:         "t123_456",
		Limited:           true,
		MembersStale:      true,
		NumLive:           2,
		JoinedCount:       7,
		InvitedCount:      1,
		NotificationCount: 3,
		HighlightCount:    1,
		BumpStamp:         1 << 40,
		InviteState:       []*event.Event{invite},
	}
	h.commit(keyA, &slidingsync.Update{Pos: "1", Rooms: map[id.RoomID]*slidingsync.RoomState{rs.ID: rs}})
	got := h.load(keyA).Rooms[rs.ID]
	require.NotNil(t, got)
	assert.Equal(t, rs.Name, got.Name)
	assert.Equal(t, rs.Avatar, got.Avatar)
	assert.Equal(t, rs.Heroes, got.Heroes)
	assert.True(t, got.IsDM)
	assert.Equal(t, event.MembershipJoin, got.Membership)
	assert.Equal(t, "t123_456", got.PrevBatch)
	assert.True(t, got.Limited)
	assert.True(t, got.MembersStale)
	assert.Equal(t, 2, got.NumLive)
	assert.Equal(t, 7, got.JoinedCount)
	assert.Equal(t, 1, got.InvitedCount)
	assert.Equal(t, 3, got.NotificationCount)
	assert.Equal(t, 1, got.HighlightCount)
	assert.Equal(t, int64(1<<40), got.BumpStamp)
	require.Len(t, got.State, 4)
	gotMember := got.StateEvent(event.StateMember, "@b:x")
	require.NotNil(t, gotMember)
	assert.Equal(t, id.EventID("$mb"), gotMember.ID)
	assert.Equal(t, `B <b> & "quotes"`, gotMember.Content.Raw["displayname"])
	require.NotNil(t, got.StateEvent(event.NewEventType("com.example.custom"), "weird key ☃"))
	require.Len(t, got.Timeline, 2)
	assert.Equal(t, id.EventID("$t1"), got.Timeline[0].ID)
	assert.Equal(t, id.EventID("$t1"), got.Timeline[1].Redacts)
	require.Len(t, got.InviteState, 1)
	assert.Equal(t, "@me:x", *got.InviteState[0].StateKey)
	want, err := json.Marshal(rs)
	require.NoError(t, err)
	have, err := json.Marshal(got)
	require.NoError(t, err)
	assert.JSONEq(t, string(want), string(have))
}

func testLoadReturnsCopies(t *testing.T, h *harness) {
	upd := &slidingsync.Update{
		Pos:        "1",
		Rooms:      map[id.RoomID]*slidingsync.RoomState{"!a:x": simpleRoom("!a:x", "a")},
		Lists:      map[string]slidingsync.ListState{"all": {Count: 1}},
		Extensions: map[string]json.RawMessage{"e": json.RawMessage(`1`)},
	}
	h.with(func(o Opened) {
		ctx := context.Background()
		require.NoError(t, o.Store.Commit(ctx, keyA, upd))
		// The store must not keep the update's maps.
		upd.Rooms["!b:x"] = simpleRoom("!b:x", "b")
		upd.Lists["other"] = slidingsync.ListState{}
		upd.Extensions["f"] = json.RawMessage(`2`)
		cp, err := o.Store.Load(ctx, keyA)
		require.NoError(t, err)
		cp.Rooms["!c:x"] = simpleRoom("!c:x", "c")
		cp.Lists["x"] = slidingsync.ListState{}
		cp.Extensions["g"] = nil
		again, err := o.Store.Load(ctx, keyA)
		require.NoError(t, err)
		assert.Len(t, again.Rooms, 1)
		assert.Len(t, again.Lists, 1)
		assert.Len(t, again.Extensions, 1)
	})
}

func testConcurrentKeys(t *testing.T, h *harness) {
	const workers, commits = 6, 4
	wants := make([]*slidingsync.Checkpoint, workers)
	keys := make([]slidingsync.ConnKey, workers)
	h.with(func(o Opened) {
		var wg sync.WaitGroup
		errs := make([]error, workers)
		for w := range workers {
			keys[w] = slidingsync.ConnKey{UserID: keyA.UserID, DeviceID: id.DeviceID(fmt.Sprintf("DEV%d", w)), ConnID: "c"}
			wg.Go(func() {
				var want *slidingsync.Checkpoint
				for i := range commits {
					marker := fmt.Sprintf("w%d-%d", w, i)
					upd := &slidingsync.Update{
						Pos:        marker,
						Rooms:      map[id.RoomID]*slidingsync.RoomState{id.RoomID(fmt.Sprintf("!r%d:x", i)): simpleRoom(id.RoomID(fmt.Sprintf("!r%d:x", i)), marker)},
						Extensions: map[string]json.RawMessage{"to_device": json.RawMessage(`"` + marker + `"`)},
					}
					if err := o.Store.Commit(context.Background(), keys[w], upd); err != nil {
						errs[w] = err
						return
					}
					want = Apply(want, upd)
				}
				wants[w] = want
			})
		}
		wg.Wait()
		for _, err := range errs {
			require.NoError(t, err)
		}
	})
	for w := range workers {
		AssertEqual(t, wants[w], h.load(keys[w]), "worker %d", w)
	}
}

// testRoomLoader checks LoadHead and LoadRooms of stores that implement RoomLoader: the head
// is Load without rooms, rooms are read by ID across more IDs than one query takes, and other
// connections' rooms are not returned.
func testRoomLoader(t *testing.T, h *harness) {
	h.with(func(o Opened) {
		if _, ok := o.Store.(slidingsync.RoomLoader); !ok {
			t.Skip("the store does not implement RoomLoader")
		}
	})
	n := 1200
	upd := &slidingsync.Update{
		Pos:        "p1",
		Lists:      map[string]slidingsync.ListState{"all": {Count: n}},
		Rooms:      make(map[id.RoomID]*slidingsync.RoomState, n),
		Extensions: map[string]json.RawMessage{"to_device": json.RawMessage(`{"since":"s1"}`)},
	}
	var ask []id.RoomID
	for i := range n {
		roomID := id.RoomID(fmt.Sprintf("!room%05d:example.org", i))
		upd.Rooms[roomID] = simpleRoom(roomID, fmt.Sprintf("r%d", i))
		if i%2 == 0 {
			ask = append(ask, roomID)
		}
	}
	h.commit(keyA, upd)
	keyB := slidingsync.ConnKey{UserID: keyA.UserID, DeviceID: keyA.DeviceID, ConnID: "second"}
	h.commit(keyB, &slidingsync.Update{Pos: "other", Rooms: map[id.RoomID]*slidingsync.RoomState{
		"!elsewhere:example.org": simpleRoom("!elsewhere:example.org", "b"),
	}})
	want := Apply(nil, upd)
	ask = append(ask, "!never:example.org", "!elsewhere:example.org")
	h.with(func(o Opened) {
		rl := o.Store.(slidingsync.RoomLoader)
		ctx := context.Background()
		head, err := rl.LoadHead(ctx, keyA)
		require.NoError(t, err)
		assert.Nil(t, head.Rooms)
		withoutRooms := *want
		withoutRooms.Rooms = nil
		AssertEqual(t, &withoutRooms, head)

		rooms, err := rl.LoadRooms(ctx, keyA, ask)
		require.NoError(t, err)
		assert.Len(t, rooms, n/2, "every stored room asked for, nothing else")
		got := &slidingsync.Checkpoint{Pos: want.Pos, Lists: want.Lists, Extensions: want.Extensions, Rooms: rooms}
		onlyAsked := *want
		onlyAsked.Rooms = make(map[id.RoomID]*slidingsync.RoomState)
		for _, roomID := range ask[:n/2] {
			onlyAsked.Rooms[roomID] = want.Rooms[roomID]
		}
		AssertEqual(t, &onlyAsked, got)

		none, err := rl.LoadRooms(ctx, keyA, nil)
		require.NoError(t, err)
		assert.NotNil(t, none)
		assert.Empty(t, none)

		empty, err := rl.LoadHead(ctx, slidingsync.ConnKey{UserID: "@nobody:x", DeviceID: "D"})
		require.NoError(t, err)
		assert.Empty(t, empty.Pos)
	})
}

// testOrigin: the origin is written by the update that sets it, survives updates that only
// move pos (the idle path of a SQL store) and is replaced by a later one.
func testOrigin(t *testing.T, h *harness) {
	h.commit(keyA, &slidingsync.Update{Pos: "p1", Origin: "msc3575 https://proxy.example.org"})
	assert.Equal(t, "msc3575 https://proxy.example.org", h.load(keyA).Origin)
	h.commit(keyA, &slidingsync.Update{Pos: "p2"})
	got := h.load(keyA)
	assert.Equal(t, "p2", got.Pos)
	assert.Equal(t, "msc3575 https://proxy.example.org", got.Origin, "a pos-only update keeps the origin")
	h.commit(keyA, &slidingsync.Update{Pos: "", Origin: "msc4186 https://hs.example.org"})
	got = h.load(keyA)
	assert.Equal(t, "", got.Pos)
	assert.Equal(t, "msc4186 https://hs.example.org", got.Origin)
}
