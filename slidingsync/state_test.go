package slidingsync

import (
	"encoding/json"
	"fmt"
	"maps"
	"slices"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
)

const storyRoom id.RoomID = "!story:example.org"

// membersRefreshed is a pseudo entry for applyEntries: the crypto layer refreshed membership.
const membersRefreshed = "<members refreshed>"

// decodeRoomEntry decodes one room entry the way it arrives on the wire.
func decodeRoomEntry(t testing.TB, raw string) *RoomResponse {
	t.Helper()
	var r RoomResponse
	require.NoError(t, json.Unmarshal([]byte(raw), &r), "room entry %s", raw)
	return &r
}

// applyEntries merges the entries in order, starting from nothing.
func applyEntries(t testing.TB, timelineCap int, entries ...string) *RoomState {
	t.Helper()
	var rs *RoomState
	for _, e := range entries {
		if e == membersRefreshed {
			require.NotNil(t, rs)
			rs = rs.withMembersFresh()
			continue
		}
		rs = MergeRoom(rs, storyRoom, decodeRoomEntry(t, e), timelineCap)
	}
	return rs
}

// stateEvt returns the JSON of a state event; content is raw JSON.
func stateEvt(evtType, stateKey, content string) string {
	return fmt.Sprintf(`{"type":%q,"state_key":%q,"sender":"@alice:example.org","event_id":"$%s-%s","origin_server_ts":1700000000000,"content":%s}`,
		evtType, stateKey, strings.TrimPrefix(evtType, "m.room."), strings.TrimPrefix(stateKey, "@"), content)
}

// stub returns the JSON of a merged-MSC state stub (no content: the state was deleted).
func stub(evtType, stateKey string) string {
	return fmt.Sprintf(`{"type":%q,"state_key":%q}`, evtType, stateKey)
}

// msgs returns the JSON array of text messages $m<from>..$m<to>.
func msgs(from, to int) string {
	parts := make([]string, 0, to-from+1)
	for i := from; i <= to; i++ {
		parts = append(parts, fmt.Sprintf(`{"type":"m.room.message","sender":"@bob:example.org","event_id":"$m%d","origin_server_ts":%d,"content":{"msgtype":"m.text","body":"message %d"}}`, i, 1700000000000+i, i))
	}
	return "[" + strings.Join(parts, ",") + "]"
}

func timelineIDs(rs *RoomState) []id.EventID {
	out := make([]id.EventID, 0, len(rs.Timeline))
	for _, evt := range rs.Timeline {
		out = append(out, evt.ID)
	}
	return out
}

func msgIDs(from, to int) []id.EventID {
	out := make([]id.EventID, 0, to-from+1)
	for i := from; i <= to; i++ {
		out = append(out, id.EventID(fmt.Sprintf("$m%d", i)))
	}
	return out
}

func stateKeys(rs *RoomState) []StateKey {
	keys := slices.Collect(maps.Keys(rs.State))
	slices.SortFunc(keys, func(a, b StateKey) int {
		return strings.Compare(a.Type+"\x00"+a.StateKey, b.Type+"\x00"+b.StateKey)
	})
	return keys
}

func contentOf(t testing.TB, rs *RoomState, evtType, stateKey string) map[string]any {
	t.Helper()
	evt := rs.StateEvent(event.Type{Type: evtType}, stateKey)
	require.NotNil(t, evt, "no %s/%q in state", evtType, stateKey)
	return evt.Content.Raw
}

// roomSnapshot records a RoomState deeply enough to prove later that nothing in it changed:
// the struct, the containers (by element identity) and the JSON of everything they point to.
type roomSnapshot struct {
	value    RoomState
	state    map[StateKey]*event.Event
	timeline []*event.Event
	heroes   []Hero
	invite   []*event.Event
	encoded  []byte
}

func snapshotRoom(t testing.TB, rs *RoomState) roomSnapshot {
	t.Helper()
	encoded, err := json.Marshal(rs)
	require.NoError(t, err)
	return roomSnapshot{
		value:    *rs,
		state:    maps.Clone(rs.State),
		timeline: slices.Clone(rs.Timeline),
		heroes:   slices.Clone(rs.Heroes),
		invite:   slices.Clone(rs.InviteState),
		encoded:  encoded,
	}
}

func (s roomSnapshot) requireUnchanged(t testing.TB, rs *RoomState) {
	t.Helper()
	require.Equal(t, s.value, *rs, "struct fields changed")
	require.True(t, maps.Equal(s.state, rs.State), "state map changed: %v", stateKeys(rs))
	require.True(t, slices.Equal(s.timeline, rs.Timeline), "timeline slice changed")
	require.Equal(t, s.heroes, rs.Heroes, "heroes changed")
	require.True(t, slices.Equal(s.invite, rs.InviteState), "invite state changed")
	encoded, err := json.Marshal(rs)
	require.NoError(t, err)
	require.JSONEq(t, string(s.encoded), string(encoded), "an event or value reachable from the state changed")
}

var (
	initialRich = `{"initial":true,"name":"Project Falcon","avatar":"mxc://example.org/falcon",
		"heroes":[{"user_id":"@bob:example.org","displayname":"Bob"}],"is_dm":true,"membership":"join",
		"required_state":[` + stateEvt("m.room.create", "", `{"room_version":"11"}`) + `,` +
		stateEvt("m.room.name", "", `{"name":"Project Falcon"}`) + `,` +
		stateEvt("m.room.topic", "", `{"topic":"birds"}`) + `,` +
		stateEvt("m.room.member", "@alice:example.org", `{"membership":"join"}`) + `],
		"timeline":` + msgs(1, 3) + `,"prev_batch":"p1","num_live":1,"joined_count":2,"invited_count":1,
		"notification_count":4,"highlight_count":1,"bump_stamp":100,
		"invite_state":[` + stateEvt("m.room.name", "", `{"name":"Project Falcon"}`) + `]}`
)

func TestMergeRoom(t *testing.T) {
	tests := []struct {
		name    string
		cap     int
		entries []string
		check   func(t *testing.T, rs *RoomState)
	}{
		{
			name:    "the first entry of a room builds it from nothing even without initial",
			entries: []string{`{"name":"Lobby","timeline":` + msgs(1, 2) + `,"joined_count":3}`},
			check: func(t *testing.T, rs *RoomState) {
				assert.Equal(t, storyRoom, rs.ID)
				assert.Equal(t, "Lobby", rs.Name)
				assert.Equal(t, 3, rs.JoinedCount)
				assert.Equal(t, msgIDs(1, 2), timelineIDs(rs))
				assert.NotNil(t, rs.State, "a merged room always has a state map")
				assert.Empty(t, rs.State)
				assert.False(t, rs.MembersStale)
			},
		},
		{
			name:    "an initial entry carries every field it names",
			entries: []string{initialRich},
			check: func(t *testing.T, rs *RoomState) {
				assert.Equal(t, "Project Falcon", rs.Name)
				assert.Equal(t, id.ContentURIString("mxc://example.org/falcon"), rs.Avatar)
				assert.Equal(t, []Hero{{UserID: "@bob:example.org", DisplayName: "Bob"}}, rs.Heroes)
				assert.True(t, rs.IsDM)
				assert.Equal(t, event.MembershipJoin, rs.Membership)
				assert.Equal(t, "p1", rs.PrevBatch)
				assert.Equal(t, 1, rs.NumLive)
				assert.Equal(t, 2, rs.JoinedCount)
				assert.Equal(t, 1, rs.InvitedCount)
				assert.Equal(t, 4, rs.NotificationCount)
				assert.Equal(t, 1, rs.HighlightCount)
				assert.Equal(t, int64(100), rs.BumpStamp)
				assert.Len(t, rs.InviteState, 1)
				assert.Len(t, rs.State, 4)
				assert.Equal(t, "birds", contentOf(t, rs, "m.room.topic", "")["topic"])
				assert.Equal(t, msgIDs(1, 3), timelineIDs(rs))
			},
		},
		{
			name:    "a name known before and absent from an initial entry becomes empty",
			entries: []string{`{"initial":true,"name":"Old name","avatar":"mxc://example.org/a"}`, `{"initial":true,"avatar":"mxc://example.org/b"}`},
			check: func(t *testing.T, rs *RoomState) {
				assert.Equal(t, "", rs.Name)
				assert.Equal(t, id.ContentURIString("mxc://example.org/b"), rs.Avatar)
			},
		},
		{
			name: "Synapse: a removed name shows only as an empty m.room.name in required_state",
			entries: []string{initialRich, `{"required_state":[` + stateEvt("m.room.name", "", `{}`) + `,` +
				stateEvt("m.room.avatar", "", `{"url":""}`) + `]}`},
			check: func(t *testing.T, rs *RoomState) {
				assert.Equal(t, "", rs.Name)
				assert.Equal(t, id.ContentURIString(""), rs.Avatar)
			},
		},
		{
			name:    "Synapse: a name removed by a state event in the timeline",
			entries: []string{initialRich, `{"timeline":[` + stateEvt("m.room.name", "", `{"name":""}`) + `]}`},
			check: func(t *testing.T, rs *RoomState) {
				assert.Equal(t, "", rs.Name)
				assert.Equal(t, id.ContentURIString("mxc://example.org/falcon"), rs.Avatar)
			},
		},
		{
			name:    "a name event with a value leaves the name field to the server (it may be a computed name)",
			entries: []string{initialRich, `{"required_state":[` + stateEvt("m.room.name", "", `{"name":"Other"}`) + `]}`},
			check: func(t *testing.T, rs *RoomState) {
				assert.Equal(t, "Project Falcon", rs.Name)
			},
		},
		{
			name:    "a deleted name (a stub) removes it",
			entries: []string{initialRich, `{"required_state":[` + stub("m.room.name", "") + `]}`},
			check: func(t *testing.T, rs *RoomState) {
				assert.Equal(t, "", rs.Name)
			},
		},
		{
			name:    "an explicit name wins over the state event",
			entries: []string{initialRich, `{"name":"New","required_state":[` + stateEvt("m.room.name", "", `{}`) + `]}`},
			check: func(t *testing.T, rs *RoomState) {
				assert.Equal(t, "New", rs.Name)
			},
		},
		{
			name:    "Synapse: an expanded timeline replaces the kept one instead of appending",
			entries: []string{`{"initial":true,"timeline":` + msgs(5, 6) + `}`, `{"unstable_expanded_timeline":true,"timeline":` + msgs(1, 6) + `}`},
			check: func(t *testing.T, rs *RoomState) {
				assert.Equal(t, msgIDs(1, 6), timelineIDs(rs))
				assert.False(t, rs.MembersStale, "not a gap")
			},
		},
		{
			name:    "an initial entry that names nothing unsets everything the room had",
			entries: []string{initialRich, `{"initial":true}`},
			check: func(t *testing.T, rs *RoomState) {
				want := &RoomState{ID: storyRoom, State: map[StateKey]*event.Event{}}
				assert.Equal(t, want, rs)
			},
		},
		{
			name:    "a later entry without fields keeps everything",
			entries: []string{initialRich, `{}`},
			check: func(t *testing.T, rs *RoomState) {
				want := applyEntries(t, 0, initialRich)
				assert.Equal(t, want, rs)
			},
		},
		{
			name: "a later entry changes only the fields it names",
			entries: []string{initialRich, `{"name":"Falcon II","joined_count":3,"bump_stamp":120,"membership":"leave",
				"prev_batch":"p2","heroes":[{"user_id":"@carol:example.org"}],"is_dm":false,"num_live":0}`},
			check: func(t *testing.T, rs *RoomState) {
				assert.Equal(t, "Falcon II", rs.Name)
				assert.Equal(t, 3, rs.JoinedCount)
				assert.Equal(t, int64(120), rs.BumpStamp)
				assert.Equal(t, event.MembershipLeave, rs.Membership)
				assert.Equal(t, "p2", rs.PrevBatch)
				assert.Equal(t, []Hero{{UserID: "@carol:example.org"}}, rs.Heroes)
				assert.False(t, rs.IsDM, "an explicit false turns is_dm off")
				assert.Equal(t, 0, rs.NumLive, "an explicit 0 is a value, not an absence")
				// Untouched:
				assert.Equal(t, id.ContentURIString("mxc://example.org/falcon"), rs.Avatar)
				assert.Equal(t, 1, rs.InvitedCount)
				assert.Equal(t, 4, rs.NotificationCount)
				assert.Equal(t, 1, rs.HighlightCount)
				assert.Len(t, rs.InviteState, 1)
				assert.Len(t, rs.State, 4)
				assert.Equal(t, msgIDs(1, 3), timelineIDs(rs))
			},
		},
		{
			name:    "an explicit null name clears the name and leaves the avatar",
			entries: []string{initialRich, `{"name":null}`},
			check: func(t *testing.T, rs *RoomState) {
				assert.Equal(t, "", rs.Name)
				assert.Equal(t, id.ContentURIString("mxc://example.org/falcon"), rs.Avatar)
			},
		},
		{
			name:    "an explicit null avatar clears the avatar and leaves the name",
			entries: []string{initialRich, `{"avatar":null}`},
			check: func(t *testing.T, rs *RoomState) {
				assert.Equal(t, id.ContentURIString(""), rs.Avatar)
				assert.Equal(t, "Project Falcon", rs.Name)
			},
		},
		{
			name:    "explicit nulls clear heroes, counts, bump_stamp and invite_state",
			entries: []string{initialRich, `{"heroes":null,"joined_count":null,"notification_count":null,"bump_stamp":null,"invite_state":null,"prev_batch":null}`},
			check: func(t *testing.T, rs *RoomState) {
				assert.Nil(t, rs.Heroes)
				assert.Zero(t, rs.JoinedCount)
				assert.Zero(t, rs.NotificationCount)
				assert.Zero(t, rs.BumpStamp)
				assert.Nil(t, rs.InviteState)
				assert.Empty(t, rs.PrevBatch)
				assert.Equal(t, 1, rs.InvitedCount, "a field that was not nulled stays")
			},
		},
		{
			name:    "a state stub deletes that state and keeps the rest",
			entries: []string{initialRich, `{"required_state":[` + stub("m.room.topic", "") + `]}`},
			check: func(t *testing.T, rs *RoomState) {
				assert.Nil(t, rs.StateEvent(event.StateTopic, ""))
				assert.Equal(t, []StateKey{
					{Type: "m.room.create"},
					{Type: "m.room.member", StateKey: "@alice:example.org"},
					{Type: "m.room.name"},
				}, stateKeys(rs))
			},
		},
		{
			name:    "a state stub for state never seen changes nothing",
			entries: []string{initialRich, `{"required_state":[` + stub("m.room.pinned_events", "") + `]}`},
			check: func(t *testing.T, rs *RoomState) {
				assert.Len(t, rs.State, 4)
			},
		},
		{
			name: "a stub in an initial entry leaves the state without that key",
			entries: []string{initialRich, `{"initial":true,"required_state":[` + stub("m.room.topic", "") + `,` +
				stateEvt("m.room.create", "", `{"room_version":"11"}`) + `]}`},
			check: func(t *testing.T, rs *RoomState) {
				assert.Equal(t, []StateKey{{Type: "m.room.create"}}, stateKeys(rs))
			},
		},
		{
			name:    "state with empty content is state, not a stub",
			entries: []string{`{"initial":true,"required_state":[` + stateEvt("m.room.create", "", `{}`) + `]}`},
			check: func(t *testing.T, rs *RoomState) {
				evt := rs.StateEvent(event.StateCreate, "")
				require.NotNil(t, evt)
				assert.False(t, IsStateStub(evt))
			},
		},
		{
			name: "required_state of a later entry is merged into the previous state",
			entries: []string{initialRich, `{"required_state":[` +
				stateEvt("m.room.member", "@bob:example.org", `{"membership":"join"}`) + `,` +
				stateEvt("m.room.name", "", `{"name":"Falcon II"}`) + `]}`},
			check: func(t *testing.T, rs *RoomState) {
				assert.Len(t, rs.State, 5, "create, name, topic, alice, bob")
				assert.Equal(t, "Falcon II", contentOf(t, rs, "m.room.name", "")["name"])
				assert.Equal(t, "join", contentOf(t, rs, "m.room.member", "@bob:example.org")["membership"])
				assert.Equal(t, "birds", contentOf(t, rs, "m.room.topic", "")["topic"])
				assert.Equal(t, "Project Falcon", rs.Name, "the name field follows the name field, not the state")
			},
		},
		{
			name: "required_state of an initial entry replaces the previous state",
			entries: []string{initialRich, `{"initial":true,"required_state":[` +
				stateEvt("m.room.member", "@bob:example.org", `{"membership":"join"}`) + `]}`},
			check: func(t *testing.T, rs *RoomState) {
				assert.Equal(t, []StateKey{{Type: "m.room.member", StateKey: "@bob:example.org"}}, stateKeys(rs))
			},
		},
		{
			name: "when one entry names a key twice the later one wins",
			entries: []string{initialRich, `{"required_state":[` +
				stub("m.room.topic", "") + `,` + stateEvt("m.room.topic", "", `{"topic":"fish"}`) + `,` +
				stateEvt("m.room.name", "", `{"name":"x"}`) + `,` + stub("m.room.name", "") + `]}`},
			check: func(t *testing.T, rs *RoomState) {
				assert.Equal(t, "fish", contentOf(t, rs, "m.room.topic", "")["topic"])
				assert.Nil(t, rs.StateEvent(event.StateRoomName, ""))
			},
		},
		{
			name: "state keys are compared exactly: a member stub removes only that member",
			entries: []string{`{"initial":true,"required_state":[` +
				stateEvt("m.room.member", "@alice:example.org", `{"membership":"join"}`) + `,` +
				stateEvt("m.room.member", "@bob:example.org", `{"membership":"join"}`) + `]}`,
				`{"required_state":[` + stub("m.room.member", "@bob:example.org") + `]}`},
			check: func(t *testing.T, rs *RoomState) {
				assert.Equal(t, []StateKey{{Type: "m.room.member", StateKey: "@alice:example.org"}}, stateKeys(rs))
			},
		},
		{
			name:    "non-limited timelines append in order",
			entries: []string{`{"initial":true,"timeline":` + msgs(1, 2) + `}`, `{"timeline":` + msgs(3, 3) + `}`, `{"timeline":` + msgs(4, 5) + `}`},
			check: func(t *testing.T, rs *RoomState) {
				assert.Equal(t, msgIDs(1, 5), timelineIDs(rs))
				assert.False(t, rs.Limited)
				assert.False(t, rs.MembersStale)
			},
		},
		{
			name:    "an entry without timeline keeps the timeline and the limited flag",
			entries: []string{`{"initial":true,"limited":true,"timeline":` + msgs(1, 2) + `}`, `{"joined_count":5}`},
			check: func(t *testing.T, rs *RoomState) {
				assert.Equal(t, msgIDs(1, 2), timelineIDs(rs))
				assert.True(t, rs.Limited)
			},
		},
		{
			name:    "limited replaces the kept timeline and marks members stale",
			entries: []string{`{"initial":true,"timeline":` + msgs(1, 3) + `}`, `{"limited":true,"timeline":` + msgs(10, 11) + `,"prev_batch":"gap"}`},
			check: func(t *testing.T, rs *RoomState) {
				assert.Equal(t, msgIDs(10, 11), timelineIDs(rs))
				assert.True(t, rs.Limited)
				assert.True(t, rs.MembersStale)
				assert.Equal(t, "gap", rs.PrevBatch)
			},
		},
		{
			name:    "a limited initial entry marks members stale too",
			entries: []string{`{"initial":true,"limited":true,"timeline":` + msgs(1, 1) + `}`},
			check: func(t *testing.T, rs *RoomState) {
				assert.True(t, rs.Limited)
				assert.True(t, rs.MembersStale)
			},
		},
		{
			name:    "the limited flag follows the latest timeline but stale members stay stale",
			entries: []string{`{"initial":true,"timeline":` + msgs(1, 1) + `}`, `{"limited":true,"timeline":` + msgs(5, 5) + `}`, `{"timeline":` + msgs(6, 6) + `}`},
			check: func(t *testing.T, rs *RoomState) {
				assert.False(t, rs.Limited)
				assert.True(t, rs.MembersStale)
				assert.Equal(t, msgIDs(5, 6), timelineIDs(rs))
			},
		},
		{
			name:    "stale members survive an initial entry",
			entries: []string{`{"initial":true,"timeline":` + msgs(1, 1) + `}`, `{"limited":true,"timeline":` + msgs(5, 5) + `}`, `{"initial":true,"timeline":` + msgs(6, 6) + `}`},
			check: func(t *testing.T, rs *RoomState) {
				assert.False(t, rs.Limited)
				assert.True(t, rs.MembersStale, "a gap is closed only by a member refresh")
			},
		},
		{
			name: "a merge never clears stale members, and the next gap marks them again",
			entries: []string{`{"initial":true,"limited":true,"timeline":` + msgs(1, 1) + `}`, membersRefreshed,
				`{"timeline":` + msgs(2, 2) + `}`},
			check: func(t *testing.T, rs *RoomState) {
				assert.False(t, rs.MembersStale)
				again := MergeRoom(rs, storyRoom, decodeRoomEntry(t, `{"limited":true,"timeline":`+msgs(9, 9)+`}`), 0)
				assert.True(t, again.MembersStale)
				assert.False(t, rs.MembersStale, "the refreshed snapshot is not touched")
			},
		},
		{
			name:    "appending past the cap keeps the latest events",
			cap:     3,
			entries: []string{`{"initial":true,"timeline":` + msgs(1, 2) + `}`, `{"timeline":` + msgs(3, 4) + `}`},
			check: func(t *testing.T, rs *RoomState) {
				assert.Equal(t, msgIDs(2, 4), timelineIDs(rs))
			},
		},
		{
			name:    "one entry with more events than the cap keeps its latest",
			cap:     3,
			entries: []string{`{"initial":true,"timeline":` + msgs(1, 2) + `}`, `{"timeline":` + msgs(3, 8) + `}`},
			check: func(t *testing.T, rs *RoomState) {
				assert.Equal(t, msgIDs(6, 8), timelineIDs(rs))
			},
		},
		{
			name:    "an initial entry is capped too",
			cap:     2,
			entries: []string{`{"initial":true,"timeline":` + msgs(1, 5) + `}`},
			check: func(t *testing.T, rs *RoomState) {
				assert.Equal(t, msgIDs(4, 5), timelineIDs(rs))
			},
		},
		{
			name:    "a zero cap means defaultTimelineCap",
			cap:     0,
			entries: []string{`{"initial":true,"timeline":` + msgs(1, 15) + `}`, `{"timeline":` + msgs(16, 30) + `}`},
			check: func(t *testing.T, rs *RoomState) {
				assert.Equal(t, msgIDs(30-defaultTimelineCap+1, 30), timelineIDs(rs))
			},
		},
		{
			name:    "a negative cap means defaultTimelineCap",
			cap:     -1,
			entries: []string{`{"initial":true,"timeline":` + msgs(1, 25) + `}`},
			check: func(t *testing.T, rs *RoomState) {
				assert.Len(t, rs.Timeline, defaultTimelineCap)
				assert.Equal(t, id.EventID("$m25"), rs.Timeline[defaultTimelineCap-1].ID)
			},
		},
		{
			name:    "an initial entry replaces the timeline even when not limited",
			entries: []string{`{"initial":true,"timeline":` + msgs(1, 3) + `}`, `{"initial":true,"timeline":` + msgs(7, 8) + `}`},
			check: func(t *testing.T, rs *RoomState) {
				assert.Equal(t, msgIDs(7, 8), timelineIDs(rs))
			},
		},
		{
			name:    "an initial entry without timeline empties the timeline",
			entries: []string{`{"initial":true,"timeline":` + msgs(1, 3) + `}`, `{"initial":true,"name":"x"}`},
			check: func(t *testing.T, rs *RoomState) {
				assert.Empty(t, rs.Timeline)
			},
		},
		{
			name:    "Synapse's zero notification and highlight counts are values",
			entries: []string{initialRich, `{"notification_count":0,"highlight_count":0,"joined_count":2,"invited_count":0}`},
			check: func(t *testing.T, rs *RoomState) {
				assert.Zero(t, rs.NotificationCount)
				assert.Zero(t, rs.HighlightCount)
				assert.Zero(t, rs.InvitedCount)
			},
		},
		{
			name:    "counts absent from a merged-MSC entry stay as they were",
			entries: []string{initialRich, `{"bump_stamp":150,"timeline":` + msgs(4, 4) + `}`},
			check: func(t *testing.T, rs *RoomState) {
				assert.Equal(t, 4, rs.NotificationCount)
				assert.Equal(t, 1, rs.HighlightCount)
				assert.Equal(t, 2, rs.JoinedCount)
				assert.Equal(t, int64(150), rs.BumpStamp)
			},
		},
		{
			name:    "bump_stamp may go down",
			entries: []string{initialRich, `{"bump_stamp":90}`},
			check: func(t *testing.T, rs *RoomState) {
				assert.Equal(t, int64(90), rs.BumpStamp)
			},
		},
		{
			name:    "heroes are replaced as a whole",
			entries: []string{`{"initial":true,"heroes":[{"user_id":"@a:x"},{"user_id":"@b:x"}]}`, `{"heroes":[{"user_id":"@c:x","avatar_url":"mxc://x/c"}]}`},
			check: func(t *testing.T, rs *RoomState) {
				assert.Equal(t, []Hero{{UserID: "@c:x", AvatarURL: "mxc://x/c"}}, rs.Heroes)
			},
		},
		{
			name:    "is_dm absent from a later entry keeps the room a DM",
			entries: []string{`{"initial":true,"is_dm":true}`, `{"timeline":` + msgs(1, 1) + `}`},
			check: func(t *testing.T, rs *RoomState) {
				assert.True(t, rs.IsDM)
			},
		},
		{
			name: "an invite keeps its stripped state until the join replaces the room",
			entries: []string{
				`{"initial":true,"membership":"invite","bump_stamp":5,"stripped_state":[` + stateEvt("m.room.name", "", `{"name":"Secret"}`) + `]}`,
				`{"bump_stamp":6}`,
			},
			check: func(t *testing.T, rs *RoomState) {
				require.Len(t, rs.InviteState, 1)
				assert.Equal(t, event.MembershipInvite, rs.Membership)
				joined := MergeRoom(rs, storyRoom, decodeRoomEntry(t, `{"initial":true,"membership":"join","name":"Secret","timeline":`+msgs(1, 1)+`}`), 0)
				assert.Nil(t, joined.InviteState)
				assert.Equal(t, event.MembershipJoin, joined.Membership)
				assert.Equal(t, "Secret", joined.Name)
				assert.Zero(t, joined.BumpStamp, "the initial join entry did not carry bump_stamp")
			},
		},
		{
			name:    "prev_batch follows the latest entry that carried one",
			entries: []string{`{"initial":true,"prev_batch":"p1","timeline":` + msgs(1, 1) + `}`, `{"timeline":` + msgs(2, 2) + `}`, `{"prev_batch":"p3","timeline":` + msgs(3, 3) + `}`},
			check: func(t *testing.T, rs *RoomState) {
				assert.Equal(t, "p3", rs.PrevBatch)
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rs := applyEntries(t, tt.cap, tt.entries...)
			require.NotNil(t, rs)
			assert.Equal(t, storyRoom, rs.ID)
			tt.check(t, rs)
		})
	}
}

func TestMergeRoomSetsIDFromArgument(t *testing.T) {
	old := &RoomState{ID: "!other:example.org", Name: "x"}
	got := MergeRoom(old, storyRoom, decodeRoomEntry(t, `{}`), 0)
	assert.Equal(t, storyRoom, got.ID)
	assert.Equal(t, "x", got.Name)
}

func TestMergeRoomLeavesOldStateUntouched(t *testing.T) {
	entries := map[string]string{
		"nothing":           `{}`,
		"initial":           initialRich,
		"initial and empty": `{"initial":true}`,
		"nulls":             `{"name":null,"avatar":null,"heroes":null,"invite_state":null,"joined_count":null}`,
		"new values":        `{"name":"n","avatar":"mxc://x/y","heroes":[{"user_id":"@z:x"}],"is_dm":false,"membership":"ban","bump_stamp":1,"invite_state":[]}`,
		"state changes": `{"required_state":[` + stub("m.room.topic", "") + `,` +
			stateEvt("m.room.name", "", `{"name":"changed"}`) + `,` + stateEvt("m.room.member", "@new:example.org", `{"membership":"join"}`) + `]}`,
		"append":            `{"timeline":` + msgs(4, 5) + `}`,
		"append past cap":   `{"timeline":` + msgs(4, 40) + `}`,
		"limited":           `{"limited":true,"timeline":` + msgs(9, 9) + `}`,
		"limited and empty": `{"limited":true}`,
	}
	for name, entry := range entries {
		t.Run(name, func(t *testing.T) {
			old := applyEntries(t, 4, initialRich)
			// Give the old state a spare capacity in its timeline: an append that reuses the
			// backing array would overwrite what a reader of old can see.
			old.Timeline = append(make([]*event.Event, 0, 64), old.Timeline...)
			snap := snapshotRoom(t, old)
			r := decodeRoomEntry(t, entry)
			got := MergeRoom(old, storyRoom, r, 4)
			require.NotSame(t, old, got)
			snap.requireUnchanged(t, old)
			// Merging the old snapshot again gives the same result: nothing hidden was consumed.
			again := MergeRoom(old, storyRoom, r, 4)
			assert.Equal(t, snapshotRoom(t, got).encoded, snapshotRoom(t, again).encoded)
		})
	}
}

func TestMergeRoomDoesNotAliasTheResponseTimeline(t *testing.T) {
	r := decodeRoomEntry(t, `{"initial":true,"timeline":`+msgs(1, 3)+`}`)
	rs := MergeRoom(nil, storyRoom, r, 0)
	r.Timeline[0] = nil
	assert.Equal(t, msgIDs(1, 3), timelineIDs(rs))
}

func TestRoomStateJSONRoundTrip(t *testing.T) {
	rs := applyEntries(t, 0, initialRich, `{"limited":true,"timeline":`+msgs(7, 8)+`,"required_state":[`+stub("m.room.topic", "")+`]}`)
	require.True(t, rs.MembersStale)

	data, err := json.Marshal(rs)
	require.NoError(t, err)

	var wire map[string]any
	require.NoError(t, json.Unmarshal(data, &wire))
	require.Contains(t, wire, "required_state")
	var order []string
	for _, e := range wire["required_state"].([]any) {
		m := e.(map[string]any)
		order = append(order, m["type"].(string)+"|"+m["state_key"].(string))
	}
	assert.Equal(t, []string{"m.room.create|", "m.room.member|@alice:example.org", "m.room.name|"}, order, "state is sorted by type and key")
	assert.NotContains(t, wire, "State")
	assert.Equal(t, true, wire["members_stale"])

	var back RoomState
	require.NoError(t, json.Unmarshal(data, &back))
	assert.Equal(t, rs.ID, back.ID)
	assert.Equal(t, rs.Name, back.Name)
	assert.Equal(t, rs.Avatar, back.Avatar)
	assert.Equal(t, rs.Heroes, back.Heroes)
	assert.Equal(t, rs.IsDM, back.IsDM)
	assert.Equal(t, rs.Membership, back.Membership)
	assert.Equal(t, rs.PrevBatch, back.PrevBatch)
	assert.Equal(t, rs.Limited, back.Limited)
	assert.Equal(t, rs.MembersStale, back.MembersStale)
	assert.Equal(t, rs.NumLive, back.NumLive)
	assert.Equal(t, rs.JoinedCount, back.JoinedCount)
	assert.Equal(t, rs.InvitedCount, back.InvitedCount)
	assert.Equal(t, rs.NotificationCount, back.NotificationCount)
	assert.Equal(t, rs.HighlightCount, back.HighlightCount)
	assert.Equal(t, rs.BumpStamp, back.BumpStamp)
	assert.Equal(t, stateKeys(rs), stateKeys(&back))
	assert.Equal(t, "Project Falcon", contentOf(t, &back, "m.room.name", "")["name"])
	assert.Equal(t, msgIDs(7, 8), timelineIDs(&back))
	require.Len(t, back.InviteState, 1)

	// Equal states encode to equal bytes, so a second round trip is byte-stable.
	again, err := json.Marshal(&back)
	require.NoError(t, err)
	assert.JSONEq(t, string(data), string(again))
	third, err := json.Marshal(&back)
	require.NoError(t, err)
	assert.Equal(t, string(again), string(third))
}

func TestRoomStateJSONInsideACheckpointMap(t *testing.T) {
	rooms := map[id.RoomID]*RoomState{storyRoom: applyEntries(t, 0, initialRich), "!gone:example.org": nil}
	data, err := json.Marshal(rooms)
	require.NoError(t, err)
	var back map[id.RoomID]*RoomState
	require.NoError(t, json.Unmarshal(data, &back))
	require.Contains(t, back, storyRoom)
	assert.Len(t, back[storyRoom].State, 4)
	assert.Nil(t, back["!gone:example.org"])
}

func TestRoomStateUnmarshalRejectsStateWithoutKey(t *testing.T) {
	var rs RoomState
	err := json.Unmarshal([]byte(`{"room_id":"!a:x","required_state":[{"type":"m.room.name","content":{"name":"x"}}]}`), &rs)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "state_key")
	err = json.Unmarshal([]byte(`{"room_id":"!a:x","required_state":[null]}`), &rs)
	require.Error(t, err)
}

func TestRoomStateUnmarshalWithoutStateGivesEmptyMap(t *testing.T) {
	var rs RoomState
	require.NoError(t, json.Unmarshal([]byte(`{"room_id":"!a:x","name":"n"}`), &rs))
	assert.NotNil(t, rs.State)
	assert.Empty(t, rs.State)
	assert.Equal(t, "n", rs.Name)
	// A room restored from JSON merges like any other.
	got := MergeRoom(&rs, "!a:x", decodeRoomEntry(t, `{"required_state":[`+stateEvt("m.room.topic", "", `{"topic":"t"}`)+`]}`), 0)
	assert.Len(t, got.State, 1)
	assert.Empty(t, rs.State)
}

func TestStateEventOnNilRoom(t *testing.T) {
	var rs *RoomState
	assert.Nil(t, rs.StateEvent(event.StateRoomName, ""))
}

// listResp decodes a list's part of a response.
func listResp(t testing.TB, raw string) ListResponse {
	t.Helper()
	var lr ListResponse
	require.NoError(t, json.Unmarshal([]byte(raw), &lr), "list response %s", raw)
	return lr
}

func roomIDs(ids ...string) []id.RoomID {
	out := make([]id.RoomID, len(ids))
	for i, s := range ids {
		out[i] = id.RoomID(s)
	}
	return out
}

func TestMergeList(t *testing.T) {
	tests := []struct {
		name string
		old  ListState
		lr   string
		want ListState
	}{
		{
			name: "a SYNC fills an empty list",
			lr:   `{"count":3,"ops":[{"op":"SYNC","range":[0,2],"room_ids":["!a","!b","!c"]}]}`,
			want: ListState{Count: 3, Rooms: roomIDs("!a", "!b", "!c")},
		},
		{
			name: "a SYNC replaces what was known in its range only",
			old:  ListState{Count: 6, Rooms: roomIDs("!a", "!b", "!c", "!d", "!e", "!f")},
			lr:   `{"count":6,"ops":[{"op":"SYNC","range":[1,2],"room_ids":["!x","!y"]}]}`,
			want: ListState{Count: 6, Rooms: roomIDs("!a", "!x", "!y", "!d", "!e", "!f")},
		},
		{
			name: "a SYNC of fewer room IDs than its range blanks the rest of the range",
			old:  ListState{Count: 6, Rooms: roomIDs("!a", "!b", "!c", "!d", "!e", "!f")},
			lr:   `{"count":6,"ops":[{"op":"SYNC","range":[0,2],"room_ids":["!x"]}]}`,
			want: ListState{Count: 6, Rooms: roomIDs("!x", "", "", "!d", "!e", "!f")},
		},
		{
			name: "Synapse's SYNC over a range wider than the list is cut to the count",
			lr:   `{"count":2,"ops":[{"op":"SYNC","range":[0,19],"room_ids":["!a","!b"]}]}`,
			want: ListState{Count: 2, Rooms: roomIDs("!a", "!b")},
		},
		{
			name: "Synapse echoes a requested range ending past maxWindowIndex",
			lr:   `{"count":2,"ops":[{"op":"SYNC","range":[0,999999],"room_ids":["!a","!b"]}]}`,
			want: ListState{Count: 2, Rooms: roomIDs("!a", "!b")},
		},
		{
			name: "an INVALIDATE of a range ending past maxWindowIndex clears what is known",
			old:  ListState{Count: 2, Rooms: roomIDs("!a", "!b")},
			lr:   `{"count":2,"ops":[{"op":"INVALIDATE","range":[1,9007199254740991]}]}`,
			want: ListState{Count: 2, Rooms: roomIDs("!a")},
		},
		{
			name: "Synapse sends one SYNC per range, leaving a gap between them",
			lr: `{"count":30,"ops":[{"op":"SYNC","range":[0,1],"room_ids":["!a","!b"]},
				{"op":"SYNC","range":[10,11],"room_ids":["!k","!l"]}]}`,
			want: ListState{Count: 30, Rooms: roomIDs("!a", "!b", "", "", "", "", "", "", "", "", "!k", "!l")},
		},
		{
			name: "Synapse's SYNC for an empty list leaves it empty",
			old:  ListState{Count: 1, Rooms: roomIDs("!a")},
			lr:   `{"count":0,"ops":[{"op":"SYNC","range":[0,9],"room_ids":[]}]}`,
			want: ListState{Count: 0},
		},
		{
			name: "the same Synapse SYNC every response changes nothing",
			old:  ListState{Count: 2, Rooms: roomIDs("!a", "!b")},
			lr:   `{"count":2,"ops":[{"op":"SYNC","range":[0,19],"room_ids":["!a","!b"]}]}`,
			want: ListState{Count: 2, Rooms: roomIDs("!a", "!b")},
		},
		{
			name: "INVALIDATE blanks its range and trailing blanks are dropped",
			old:  ListState{Count: 4, Rooms: roomIDs("!a", "!b", "!c", "!d")},
			lr:   `{"ops":[{"op":"INVALIDATE","range":[2,3]}]}`,
			want: ListState{Count: 4, Rooms: roomIDs("!a", "!b")},
		},
		{
			name: "INVALIDATE in the middle keeps positions",
			old:  ListState{Count: 4, Rooms: roomIDs("!a", "!b", "!c", "!d")},
			lr:   `{"ops":[{"op":"INVALIDATE","range":[1,2]}]}`,
			want: ListState{Count: 4, Rooms: roomIDs("!a", "", "", "!d")},
		},
		{
			name: "INVALIDATE of everything gives no window",
			old:  ListState{Count: 2, Rooms: roomIDs("!a", "!b")},
			lr:   `{"ops":[{"op":"INVALIDATE","range":[0,99]}]}`,
			want: ListState{Count: 2},
		},
		{
			name: "DELETE removes an index and shifts the rest left",
			old:  ListState{Count: 3, Rooms: roomIDs("!a", "!b", "!c")},
			lr:   `{"count":2,"ops":[{"op":"DELETE","index":0}]}`,
			want: ListState{Count: 2, Rooms: roomIDs("!b", "!c")},
		},
		{
			name: "DELETE past the known window does nothing",
			old:  ListState{Count: 5, Rooms: roomIDs("!a", "!b")},
			lr:   `{"ops":[{"op":"DELETE","index":4}]}`,
			want: ListState{Count: 5, Rooms: roomIDs("!a", "!b")},
		},
		{
			name: "INSERT without DELETE shifts the rest right",
			old:  ListState{Count: 2, Rooms: roomIDs("!a", "!b")},
			lr:   `{"count":3,"ops":[{"op":"INSERT","index":0,"room_id":"!x"}]}`,
			want: ListState{Count: 3, Rooms: roomIDs("!x", "!a", "!b")},
		},
		{
			name: "INSERT past the known window pads with unknown positions",
			old:  ListState{Count: 5, Rooms: roomIDs("!a")},
			lr:   `{"ops":[{"op":"INSERT","index":3,"room_id":"!x"}]}`,
			want: ListState{Count: 5, Rooms: roomIDs("!a", "", "", "!x")},
		},
		{
			name: "the proxy's DELETE+INSERT at 0 on an empty list adds the first room (fixture 06)",
			old:  ListState{Count: 0},
			lr:   `{"ops":[{"op":"DELETE","index":0},{"op":"INSERT","index":0,"room_id":"!lgAhHZPdlTcWrIzX:localhost"}],"count":1}`,
			want: ListState{Count: 1, Rooms: roomIDs("!lgAhHZPdlTcWrIzX:localhost")},
		},
		{
			name: "DELETE+INSERT moves a room up, shifting the ones between down",
			old:  ListState{Count: 5, Rooms: roomIDs("!a", "!b", "!c", "!d", "!e")},
			lr:   `{"count":5,"ops":[{"op":"DELETE","index":3},{"op":"INSERT","index":0,"room_id":"!d"}]}`,
			want: ListState{Count: 5, Rooms: roomIDs("!d", "!a", "!b", "!c", "!e")},
		},
		{
			name: "DELETE+INSERT moves a room down, shifting the ones between up",
			old:  ListState{Count: 5, Rooms: roomIDs("!a", "!b", "!c", "!d", "!e")},
			lr:   `{"count":5,"ops":[{"op":"DELETE","index":1},{"op":"INSERT","index":3,"room_id":"!b"}]}`,
			want: ListState{Count: 5, Rooms: roomIDs("!a", "!c", "!d", "!b", "!e")},
		},
		{
			name: "a room from outside the window pushes the last one out",
			old:  ListState{Count: 10, Rooms: roomIDs("!a", "!b", "!c")},
			lr:   `{"count":11,"ops":[{"op":"DELETE","index":2},{"op":"INSERT","index":0,"room_id":"!new"}]}`,
			want: ListState{Count: 11, Rooms: roomIDs("!new", "!a", "!b")},
		},
		{
			name: "a shrinking count trims the window",
			old:  ListState{Count: 5, Rooms: roomIDs("!a", "!b", "!c", "!d", "!e")},
			lr:   `{"count":2}`,
			want: ListState{Count: 2, Rooms: roomIDs("!a", "!b")},
		},
		{
			name: "a count of zero empties the window",
			old:  ListState{Count: 2, Rooms: roomIDs("!a", "!b")},
			lr:   `{"count":0}`,
			want: ListState{Count: 0},
		},
		{
			name: "an absent count keeps the count",
			old:  ListState{Count: 7, Rooms: roomIDs("!a", "!b")},
			lr:   `{"ops":[{"op":"SYNC","range":[2,2],"room_ids":["!c"]}]}`,
			want: ListState{Count: 7, Rooms: roomIDs("!a", "!b", "!c")},
		},
		{
			name: "a null count keeps the count",
			old:  ListState{Count: 7, Rooms: roomIDs("!a")},
			lr:   `{"count":null}`,
			want: ListState{Count: 7, Rooms: roomIDs("!a")},
		},
		{
			name: "a growing count keeps the window",
			old:  ListState{Count: 1, Rooms: roomIDs("!a")},
			lr:   `{"count":100}`,
			want: ListState{Count: 100, Rooms: roomIDs("!a")},
		},
		{
			name: "an unknown op is skipped and the rest applies",
			old:  ListState{Count: 2, Rooms: roomIDs("!a", "!b")},
			lr:   `{"count":3,"ops":[{"op":"REORDER","index":0},{"op":"INSERT","index":2,"room_id":"!c"}]}`,
			want: ListState{Count: 3, Rooms: roomIDs("!a", "!b", "!c")},
		},
		{
			name: "ops apply in order",
			lr: `{"count":3,"ops":[{"op":"SYNC","range":[0,2],"room_ids":["!a","!b","!c"]},
				{"op":"DELETE","index":2},{"op":"INSERT","index":0,"room_id":"!c"},{"op":"INVALIDATE","range":[1,1]}]}`,
			want: ListState{Count: 3, Rooms: roomIDs("!c", "", "!b")},
		},
		{
			name: "a v4 list with only a count has no window",
			lr:   `{"count":12}`,
			want: ListState{Count: 12},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			oldRooms := slices.Clone(tt.old.Rooms)
			got, err := MergeList(tt.old, listResp(t, tt.lr))
			require.NoError(t, err)
			assert.Equal(t, tt.want, got)
			assert.LessOrEqual(t, len(got.Rooms), got.Count)
			assert.Equal(t, oldRooms, tt.old.Rooms, "the old window was modified")
		})
	}
}

func TestMergeListRejectsImpossibleResponses(t *testing.T) {
	old := ListState{Count: 3, Rooms: roomIDs("!a", "!b", "!c")}
	tests := []struct {
		name, lr, wantErr string
	}{
		{"negative count", `{"count":-1}`, "negative count"},
		{"SYNC without range", `{"count":3,"ops":[{"op":"SYNC","room_ids":["!x"]}]}`, "without range"},
		{"INVALIDATE without range", `{"ops":[{"op":"INVALIDATE"}]}`, "without range"},
		{"INSERT without index", `{"ops":[{"op":"INSERT","room_id":"!x"}]}`, "without index"},
		{"DELETE without index", `{"ops":[{"op":"DELETE"}]}`, "without index"},
		{"INSERT without room_id", `{"ops":[{"op":"INSERT","index":0}]}`, "without room_id"},
		{"negative index", `{"ops":[{"op":"DELETE","index":-1}]}`, "invalid index"},
		{"index at maxWindowIndex", fmt.Sprintf(`{"ops":[{"op":"INSERT","index":%d,"room_id":"!x"}]}`, maxWindowIndex), "invalid index"},
		{"huge index", `{"ops":[{"op":"INSERT","index":9007199254740991,"room_id":"!x"}]}`, "invalid index"},
		{"range starting at maxWindowIndex", fmt.Sprintf(`{"ops":[{"op":"SYNC","range":[%d,%d],"room_ids":[]}]}`, maxWindowIndex, maxWindowIndex+5), "invalid range"},
		{"SYNC of room IDs past maxWindowIndex", fmt.Sprintf(`{"ops":[{"op":"SYNC","range":[%d,%d],"room_ids":["!x","!y"]}]}`, maxWindowIndex-1, maxWindowIndex+5), "past position"},
		{"reversed range", `{"ops":[{"op":"INVALIDATE","range":[2,1]}]}`, "invalid range"},
		{"negative range", `{"ops":[{"op":"SYNC","range":[-1,1],"room_ids":[]}]}`, "invalid range"},
		{"SYNC of more room IDs than its range", `{"ops":[{"op":"SYNC","range":[0,1],"room_ids":["!x","!y","!z"]}]}`, "SYNC of 3 rooms"},
		{"a bad op after good ones", `{"count":1,"ops":[{"op":"DELETE","index":0},{"op":"INSERT","index":0,"room_id":"!x"},{"op":"SYNC"}]}`, "op 2"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := MergeList(old, listResp(t, tt.lr))
			require.Error(t, err)
			assert.Contains(t, err.Error(), tt.wantErr)
			assert.Equal(t, ListState{Count: 3, Rooms: roomIDs("!a", "!b", "!c")}, got, "an error returns the old state")
			assert.Equal(t, roomIDs("!a", "!b", "!c"), old.Rooms, "an error leaves the old state untouched")
		})
	}
}

func TestMergeListLeavesOldWindowUntouched(t *testing.T) {
	ops := []string{
		`{"count":5,"ops":[{"op":"DELETE","index":0}]}`,
		`{"count":5,"ops":[{"op":"INSERT","index":1,"room_id":"!x"}]}`,
		`{"count":5,"ops":[{"op":"SYNC","range":[0,4],"room_ids":["!v","!w","!x","!y","!z"]}]}`,
		`{"count":5,"ops":[{"op":"INVALIDATE","range":[0,4]}]}`,
		`{"count":1}`,
	}
	for _, raw := range ops {
		t.Run(raw, func(t *testing.T) {
			// Spare capacity in the old window would let an in-place shift leak into it.
			backing := append(make([]id.RoomID, 0, 16), roomIDs("!a", "!b", "!c", "!d", "!e")...)
			old := ListState{Count: 5, Rooms: backing}
			_, err := MergeList(old, listResp(t, raw))
			require.NoError(t, err)
			assert.Equal(t, roomIDs("!a", "!b", "!c", "!d", "!e"), old.Rooms)
			assert.Equal(t, roomIDs("!a", "!b", "!c", "!d", "!e"), backing[:5])
		})
	}
}

// withMembersFresh returns a copy with MembersStale cleared, as a layer that refreshed the
// members would record it.
func (rs *RoomState) withMembersFresh() *RoomState {
	cp := *rs
	cp.MembersStale = false
	return &cp
}
