package minihs

import (
	"bytes"
	"encoding/json"
	"io"
	"net/http"
	"net/url"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/crypto/signatures"
	"maunium.net/go/mautrix/id"

	"github.com/sliding-e2ee/sdk/slidingsync"
)

func generate(t *testing.T, cfg GenConfig) *Account {
	t.Helper()
	a, err := Generate(cfg)
	require.NoError(t, err)
	return a
}

func TestGenerateIsDeterministic(t *testing.T) {
	a := generate(t, GenConfig{Rooms: 200, Seed: 7})
	b := generate(t, GenConfig{Rooms: 200, Seed: 7})
	c := generate(t, GenConfig{Rooms: 200, Seed: 8})
	require.Len(t, a.Rooms, 200)
	encrypted := 0
	for i := range a.Rooms {
		ra, rb := a.Rooms[i], b.Rooms[i]
		assert.Equal(t, ra.ID, rb.ID)
		assert.Equal(t, ra.Name, rb.Name)
		assert.Equal(t, ra.Members, rb.Members)
		require.Equal(t, len(ra.State), len(rb.State))
		for k := range ra.State {
			assert.JSONEq(t, string(ra.State[k].JSON), string(rb.State[k].JSON))
		}
		assert.Equal(t, BotUserID, ra.Members[0])
		assert.GreaterOrEqual(t, len(ra.Members), 3, "the bot and a few members")
		if ra.Encrypted {
			encrypted++
		}
	}
	assert.Equal(t, 100, encrypted, "half of the rooms are encrypted")
	assert.NotEqual(t, a.Rooms[0].ID, c.Rooms[0].ID, "another seed gives another account")
	assert.Len(t, a.ToDevice, 20)
}

func TestPeerKeysAreSigned(t *testing.T) {
	a := generate(t, GenConfig{Rooms: 40, Seed: 1})
	require.Len(t, a.Peers, 4)
	assert.Contains(t, a.Rooms[0].Members, a.Peers[0].UserID)
	for _, p := range a.Peers {
		var dk mautrix.DeviceKeys
		require.NoError(t, json.Unmarshal(p.DeviceKeys, &dk))
		ed := id.Ed25519(dk.Keys[id.NewDeviceKeyID(id.KeyAlgorithmEd25519, p.DeviceID)])
		ok, err := signatures.VerifySignatureJSON(p.DeviceKeys, p.UserID, p.DeviceID.String(), ed)
		require.NoError(t, err)
		assert.True(t, ok, "device keys of %s verify", p.UserID)
		for keyID, otk := range p.OTKs[0] {
			raw, err := json.Marshal(otk)
			require.NoError(t, err)
			ok, err := signatures.VerifySignatureJSON(json.RawMessage(raw), p.UserID, p.DeviceID.String(), ed)
			require.NoError(t, err)
			assert.True(t, ok, "one-time key %s verifies", keyID)
		}
	}
}

// testServer starts a server and returns it with a client for its URL.
type testServer struct {
	*Server
	t      *testing.T
	url    string
	events chan Event
}

func start(t *testing.T, api API, cfg GenConfig) *testServer {
	t.Helper()
	ts := &testServer{t: t, events: make(chan Event, 1000)}
	ts.Server = NewServer(generate(t, cfg), Options{API: api, IdleHold: 50 * time.Millisecond, Observer: func(ev Event) {
		select {
		case ts.events <- ev:
		default:
		}
	}})
	var err error
	ts.url, err = ts.Start()
	require.NoError(t, err)
	t.Cleanup(ts.Close)
	return ts
}

func (ts *testServer) do(method, path string, query url.Values, body []byte, out any) int {
	ts.t.Helper()
	u := ts.url + path
	if len(query) > 0 {
		u += "?" + query.Encode()
	}
	req, err := http.NewRequest(method, u, bytes.NewReader(body))
	require.NoError(ts.t, err)
	req.Header.Set("Authorization", "Bearer "+AccessToken)
	resp, err := http.DefaultClient.Do(req)
	require.NoError(ts.t, err)
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	require.NoError(ts.t, err)
	if out != nil && resp.StatusCode == http.StatusOK {
		require.NoError(ts.t, json.Unmarshal(data, out), string(data))
	}
	return resp.StatusCode
}

func (ts *testServer) sliding(req *slidingsync.Request) *slidingsync.Response {
	ts.t.Helper()
	q, body, err := slidingsync.EncodeRequest(slidingsync.ProtocolMSC4186, req)
	require.NoError(ts.t, err)
	var raw json.RawMessage
	require.Equal(ts.t, http.StatusOK, ts.do(http.MethodPost, "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync", q, body, &raw))
	resp, err := slidingsync.DecodeResponse(raw)
	require.NoError(ts.t, err)
	return resp
}

func e2eeOf(t *testing.T, resp *slidingsync.Response) map[string]json.RawMessage {
	t.Helper()
	var sec map[string]json.RawMessage
	require.NoError(t, json.Unmarshal(resp.Extensions["e2ee"], &sec))
	return sec
}

func TestSlidingSynapseDialect(t *testing.T) {
	ts := start(t, APISliding, GenConfig{Rooms: 50, Seed: 3})
	acct := ts.Account()
	timeout := int64(1000)
	req := &slidingsync.Request{
		Lists: map[string]slidingsync.ListConfig{"all": {
			Ranges:        []slidingsync.Range{{Start: 0, End: 9}},
			TimelineLimit: 1,
			RequiredState: slidingsync.RequiredState{Include: []slidingsync.StateFilter{{Type: "m.room.encryption", StateKey: ""}}},
		}},
		Extensions: map[string]json.RawMessage{"e2ee": json.RawMessage(`{"enabled":true}`)},
	}
	first := ts.sliding(req)
	require.Len(t, first.Rooms, 10, "the range is honoured")
	ops := first.Lists["all"].Ops
	require.Len(t, ops, 1)
	assert.Equal(t, slidingsync.ListOpSync, ops[0].Op)
	assert.Equal(t, acct.Rooms[0].ID, ops[0].RoomIDs[0])
	assert.Len(t, ops[0].RoomIDs, 10)
	assert.Equal(t, 50, first.Lists["all"].Count.Val)
	r0 := first.Rooms[acct.Rooms[0].ID]
	assert.True(t, r0.Initial)
	assert.Len(t, r0.Timeline, 1, "timeline_limit")
	require.Len(t, r0.RequiredState, 1, "only the requested state")
	assert.Equal(t, "m.room.encryption", r0.RequiredState[0].Type.Type)
	assert.Empty(t, first.Rooms[acct.Rooms[1].ID].RequiredState, "room 1 is not encrypted")
	sec := e2eeOf(t, first)
	assert.JSONEq(t, `{"signed_curve25519":0}`, string(sec["device_one_time_keys_count"]))
	assert.JSONEq(t, `[]`, string(sec["device_unused_fallback_key_types"]))
	assert.NotContains(t, sec, "device_lists", "no device_lists without pos")

	// Keys uploaded: counts and fallback types follow, on every response.
	up := `{"one_time_keys":{"signed_curve25519:A":{"key":"x"},"signed_curve25519:B":{"key":"y"}},"fallback_keys":{"signed_curve25519:F":{"key":"z","fallback":true}}}`
	require.Equal(t, http.StatusOK, ts.do(http.MethodPost, "/_matrix/client/v3/keys/upload", nil, []byte(up), nil))

	// An idle long-poll returns after the hold, still with the SYNC op and the e2ee fields.
	req.Pos, req.Timeout = first.Pos, &timeout
	began := time.Now()
	idle := ts.sliding(req)
	assert.Less(t, time.Since(began), 900*time.Millisecond, "held for IdleHold, not the whole timeout")
	assert.Empty(t, idle.Rooms)
	assert.Equal(t, first.Pos, idle.Pos, "Synapse repeats the pos on an idle long-poll")
	require.Len(t, idle.Lists["all"].Ops, 1)
	assert.Len(t, idle.Lists["all"].Ops[0].RoomIDs, 10, "Synapse sends the window's room IDs on every response")
	sec = e2eeOf(t, idle)
	assert.JSONEq(t, `{"signed_curve25519":2}`, string(sec["device_one_time_keys_count"]))
	assert.JSONEq(t, `["signed_curve25519"]`, string(sec["device_unused_fallback_key_types"]))
	assert.JSONEq(t, `{"changed":[],"left":[]}`, string(sec["device_lists"]))

	// A message and a device-list change wake the long-poll.
	ts.PeerMessage(0, acct.Peers[0].UserID, "hi")
	ts.ChangeDevices(acct.Peers[0].UserID)
	req.Pos = idle.Pos
	live := ts.sliding(req)
	require.Len(t, live.Rooms, 1)
	assert.False(t, live.Rooms[acct.Rooms[0].ID].Initial)
	assert.Len(t, live.Rooms[acct.Rooms[0].ID].Timeline, 1)
	assert.JSONEq(t, `{"changed":["`+acct.Peers[0].UserID.String()+`"],"left":[]}`, string(e2eeOf(t, live)["device_lists"]))

	// Growing the range sends the new rooms, in full.
	req.Pos = live.Pos
	req.Lists["all"] = slidingsync.ListConfig{Ranges: []slidingsync.Range{{Start: 0, End: 49}}, TimelineLimit: 1}
	grown := ts.sliding(req)
	assert.Len(t, grown.Rooms, 40)
}

func TestSlidingUnknownPos(t *testing.T) {
	ts := start(t, APISliding, GenConfig{Rooms: 5})
	q := url.Values{"pos": {"garbage"}}
	assert.Equal(t, http.StatusBadRequest, ts.do(http.MethodPost, "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync", q, []byte(`{"lists":{}}`), nil))
	assert.Equal(t, http.StatusNotFound, ts.do(http.MethodGet, "/_matrix/client/v3/sync", nil, nil, nil), "the sliding server serves no v2 sync")
}

func TestV2InitialAndIncremental(t *testing.T) {
	ts := start(t, APIV2, GenConfig{Rooms: 30, Seed: 4})
	acct := ts.Account()
	var initial map[string]json.RawMessage
	require.Equal(t, http.StatusOK, ts.do(http.MethodGet, "/_matrix/client/v3/sync", url.Values{"timeout": {"0"}}, nil, &initial))
	for _, k := range []string{"next_batch", "rooms", "to_device", "device_one_time_keys_count", "device_unused_fallback_key_types", "org.matrix.msc2732.device_unused_fallback_key_types"} {
		assert.Contains(t, initial, k)
	}
	assert.NotContains(t, initial, "device_lists", "no device_lists on an initial sync")
	var rooms mautrix.RespSyncRooms
	require.NoError(t, json.Unmarshal(initial["rooms"], &rooms))
	require.Len(t, rooms.Join, 30)
	r0 := rooms.Join[acct.Rooms[0].ID]
	require.NotNil(t, r0)
	assert.Len(t, r0.State.Events, len(acct.Rooms[0].State))
	assert.Len(t, r0.Timeline.Events, 1)
	var next string
	require.NoError(t, json.Unmarshal(initial["next_batch"], &next))

	// Idle: only next_batch and the always-present e2ee fields.
	var idle map[string]json.RawMessage
	require.Equal(t, http.StatusOK, ts.do(http.MethodGet, "/_matrix/client/v3/sync", url.Values{"since": {next}, "timeout": {"30000"}}, nil, &idle))
	assert.ElementsMatch(t, []string{"next_batch", "device_one_time_keys_count", "device_unused_fallback_key_types", "org.matrix.msc2732.device_unused_fallback_key_types"}, keys(idle))

	ts.PeerMessage(3, acct.Peers[1].UserID, "yo")
	ts.ChangeDevices(acct.Peers[1].UserID)
	var inc mautrix.RespSync
	require.Equal(t, http.StatusOK, ts.do(http.MethodGet, "/_matrix/client/v3/sync", url.Values{"since": {next}, "timeout": {"30000"}}, nil, &inc))
	require.Len(t, inc.Rooms.Join, 1)
	assert.Len(t, inc.Rooms.Join[acct.Rooms[3].ID].Timeline.Events, 1)
	assert.Equal(t, []id.UserID{acct.Peers[1].UserID}, inc.DeviceLists.Changed)
	assert.Empty(t, inc.ToDevice.Events, "to-device messages were acknowledged by since")
}

func keys(m map[string]json.RawMessage) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	return out
}

func TestKeyEndpointsAndByteCounts(t *testing.T) {
	ts := start(t, APIV2, GenConfig{Rooms: 10, Seed: 5})
	peer := ts.Account().Peers[0]
	in0, out0 := ts.Bytes()

	var q struct {
		DeviceKeys map[id.UserID]map[id.DeviceID]json.RawMessage `json:"device_keys"`
	}
	body := []byte(`{"device_keys":{"` + peer.UserID.String() + `":[],"@user00001:bench":[]}}`)
	require.Equal(t, http.StatusOK, ts.do(http.MethodPost, "/_matrix/client/v3/keys/query", nil, body, &q))
	assert.JSONEq(t, string(peer.DeviceKeys), string(q.DeviceKeys[peer.UserID][peer.DeviceID]))
	assert.Empty(t, q.DeviceKeys["@user00001:bench"], "pool users have no devices")
	in1, out1 := ts.Bytes()
	assert.Greater(t, in1-in0, int64(len(body)), "request bytes are counted with headers")
	assert.Greater(t, out1-out0, int64(len(peer.DeviceKeys)), "response bytes are counted with headers")

	claim := []byte(`{"one_time_keys":{"` + peer.UserID.String() + `":{"` + peer.DeviceID.String() + `":"signed_curve25519"}}}`)
	seen := map[id.KeyID]bool{}
	for range 2 {
		var c struct {
			OneTimeKeys map[id.UserID]map[id.DeviceID]map[id.KeyID]json.RawMessage `json:"one_time_keys"`
		}
		require.Equal(t, http.StatusOK, ts.do(http.MethodPost, "/_matrix/client/v3/keys/claim", nil, claim, &c))
		got := c.OneTimeKeys[peer.UserID][peer.DeviceID]
		require.Len(t, got, 1)
		for k := range got {
			assert.False(t, seen[k], "a one-time key is claimed once")
			seen[k] = true
		}
	}

	var ev Event
	for ev = range ts.events {
		if ev.Kind == KindKeysQuery {
			break
		}
	}
	assert.ElementsMatch(t, []id.UserID{peer.UserID, "@user00001:bench"}, ev.Users)

	req, err := http.NewRequest(http.MethodGet, ts.url+"/_matrix/client/v3/sync", nil)
	require.NoError(t, err)
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	resp.Body.Close()
	assert.Equal(t, http.StatusUnauthorized, resp.StatusCode, "no token")
}
