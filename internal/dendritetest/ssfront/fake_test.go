package ssfront_test

import (
	"bytes"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"maunium.net/go/mautrix/id"

	"github.com/sliding-e2ee/sdk/internal/dendritetest/ssfront"
	"github.com/sliding-e2ee/sdk/slidingsync"
)

// fakeUpstream serves canned v2 /sync bodies in order and records the queries.
type fakeUpstream struct {
	mu      sync.Mutex
	bodies  []string // main-cursor answers, in order
	tdBody  string   // answer to the to-device cursor
	queries []url.Values
}

func (u *fakeUpstream) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if r.Header.Get("Authorization") != "Bearer tok" {
		w.WriteHeader(http.StatusUnauthorized)
		_, _ = w.Write([]byte(`{"errcode":"M_UNKNOWN_TOKEN","error":"bad token"}`))
		return
	}
	switch r.URL.Path {
	case "/_matrix/client/v3/account/whoami":
		_, _ = w.Write([]byte(`{"user_id":"@bob:localhost"}`))
	case "/_matrix/client/v3/sync":
		q := r.URL.Query()
		u.queries = append(u.queries, q)
		if strings.Contains(q.Get("filter"), `"rooms":[]`) {
			_, _ = w.Write([]byte(u.tdBody))
			return
		}
		body := u.bodies[0]
		if len(u.bodies) > 1 {
			u.bodies = u.bodies[1:]
		}
		_, _ = w.Write([]byte(body))
	default:
		w.WriteHeader(http.StatusNotFound)
		_, _ = w.Write([]byte(`{"errcode":"M_UNRECOGNIZED"}`))
	}
}

func (u *fakeUpstream) lastQueries(n int) []url.Values {
	u.mu.Lock()
	defer u.mu.Unlock()
	return append([]url.Values(nil), u.queries[len(u.queries)-n:]...)
}

const initialV2 = `{
 "next_batch": "s10_0_0_3_0_0_5_0_0",
 "rooms": {
  "join": {
   "!a:localhost": {
    "summary": {"m.joined_member_count": 2, "m.invited_member_count": 0},
    "state": {"events": [
     {"type": "m.room.create", "state_key": "", "sender": "@alice:localhost", "event_id": "$c", "origin_server_ts": 1, "content": {"creator": "@alice:localhost"}},
     {"type": "m.room.member", "state_key": "@alice:localhost", "sender": "@alice:localhost", "event_id": "$ma", "origin_server_ts": 2, "content": {"membership": "join"}},
     {"type": "m.room.member", "state_key": "@carol:localhost", "sender": "@carol:localhost", "event_id": "$mc", "origin_server_ts": 3, "content": {"membership": "join"}},
     {"type": "m.room.topic", "state_key": "", "sender": "@alice:localhost", "event_id": "$t", "origin_server_ts": 4, "content": {"topic": "t"}}
    ]},
    "timeline": {"limited": false, "prev_batch": "p1", "events": [
     {"type": "m.room.name", "state_key": "", "sender": "@alice:localhost", "event_id": "$n", "origin_server_ts": 5, "content": {"name": "Room A"}},
     {"type": "m.room.member", "state_key": "@bob:localhost", "sender": "@bob:localhost", "event_id": "$mb", "origin_server_ts": 6, "content": {"membership": "join"}},
     {"type": "m.room.message", "sender": "@alice:localhost", "event_id": "$m1", "origin_server_ts": 7, "content": {"body": "hi", "msgtype": "m.text"}}
    ]}
   }
  },
  "invite": {
   "!b:localhost": {"invite_state": {"events": [
    {"type": "m.room.member", "state_key": "@bob:localhost", "sender": "@dave:localhost", "origin_server_ts": 100, "content": {"membership": "invite"}}
   ]}}
  }
 },
 "device_lists": {"changed": ["@alice:localhost"]}
}`

const incrementalV2 = `{
 "next_batch": "s11_0_0_9_0_0_6_0_0",
 "rooms": {"join": {"!a:localhost": {"timeline": {"limited": false, "prev_batch": "p2", "events": [
  {"type": "m.room.message", "sender": "@carol:localhost", "event_id": "$m2", "origin_server_ts": 200, "content": {"body": "yo", "msgtype": "m.text"}}
 ]}}}},
 "device_lists": {"changed": ["@carol:localhost"], "left": ["@dave:localhost"]},
 "device_one_time_keys_count": {"signed_curve25519": 7}
}`

func fakeSync(t *testing.T, base, token string, query url.Values, body string) (int, []byte) {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, base+ssfront.SyncPath+"?"+query.Encode(), bytes.NewReader([]byte(body)))
	require.NoError(t, err)
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	var buf bytes.Buffer
	_, err = buf.ReadFrom(resp.Body)
	require.NoError(t, err)
	return resp.StatusCode, buf.Bytes()
}

func TestFrontTranslation(t *testing.T) {
	up := &fakeUpstream{
		bodies: []string{initialV2, incrementalV2},
		tdBody: `{"next_batch": "s10_0_0_12_0_0_5_0_0", "to_device": {"events": [{"type": "m.x", "sender": "@alice:localhost", "content": {}}]}}`,
	}
	upSrv := httptest.NewServer(up)
	t.Cleanup(upSrv.Close)
	upURL, err := url.Parse(upSrv.URL)
	require.NoError(t, err)
	front := httptest.NewServer(ssfront.New(upURL))
	t.Cleanup(front.Close)

	reqBody := `{"lists": {"l": {"ranges": [[0, 0]], "timeline_limit": 2,
	  "required_state": [["m.room.name", ""], ["m.room.member", "$ME"], ["m.room.member", "$LAZY"]]}},
	 "extensions": {"e2ee": {"enabled": true}, "to_device": {"enabled": true, "limit": 10}}}`

	status, body := fakeSync(t, front.URL, "tok", url.Values{}, reqBody)
	require.Equal(t, http.StatusOK, status, string(body))
	resp, err := slidingsync.DecodeResponse(body)
	require.NoError(t, err)

	// The list: two rooms, the invite (ts 100) first; the window is [0, 0].
	l := resp.Lists["l"]
	assert.Equal(t, 2, l.Count.Val)
	require.Len(t, l.Ops, 1)
	assert.Equal(t, slidingsync.ListOpSync, l.Ops[0].Op)
	assert.Equal(t, &slidingsync.Range{Start: 0, End: 0}, l.Ops[0].Range)
	assert.Equal(t, []id.RoomID{"!b:localhost"}, l.Ops[0].RoomIDs)

	a := resp.Rooms["!a:localhost"]
	require.NotNil(t, a)
	assert.True(t, a.Initial)
	assert.Equal(t, "Room A", a.Name.Val)
	assert.Equal(t, 2, a.JoinedCount.Val)
	assert.True(t, a.Limited, "3 events cut to 2")
	assert.Equal(t, "p1", a.PrevBatch.Val)
	require.Len(t, a.Timeline, 2)
	assert.Equal(t, id.EventID("$m1"), a.Timeline[1].ID)
	var got []string
	for _, evt := range a.RequiredState {
		got = append(got, evt.Type.Type+"|"+*evt.StateKey)
	}
	// Name, $ME, and the lazy members of the kept timeline's senders (alice, bob); not carol,
	// the create event or the topic.
	assert.ElementsMatch(t, []string{"m.room.name|", "m.room.member|@bob:localhost", "m.room.member|@alice:localhost"}, got)

	b := resp.Rooms["!b:localhost"]
	require.NotNil(t, b)
	assert.True(t, b.Initial)
	assert.Equal(t, "invite", string(b.Membership.Val))
	assert.Len(t, b.InviteState.Val, 1)

	assert.JSONEq(t, `{"device_one_time_keys_count": {"signed_curve25519": 0}}`, string(resp.Extensions["e2ee"]),
		"no device_lists without pos; a count of 0 filled in")
	assert.JSONEq(t, `{"next_batch": "s10_0_0_12_0_0_5_0_0", "events": [{"type": "m.x", "sender": "@alice:localhost", "content": {}}]}`,
		string(resp.Extensions["to_device"]))

	// The next request acknowledges the to-device batch: the room cursor's since carries the
	// acknowledged to-device position (12), not its own (3).
	reqBody2 := strings.Replace(reqBody, `"limit": 10`, `"limit": 10, "since": "s10_0_0_12_0_0_5_0_0"`, 1)
	status, body = fakeSync(t, front.URL, "tok", url.Values{"pos": {resp.Pos}, "timeout": {"500"}}, reqBody2)
	require.Equal(t, http.StatusOK, status, string(body))
	resp2, err := slidingsync.DecodeResponse(body)
	require.NoError(t, err)
	qs := up.lastQueries(2)
	assert.Equal(t, "s10_0_0_12_0_0_5_0_0", qs[0].Get("since"), "room cursor")
	assert.Equal(t, "500", qs[0].Get("timeout"))
	assert.Equal(t, "s10_0_0_12_0_0_5_0_0", qs[1].Get("since"), "to-device cursor")
	assert.Equal(t, "0", qs[1].Get("timeout"))
	require.Len(t, resp2.Rooms, 1, "only the room with news")
	a2 := resp2.Rooms["!a:localhost"]
	require.NotNil(t, a2)
	assert.False(t, a2.Initial)
	require.Len(t, a2.Timeline, 1)
	assert.Equal(t, id.EventID("$m2"), a2.Timeline[0].ID)
	assert.Equal(t, []id.RoomID{"!a:localhost"}, resp2.Lists["l"].Ops[0].RoomIDs, "room A moved to the top")
	assert.JSONEq(t, `{"device_one_time_keys_count": {"signed_curve25519": 7},
	  "device_lists": {"changed": ["@carol:localhost"], "left": ["@dave:localhost"]}}`, string(resp2.Extensions["e2ee"]))

	// An extensions-only connection gets no rooms.
	status, body = fakeSync(t, front.URL, "tok", url.Values{}, `{"conn_id": "x", "lists": {}, "extensions": {"e2ee": {"enabled": true}}}`)
	require.Equal(t, http.StatusOK, status, string(body))
	resp3, err := slidingsync.DecodeResponse(body)
	require.NoError(t, err)
	assert.Empty(t, resp3.Rooms)
	assert.Contains(t, resp3.Extensions, "e2ee")

	// An unknown pos, and an upstream error passed through.
	status, body = fakeSync(t, front.URL, "tok", url.Values{"pos": {"999"}}, reqBody)
	assert.Equal(t, http.StatusBadRequest, status)
	assert.Contains(t, string(body), `"M_UNKNOWN_POS"`)
	status, body = fakeSync(t, front.URL, "other", url.Values{}, reqBody)
	assert.Equal(t, http.StatusUnauthorized, status)
	assert.Contains(t, string(body), `"M_UNKNOWN_TOKEN"`)

	// Another conn_id is another connection: its pos space is separate.
	status, body = fakeSync(t, front.URL, "tok", url.Values{"pos": {resp.Pos}}, `{"conn_id": "other", "lists": {}}`)
	assert.Equal(t, http.StatusBadRequest, status)
	var e struct {
		Errcode string `json:"errcode"`
	}
	require.NoError(t, json.Unmarshal(body, &e))
	assert.Equal(t, "M_UNKNOWN_POS", e.Errcode)
}
