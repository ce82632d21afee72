package slidingsync

import (
	"encoding/json"
	"maps"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
)

const fuzzTimelineCap = 4

// fuzzPreviousRoom is a room with state, a full timeline, invite state and stale members,
// into which every fuzzed room entry is also merged.
func fuzzPreviousRoom(t testing.TB) *RoomState {
	t.Helper()
	rs := MergeRoom(nil, storyRoom, decodeRoomEntry(t, initialRich), fuzzTimelineCap)
	return MergeRoom(rs, storyRoom, decodeRoomEntry(t, `{"limited":true,"timeline":`+msgs(4, 9)+`}`), fuzzTimelineCap)
}

// expectedState replays required_state onto base the simple way: the oracle for MergeRoom.
func expectedState(base map[StateKey]*event.Event, r *RoomResponse) map[StateKey]*event.Event {
	out := maps.Clone(base)
	if out == nil {
		out = map[StateKey]*event.Event{}
	}
	for _, evt := range r.RequiredState {
		key := StateKey{Type: evt.Type.Type, StateKey: *evt.StateKey}
		if IsStateStub(evt) {
			delete(out, key)
		} else {
			out[key] = evt
		}
	}
	return out
}

// withoutTimeline is the part of a RoomState that merging the same entry twice must not change.
func withoutTimeline(rs *RoomState) RoomState {
	c := *rs
	c.Timeline = nil
	return c
}

// checkMergedRoom asserts what MergeRoom(old, roomID, r) must give whatever the entry held.
func checkMergedRoom(t *testing.T, old, got *RoomState, roomID id.RoomID, r *RoomResponse) {
	t.Helper()
	require.Equal(t, roomID, got.ID)
	require.LessOrEqual(t, len(got.Timeline), fuzzTimelineCap)
	initial := r.Initial || old == nil

	// The latest events of the entry end the timeline, in order.
	tail := r.Timeline[max(0, len(r.Timeline)-fuzzTimelineCap):]
	require.GreaterOrEqual(t, len(got.Timeline), len(tail))
	for i, evt := range tail {
		require.Same(t, evt, got.Timeline[len(got.Timeline)-len(tail)+i])
	}
	if initial || r.Limited || r.ExpandedTimeline {
		require.Len(t, got.Timeline, len(tail), "initial, limited and expanded entries replace the timeline")
	}

	var base map[StateKey]*event.Event
	if !initial {
		base = old.State
	}
	require.Equal(t, expectedState(base, r), got.State)

	wantName := ""
	switch {
	case r.Name.HasValue():
		wantName = r.Name.Val
	case !r.Name.Set && !initial && !emptyState(r, "m.room.name", "name"):
		wantName = old.Name
	}
	require.Equal(t, wantName, got.Name)

	if r.Limited {
		require.True(t, got.MembersStale)
	}
	if old != nil && old.MembersStale {
		require.True(t, got.MembersStale, "a merge never clears stale members")
	}

	// Merging the same entry again changes nothing but the timeline (which a non-initial,
	// non-limited entry appends to again); an initial entry is idempotent as a whole.
	twice := MergeRoom(got, roomID, r, fuzzTimelineCap)
	require.Equal(t, withoutTimeline(got), withoutTimeline(twice))
	if r.Initial {
		require.Equal(t, got, twice)
	}
}

func onlyOverwritingOps(lr ListResponse) bool {
	for _, op := range lr.Ops {
		if op.Op == ListOpInsert || op.Op == ListOpDelete {
			return false
		}
	}
	return true
}

func addResponseSeeds(f *testing.F) {
	for _, name := range fixtureNames(f, false) {
		f.Add(readFixture(f, name))
	}
}

func FuzzDecodeResponse(f *testing.F) {
	addResponseSeeds(f)
	prev := fuzzPreviousRoom(f)
	prevSnap := snapshotRoom(f, prev)
	prevList := ListState{Count: 6, Rooms: roomIDs("!a:x", "!b:x", "", "!d:x", "!e:x", "!f:x")}

	f.Fuzz(func(t *testing.T, body []byte) {
		resp, err := DecodeResponse(body)
		if err != nil {
			require.ErrorIs(t, err, ErrInvalidResponse)
			require.Nil(t, resp)
			return
		}
		require.NotEmpty(t, resp.Pos)

		for roomID, r := range resp.Rooms {
			fresh := MergeRoom(nil, roomID, r, fuzzTimelineCap)
			checkMergedRoom(t, nil, fresh, roomID, r)
			// Compacting changes the representation, never the state.
			full, err := json.Marshal(fresh)
			require.NoError(t, err)
			small, err := json.Marshal(compactRoom(fresh))
			require.NoError(t, err)
			require.JSONEq(t, string(full), string(small))

			merged := MergeRoom(prev, roomID, r, fuzzTimelineCap)
			checkMergedRoom(t, prev, merged, roomID, r)
			prevSnap.requireUnchanged(t, prev)
		}

		for name, lr := range resp.Lists {
			ls, err := MergeList(ListState{}, lr)
			if err != nil {
				require.True(t, lr.Count.HasValue() && lr.Count.Val < 0,
					"list %q: after Validate only a negative count may fail, got %v", name, err)
				continue
			}
			require.LessOrEqual(t, len(ls.Rooms), ls.Count)
			if n := len(ls.Rooms); n > 0 {
				require.NotEmpty(t, ls.Rooms[n-1], "trailing unknown positions are dropped")
			}
			if lr.Count.HasValue() {
				require.Equal(t, lr.Count.Val, ls.Count)
			}
			if onlyOverwritingOps(lr) {
				again, err := MergeList(ls, lr)
				require.NoError(t, err)
				require.Equal(t, ls, again, "SYNC and INVALIDATE are idempotent")
			}

			_, err = MergeList(prevList, lr)
			require.NoError(t, err)
			require.Equal(t, roomIDs("!a:x", "!b:x", "", "!d:x", "!e:x", "!f:x"), prevList.Rooms)
		}
	})
}

func addRequestSeeds(f *testing.F) {
	for _, name := range fixtureNames(f, true) {
		f.Add(fixtureQuery(f, name).Encode(), readFixture(f, name))
	}
}

func FuzzDecodeRequest(f *testing.F) {
	addRequestSeeds(f)
	f.Fuzz(func(t *testing.T, rawQuery string, body []byte) {
		query, _ := url.ParseQuery(rawQuery) // keeps what parsed, like a server would
		req, err := DecodeRequest(query, body)
		if err != nil {
			return
		}
		for _, p := range protocols {
			q1, b1, err := EncodeRequest(p, req)
			if err != nil {
				continue
			}
			// What we send, we can read back, and sending it again gives the same request.
			// (JSON-equal, not byte-equal: encoding/json writes an invalid UTF-8 byte as
			// "\ufffd" and the U+FFFD it decodes to as itself; see the corpus entry
			// invalid-utf8-pos-in-query.)
			req2, err := DecodeRequest(q1, b1)
			require.NoError(t, err, "%s: %s", p, b1)
			q2, b2, err := EncodeRequest(p, req2)
			require.NoError(t, err, "%s: %s", p, b1)
			require.Equal(t, q1, q2, "%s", p)
			require.JSONEq(t, string(b1), string(b2), "%s", p)
		}
	})
}

// TestFuzzCorpusIsWellFormed keeps the checked-in corpus loadable: a malformed entry makes
// `go test` fail with a less helpful message.
func TestFuzzCorpusIsWellFormed(t *testing.T) {
	for _, fuzzer := range []string{"FuzzDecodeResponse", "FuzzDecodeRequest"} {
		entries, err := os.ReadDir(filepath.Join("testdata", "fuzz", fuzzer))
		require.NoError(t, err)
		require.NotEmpty(t, entries, fuzzer)
		for _, e := range entries {
			data, err := os.ReadFile(filepath.Join("testdata", "fuzz", fuzzer, e.Name()))
			require.NoError(t, err)
			require.True(t, strings.HasPrefix(string(data), "go test fuzz v1\n"), "%s/%s", fuzzer, e.Name())
		}
	}
}
