package minihs

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"net/http"
	"net/url"
	"slices"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/crypto/signatures"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/sliding-e2ee/sdk/slidingsync"
	"github.com/sliding-e2ee/sdk/slidingsync/slidingsynctest"
)

const syncPath = "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync"

func newServer(t *testing.T, rooms int) *Server {
	t.Helper()
	s, err := NewServer(Options{Rooms: rooms, Seed: 7, Dir: t.TempDir()})
	require.NoError(t, err)
	t.Cleanup(s.Close)
	return s
}

// call sends a request as the bot and decodes the JSON answer.
func call(t *testing.T, s *Server, method, path string, body any) (int, map[string]any) {
	t.Helper()
	_, _, token := s.Bot()
	return callAs(t, s, token, method, path, body)
}

func callAs(t *testing.T, s *Server, token, method, path string, body any) (int, map[string]any) {
	t.Helper()
	raw, err := json.Marshal(body)
	require.NoError(t, err)
	req, err := http.NewRequestWithContext(t.Context(), method, s.URL()+path, bytes.NewReader(raw))
	require.NoError(t, err)
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	out, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	var m map[string]any
	require.NoError(t, json.Unmarshal(out, &m), string(out))
	return resp.StatusCode, m
}

// botSync sends one sliding sync request as the bot, without long-poll.
func botSync(t *testing.T, s *Server, pos string, body map[string]any) map[string]any {
	t.Helper()
	path := syncPath + "?timeout=0"
	if pos != "" {
		path += "&pos=" + pos
	}
	status, resp := call(t, s, http.MethodPost, path, body)
	require.Equal(t, http.StatusOK, status, resp)
	return resp
}

func ext(t *testing.T, resp map[string]any, name string) map[string]any {
	t.Helper()
	exts, _ := resp["extensions"].(map[string]any)
	e, ok := exts[name].(map[string]any)
	require.True(t, ok, "no %s extension in %v", name, resp)
	return e
}

// uploadBotKeys uploads n one-time keys (and a fallback key if fallback is set) for the bot.
// The server does not check key signatures, so made-up keys do.
func uploadBotKeys(t *testing.T, s *Server, first, n int, fallback string) {
	t.Helper()
	otks := map[string]any{}
	for i := first; i < first+n; i++ {
		otks[fmt.Sprintf("signed_curve25519:K%03d", i)] = map[string]any{"key": fmt.Sprintf("otk%d", i), "signatures": map[string]any{}}
	}
	body := map[string]any{"one_time_keys": otks}
	if fallback != "" {
		body["fallback_keys"] = map[string]any{"signed_curve25519:" + fallback: map[string]any{"key": fallback, "fallback": true, "signatures": map[string]any{}}}
	}
	status, resp := call(t, s, http.MethodPost, "/_matrix/client/v3/keys/upload", body)
	require.Equal(t, http.StatusOK, status, resp)
}

func TestClaimOneTimeKeysThenFallback(t *testing.T) {
	s := newServer(t, -1)
	bot, dev, _ := s.Bot()
	uploadBotKeys(t, s, 0, 2, "FB1")
	alice, err := s.NewPeer(t.Context(), "@alice:demo.invalid")
	require.NoError(t, err)

	e2ee := map[string]any{"extensions": map[string]any{"e2ee": map[string]any{"enabled": true}}}
	resp := botSync(t, s, "", e2ee)
	assert.Equal(t, map[string]any{"signed_curve25519": float64(2)}, ext(t, resp, "e2ee")["device_one_time_keys_count"])
	assert.Equal(t, []any{"signed_curve25519"}, ext(t, resp, "e2ee")["device_unused_fallback_key_types"])

	for i, want := range []string{"signed_curve25519:K000", "signed_curve25519:K001", "signed_curve25519:FB1", "signed_curve25519:FB1"} {
		claimed, err := alice.Client.ClaimKeys(t.Context(), claimReq(bot, dev))
		require.NoError(t, err)
		keys := claimed.OneTimeKeys[bot][dev]
		require.Len(t, keys, 1, "claim %d", i)
		for keyID, key := range keys {
			assert.Equal(t, id.KeyID(want), keyID, "claim %d", i)
			assert.Equal(t, i >= 2, key.Fallback, "claim %d", i)
		}
	}
	otks, fb, unused := s.KeyCounts(bot, dev)
	assert.Equal(t, 0, otks)
	assert.Equal(t, id.KeyID("signed_curve25519:FB1"), fb)
	assert.False(t, unused, "a claimed fallback key is used")

	// Synapse's shape: counts at zero are sent, and a used fallback key is [].
	resp = botSync(t, s, resp["pos"].(string), e2ee)
	assert.Equal(t, map[string]any{"signed_curve25519": float64(0)}, ext(t, resp, "e2ee")["device_one_time_keys_count"])
	assert.Equal(t, []any{}, ext(t, resp, "e2ee")["device_unused_fallback_key_types"])

	uploadBotKeys(t, s, 2, 1, "FB2")
	resp = botSync(t, s, resp["pos"].(string), e2ee)
	assert.Equal(t, map[string]any{"signed_curve25519": float64(1)}, ext(t, resp, "e2ee")["device_one_time_keys_count"])
	assert.Equal(t, []any{"signed_curve25519"}, ext(t, resp, "e2ee")["device_unused_fallback_key_types"])
	claims := s.Claims(bot, dev)
	require.Len(t, claims, 4)
	assert.Equal(t, alice.UserID, claims[0].By)
	assert.True(t, claims[3].Fallback)
}

func TestUploadedKeyIsNotCountedTwice(t *testing.T) {
	s := newServer(t, -1)
	bot, dev, _ := s.Bot()
	uploadBotKeys(t, s, 0, 3, "")
	uploadBotKeys(t, s, 1, 3, "") // K001 and K002 again, K003 new
	otks, _, _ := s.KeyCounts(bot, dev)
	assert.Equal(t, 4, otks)
	ups := s.Uploads(bot, dev)
	require.Len(t, ups, 2)
	assert.Equal(t, 1, ups[1].OTKs)
	assert.Equal(t, 4, ups[1].Held)
	assert.Zero(t, s.UploadRejections())
}

// A one-time key ID that comes again with another key rejects the upload, as Synapse does.
func TestReusedKeyIDIsRejected(t *testing.T) {
	s := newServer(t, -1)
	bot, dev, token := s.Bot()
	uploadBotKeys(t, s, 0, 2, "")
	status, _ := callAs(t, s, token, http.MethodPost, "/_matrix/client/v3/keys/upload", map[string]any{
		"one_time_keys": map[string]any{"signed_curve25519:K000": map[string]any{"key": "another key"}},
	})
	assert.Equal(t, http.StatusBadRequest, status)
	assert.Equal(t, 1, s.UploadRejections())
	otks, _, _ := s.KeyCounts(bot, dev)
	assert.Equal(t, 2, otks)
}

func TestToDeviceDeletedOnlyWhenAcknowledged(t *testing.T) {
	s := newServer(t, -1)
	bot, dev, _ := s.Bot()
	alice, err := s.NewPeer(t.Context(), "@alice:demo.invalid")
	require.NoError(t, err)
	for i := range 3 {
		status, resp := callAs(t, s, alice.Client.AccessToken, http.MethodPut, fmt.Sprintf("/_matrix/client/v3/sendToDevice/org.example.ping/txn%d", i),
			map[string]any{"messages": map[string]any{bot.String(): map[string]any{dev.String(): map[string]any{"seq": i}}}})
		require.Equal(t, http.StatusOK, status, resp)
	}
	// A repeated transaction queues nothing.
	callAs(t, s, alice.Client.AccessToken, http.MethodPut, "/_matrix/client/v3/sendToDevice/org.example.ping/txn0",
		map[string]any{"messages": map[string]any{bot.String(): map[string]any{"*": map[string]any{"seq": 99}}}})
	require.Equal(t, 3, s.PendingToDevice(bot, dev))

	td := func(since string) map[string]any {
		body := map[string]any{"enabled": true, "limit": 2}
		if since != "" {
			body["since"] = since
		}
		return map[string]any{"extensions": map[string]any{"to_device": body}}
	}
	seqs := func(e map[string]any) []any {
		var out []any
		for _, evt := range e["events"].([]any) {
			out = append(out, evt.(map[string]any)["content"].(map[string]any)["seq"])
		}
		return out
	}
	first := ext(t, botSync(t, s, "", td("")), "to_device")
	assert.Equal(t, []any{float64(0), float64(1)}, seqs(first))
	assert.Equal(t, 3, s.PendingToDevice(bot, dev), "nothing is deleted before the client acknowledges it")

	// The batch was not processed (no since): the same events come again.
	again := ext(t, botSync(t, s, "", td("")), "to_device")
	assert.Equal(t, seqs(first), seqs(again))
	assert.Equal(t, first["next_batch"], again["next_batch"])

	next := ext(t, botSync(t, s, "", td(first["next_batch"].(string))), "to_device")
	assert.Equal(t, []any{float64(2)}, seqs(next))
	assert.Equal(t, 1, s.PendingToDevice(bot, dev), "the acknowledged batch is deleted")

	last := ext(t, botSync(t, s, "", td(next["next_batch"].(string))), "to_device")
	assert.Empty(t, last["events"])
	assert.Equal(t, next["next_batch"], last["next_batch"])
	assert.Equal(t, 0, s.PendingToDevice(bot, dev))
}

func TestRoomSendDeduplicatesTransactions(t *testing.T) {
	s := newServer(t, 3)
	_, _, token := s.Bot()
	roomID := s.acct.Rooms[0].ID
	path := "/_matrix/client/v3/rooms/" + roomID.String() + "/send/m.room.message/txn-1"
	body := map[string]any{"msgtype": "m.text", "body": "hi"}
	status, first := callAs(t, s, token, http.MethodPut, path, body)
	require.Equal(t, http.StatusOK, status, first)
	before := len(s.RoomEvents(roomID))
	_, second := callAs(t, s, token, http.MethodPut, path, body)
	assert.Equal(t, first["event_id"], second["event_id"])
	assert.Equal(t, 1, s.RepeatedSends())
	assert.Len(t, s.RoomEvents(roomID), before, "a repeated transaction adds no event")

	_, other := callAs(t, s, token, http.MethodPut, "/_matrix/client/v3/rooms/"+roomID.String()+"/send/m.room.message/txn-2", body)
	assert.NotEqual(t, first["event_id"], other["event_id"])

	// Not a member: refused.
	alice, err := s.NewPeer(t.Context(), "@alice:demo.invalid")
	require.NoError(t, err)
	status, _ = callAs(t, s, alice.Client.AccessToken, http.MethodPut, path, body)
	assert.Equal(t, http.StatusForbidden, status)
}

func TestWindowGrowsAndInviteTurnsIntoJoin(t *testing.T) {
	s := newServer(t, 20)
	bot, _, _ := s.Bot()
	alice, err := s.NewPeer(t.Context(), "@alice:demo.invalid")
	require.NoError(t, err)
	roomID, err := alice.CreateEncryptedRoom(t.Context(), "Secret", bot)
	require.NoError(t, err)

	list := func(end int) map[string]any {
		return map[string]any{"lists": map[string]any{"all": map[string]any{
			"ranges": [][]int{{0, end}}, "timeline_limit": 1,
			"required_state": [][]string{{"m.room.encryption", ""}, {"m.room.name", ""}, {"m.room.member", "$LAZY"}},
		}}}
	}
	resp := botSync(t, s, "", list(9))
	rooms := resp["rooms"].(map[string]any)
	assert.Len(t, rooms, 10)
	assert.Equal(t, float64(21), resp["lists"].(map[string]any)["all"].(map[string]any)["count"])
	invite := rooms[roomID.String()].(map[string]any)
	assert.NotEmpty(t, invite["invite_state"], "an invite carries invite_state")
	assert.Nil(t, invite["timeline"])

	// The grown window sends only the rooms not sent yet.
	resp = botSync(t, s, resp["pos"].(string), list(19))
	assert.Len(t, resp["rooms"], 10)

	// Nothing new: no rooms, and the pos the request sent, as Synapse answers.
	quiet := botSync(t, s, resp["pos"].(string), list(20))
	assert.Len(t, quiet["rooms"], 1, "the last generated room")
	quiet2 := botSync(t, s, quiet["pos"].(string), list(20))
	assert.Empty(t, quiet2["rooms"])
	assert.Equal(t, quiet["pos"], quiet2["pos"])

	status, _ := call(t, s, http.MethodPost, "/_matrix/client/v3/rooms/"+roomID.String()+"/join", map[string]any{})
	require.Equal(t, http.StatusOK, status)
	resp = botSync(t, s, quiet2["pos"].(string), list(20))
	joined := resp["rooms"].(map[string]any)[roomID.String()].(map[string]any)
	assert.Equal(t, true, joined["initial"], "a joined room is sent again as initial")
	assert.Len(t, joined["timeline"], 1)
	var types []string
	for _, e := range joined["required_state"].([]any) {
		types = append(types, e.(map[string]any)["type"].(string))
	}
	assert.ElementsMatch(t, []string{"m.room.name", "m.room.encryption", "m.room.member"}, types, "lazy members: the timeline's sender")

	// An old pos replays what came after it; a pos from the future is unknown.
	replay := botSync(t, s, quiet2["pos"].(string), list(20))
	assert.Contains(t, replay["rooms"], roomID.String())
	status, body := call(t, s, http.MethodPost, syncPath+"?timeout=0&pos=999999_0", list(20))
	assert.Equal(t, http.StatusBadRequest, status)
	assert.Equal(t, "M_UNKNOWN_POS", body["errcode"])
}

func TestNewDeviceIsADeviceListChange(t *testing.T) {
	s := newServer(t, -1)
	alice, err := s.NewPeer(t.Context(), "@alice:demo.invalid")
	require.NoError(t, err)
	e2ee := map[string]any{"extensions": map[string]any{"e2ee": map[string]any{"enabled": true}}}
	first := botSync(t, s, "", e2ee)
	assert.Nil(t, ext(t, first, "e2ee")["device_lists"], "no device lists without a pos, as on Synapse")

	second, err := alice.AddDevice(t.Context())
	require.NoError(t, err)
	assert.Equal(t, []id.DeviceID{alice.DeviceID, second.DeviceID}, s.Devices(alice.UserID))
	resp := botSync(t, s, first["pos"].(string), e2ee)
	assert.Equal(t, map[string]any{"changed": []any{alice.UserID.String()}, "left": []any{}}, ext(t, resp, "e2ee")["device_lists"])
	resp = botSync(t, s, resp["pos"].(string), e2ee)
	assert.Equal(t, map[string]any{"changed": []any{}, "left": []any{}}, ext(t, resp, "e2ee")["device_lists"], "a change is reported once per pos")

	bot, _, _ := s.Bot()
	status, q := call(t, s, http.MethodPost, "/_matrix/client/v3/keys/query", map[string]any{"device_keys": map[string]any{alice.UserID.String(): []string{}}})
	require.Equal(t, http.StatusOK, status)
	assert.Len(t, q["device_keys"].(map[string]any)[alice.UserID.String()], 2)
	queries := s.Queries(bot, alice.UserID)
	require.Len(t, queries, 1)
	assert.Equal(t, 2, queries[0].Devices)
}

func TestUnknownTokenAndPath(t *testing.T) {
	s := newServer(t, -1)
	status, body := callAs(t, s, "wrong", http.MethodGet, "/_matrix/client/v3/account/whoami", nil)
	assert.Equal(t, http.StatusUnauthorized, status)
	assert.Equal(t, "M_UNKNOWN_TOKEN", body["errcode"])
	status, body = call(t, s, http.MethodGet, "/_matrix/client/v3/account/whoami", nil)
	assert.Equal(t, http.StatusOK, status)
	assert.Equal(t, "E2EEBOT", body["device_id"])
	status, body = call(t, s, http.MethodGet, "/_matrix/client/v3/nothing", nil)
	assert.Equal(t, http.StatusNotFound, status)
	assert.Equal(t, "M_UNRECOGNIZED", body["errcode"])
	status, _ = call(t, s, http.MethodPost, "/_matrix/client/v3/keys/upload", "not an object")
	assert.Equal(t, http.StatusBadRequest, status)
}

func claimReq(user id.UserID, dev id.DeviceID) *mautrix.ReqClaimKeys {
	return &mautrix.ReqClaimKeys{OneTimeKeys: mautrix.OneTimeKeysRequest{user: {dev: id.KeyAlgorithmSignedCurve25519}}}
}

func TestPeersExchangeEncryptedMessages(t *testing.T) {
	s := newServer(t, -1)
	alice, err := s.NewPeer(t.Context(), "@alice:demo.invalid")
	require.NoError(t, err)
	bob, err := s.NewPeer(t.Context(), "@bob:demo.invalid")
	require.NoError(t, err)
	roomID, err := alice.CreateEncryptedRoom(t.Context(), "Pair", bob.UserID)
	require.NoError(t, err)
	_, err = bob.Client.JoinRoomByID(t.Context(), roomID)
	require.NoError(t, err)

	evtID, err := bob.SendEncrypted(t.Context(), roomID, "hi alice")
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	got, err := alice.NextMessage(ctx, roomID, bob.UserID)
	require.NoError(t, err)
	assert.Equal(t, evtID, got.ID)
	assert.Equal(t, "hi alice", got.Content.AsMessage().Body)
	assert.Equal(t, []Decryption{{User: alice.UserID, Device: alice.DeviceID, EventID: evtID, Sender: bob.UserID, Body: "hi alice"}}, s.Decrypted())
	// Bob claimed one of alice's one-time keys to start the Olm session.
	assert.Len(t, s.Claims(alice.UserID, alice.DeviceID), 1)
	assert.Zero(t, s.PendingToDevice(alice.UserID, alice.DeviceID), "handled to-device events are deleted")

	// The same message is not returned twice.
	short, cancel2 := context.WithTimeout(t.Context(), 200*time.Millisecond)
	defer cancel2()
	_, err = alice.NextMessage(short, roomID, bob.UserID)
	assert.ErrorIs(t, err, context.DeadlineExceeded)
}

// TestMalformedRequestsAreRefused sends bodies of the wrong shape to every endpoint: each gets
// a 4xx answer (a panicking handler would drop the connection instead).
func TestMalformedRequestsAreRefused(t *testing.T) {
	s := newServer(t, 5)
	for _, tc := range []struct {
		method, path string
		body         any
	}{
		{http.MethodPost, "/_matrix/client/v3/keys/upload", map[string]any{"one_time_keys": []int{1}}},
		{http.MethodPost, "/_matrix/client/v3/keys/upload", map[string]any{"device_keys": map[string]any{"user_id": "@mallory:x", "device_id": "X"}}},
		{http.MethodPost, "/_matrix/client/v3/keys/query", map[string]any{"device_keys": "all"}},
		{http.MethodPost, "/_matrix/client/v3/keys/claim", map[string]any{"one_time_keys": map[string]any{"@a:b": "c"}}},
		{http.MethodPut, "/_matrix/client/v3/sendToDevice/t/1", map[string]any{"messages": []any{}}},
		{http.MethodPut, "/_matrix/client/v3/rooms/!nope:x/send/m.room.message/1", map[string]any{"body": "x"}},
		{http.MethodPut, "/_matrix/client/v3/rooms/!nope:x/send/m.room.message/2", "text"},
		{http.MethodPost, "/_matrix/client/v3/join/!nope:x", map[string]any{}},
		{http.MethodGet, "/_matrix/client/v3/rooms/!nope:x/members", nil},
		{http.MethodPost, syncPath + "?timeout=0", map[string]any{"lists": "all"}},
		{http.MethodPost, syncPath + "?timeout=0&pos=1_2", map[string]any{}},
		{http.MethodPost, syncPath + "?timeout=0&pos=-1_0_0", map[string]any{}},
	} {
		status, body := call(t, s, tc.method, tc.path, tc.body)
		assert.True(t, status >= 400 && status < 500, "%s %s %v: %d %v", tc.method, tc.path, tc.body, status, body)
	}
	// Reversed ranges select nothing; ranges past the end select up to the end.
	resp := botSync(t, s, "", map[string]any{"lists": map[string]any{
		"a": map[string]any{"ranges": [][]int{{4, 1}}, "required_state": []any{}, "timeline_limit": 0},
		"b": map[string]any{"ranges": [][]int{{3, 1 << 30}}, "timeline_limit": -1, "required_state": []any{}},
	}})
	assert.Len(t, resp["rooms"], 2)
}

// TestSyncIsSynapseLike holds the demo server to the Synapse personality: a pos it cannot
// parse is an invalid stream token, an idle long-poll keeps the request's pos and carries the
// e2ee counts, ranges are echoed, and a list without ranges is only counted.
func TestSyncIsSynapseLike(t *testing.T) {
	s, err := NewServer(Options{Rooms: 3, Seed: 7, Dir: t.TempDir(), IdleHold: 200 * time.Millisecond})
	require.NoError(t, err)
	t.Cleanup(s.Close)
	status, body := call(t, s, http.MethodPost, syncPath+"?timeout=0&pos=12", map[string]any{})
	assert.Equal(t, http.StatusBadRequest, status)
	assert.Equal(t, map[string]any{"errcode": "M_UNKNOWN", "error": "Invalid stream token"}, body)

	req := map[string]any{
		"lists": map[string]any{
			"window":  map[string]any{"ranges": [][]int{{0, 1}, {2, 50}}, "required_state": []any{}, "timeline_limit": 0},
			"counted": map[string]any{"required_state": []any{}, "timeline_limit": 0},
		},
		"extensions": map[string]any{"e2ee": map[string]any{"enabled": true}},
	}
	first := botSync(t, s, "", req)
	lists := first["lists"].(map[string]any)
	assert.Equal(t, map[string]any{"count": float64(3)}, lists["counted"])
	ops := lists["window"].(map[string]any)["ops"].([]any)
	require.Len(t, ops, 2)
	assert.Equal(t, []any{float64(2), float64(50)}, ops[1].(map[string]any)["range"], "the range as requested")
	assert.Len(t, first["rooms"], 3)

	pos := first["pos"].(string)
	began := time.Now()
	status, idle := call(t, s, http.MethodPost, syncPath+"?timeout=30000&pos="+pos, req)
	require.Equal(t, http.StatusOK, status, idle)
	assert.GreaterOrEqual(t, time.Since(began), 200*time.Millisecond, "the long-poll waited, up to IdleHold")
	assert.Equal(t, pos, idle["pos"], "an idle long-poll keeps the pos")
	assert.Empty(t, idle["rooms"])
	assert.Equal(t, map[string]any{"signed_curve25519": float64(0)}, ext(t, idle, "e2ee")["device_one_time_keys_count"])

	reqs := s.SyncRequests()
	require.Len(t, reqs, 3)
	assert.Equal(t, http.StatusBadRequest, reqs[0].Status)
	assert.Equal(t, pos, reqs[2].Pos)
	assert.Equal(t, pos, reqs[2].AnswerPos)
	assert.GreaterOrEqual(t, reqs[2].Answered.Sub(reqs[2].Arrived), 200*time.Millisecond, "arrival is before the long-poll")
}

// The server behaviour the SDK's outbox must survive: a send stored whose answer was lost, and
// (as Dendrite after such a loss) the same transaction ID accepted again as a new event. The
// sender's own events carry unsigned.transaction_id in /messages (from the end, without a
// from token) and in the sliding sync timeline, as the client-server API specifies.
func TestLostSendAnswersWithoutTxnDedup(t *testing.T) {
	var drop atomic.Bool
	s, err := NewServer(Options{Rooms: 3, Seed: 7, Dir: t.TempDir(), NoTxnDedup: true,
		SendFault: func(id.RoomID, string) SendFault {
			if drop.Load() {
				return SendStoreDropResponse
			}
			return SendAnswer
		}})
	require.NoError(t, err)
	t.Cleanup(s.Close)
	bot, dev, token := s.Bot()
	roomID := s.acct.Rooms[0].ID
	cli, err := mautrix.NewClient(s.URL(), bot, token)
	require.NoError(t, err)
	cli.DeviceID = dev
	ctx := t.Context()

	drop.Store(true)
	_, err = cli.SendText(ctx, roomID, "hi")
	require.Error(t, err, "the answer was lost")
	events := s.RoomEvents(roomID)
	stored := events[len(events)-1]
	assert.Equal(t, "hi", stored.Content.Raw["body"], "but the event was stored")

	msgs, err := cli.Messages(ctx, roomID, "", "", mautrix.DirectionBackward, nil, 10)
	require.NoError(t, err)
	require.NotEmpty(t, msgs.Chunk)
	assert.Equal(t, stored.ID, msgs.Chunk[0].ID, "newest first, from the end")
	txn := msgs.Chunk[0].Unsigned.TransactionID
	assert.NotEmpty(t, txn, "the sender sees its transaction ID")

	drop.Store(false)
	_, err = cli.SendMessageEvent(ctx, roomID, event.EventMessage, &event.MessageEventContent{MsgType: event.MsgText, Body: "hi"}, mautrix.ReqSendEvent{TransactionID: txn})
	require.NoError(t, err)
	assert.Len(t, s.RoomEvents(roomID), len(events)+1, "the repeated transaction ID made a second event")
	assert.Equal(t, 1, s.DuplicateSends())

	// Others do not see the transaction ID.
	alice, err := s.NewPeer(ctx, "@alice:demo.invalid")
	require.NoError(t, err)
	room2, err := alice.CreateEncryptedRoom(ctx, "r", bot)
	require.NoError(t, err)
	_, err = cli.JoinRoomByID(ctx, room2)
	require.NoError(t, err)
	_, err = cli.SendMessageEvent(ctx, room2, event.EventMessage, &event.MessageEventContent{MsgType: event.MsgText, Body: "mine"}, mautrix.ReqSendEvent{TransactionID: "t-1"})
	require.NoError(t, err)
	theirs, err := alice.Client.Messages(ctx, room2, "", "", mautrix.DirectionBackward, nil, 1)
	require.NoError(t, err)
	require.Len(t, theirs.Chunk, 1)
	assert.Empty(t, theirs.Chunk[0].Unsigned.TransactionID)
	resp := botSync(t, s, "", map[string]any{"lists": map[string]any{"all": map[string]any{
		"ranges": [][]int{{0, 10}}, "timeline_limit": 1, "required_state": [][]string{}}}})
	tl := resp["rooms"].(map[string]any)[room2.String()].(map[string]any)["timeline"].([]any)
	assert.Equal(t, "t-1", tl[len(tl)-1].(map[string]any)["unsigned"].(map[string]any)["transaction_id"])
}

// POST /login with the bot's password gives the bot's device and token.
func TestPasswordLogin(t *testing.T) {
	s := newServer(t, 1)
	bot, dev, token := s.Bot()
	cli, err := mautrix.NewClient(s.URL(), "", "")
	require.NoError(t, err)
	_, err = cli.Login(t.Context(), &mautrix.ReqLogin{Type: mautrix.AuthTypePassword,
		Identifier: mautrix.UserIdentifier{Type: mautrix.IdentifierTypeUser, User: bot.String()},
		Password:   "wrong"})
	require.Error(t, err)
	resp, err := cli.Login(t.Context(), &mautrix.ReqLogin{Type: mautrix.AuthTypePassword,
		Identifier: mautrix.UserIdentifier{Type: mautrix.IdentifierTypeUser, User: bot.String()},
		Password:   BotPassword})
	require.NoError(t, err)
	assert.Equal(t, dev, resp.DeviceID)
	assert.Equal(t, token, resp.AccessToken)
	assert.Equal(t, 1, s.Logins())
}

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
			assert.Equal(t, ra.State[k].ID, rb.State[k].ID)
			assert.JSONEq(t, string(ra.State[k].Content.VeryRaw), string(rb.State[k].Content.VeryRaw))
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
	var err error
	ts.Server, err = NewServer(Options{Account: generate(t, cfg), API: api, IdleHold: 50 * time.Millisecond, Dir: t.TempDir(), Observer: func(ev Event) {
		select {
		case ts.events <- ev:
		default:
		}
	}})
	require.NoError(t, err)
	ts.url = ts.URL()
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

	// The counts changed: the next answer has them, under a new pos.
	req.Pos, req.Timeout = first.Pos, &timeout
	counted := ts.sliding(req)
	assert.NotEqual(t, first.Pos, counted.Pos)
	assert.JSONEq(t, `{"signed_curve25519":2}`, string(e2eeOf(t, counted)["device_one_time_keys_count"]))

	// An idle long-poll returns after the hold, still with the SYNC op and the e2ee fields.
	req.Pos = counted.Pos
	began := time.Now()
	idle := ts.sliding(req)
	assert.Less(t, time.Since(began), 900*time.Millisecond, "held for IdleHold, not the whole timeout")
	assert.Empty(t, idle.Rooms)
	assert.Equal(t, counted.Pos, idle.Pos, "Synapse repeats the pos on an idle long-poll")
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

// Without a listener the server lives inside a synctest bubble, reached in-process; a token
// set for any device authenticates it, and a room added with members answers their list.
func TestInProcessServerServesSetTokensAndAddedRooms(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s, err := NewServer(Options{Rooms: -1, Dir: t.TempDir(), NoListener: true})
		require.NoError(t, err)
		defer s.Close()
		assert.Empty(t, s.URL())
		const alice, room = id.UserID("@alice:example.org"), id.RoomID("!added:example.org")
		s.SetToken("alice-token", alice, "ALICEDEV")
		s.AddRoom(room, alice, BotUserID)
		cli, err := mautrix.NewClient("https://anywhere.invalid", "", "alice-token")
		require.NoError(t, err)
		cli.Client = &http.Client{Transport: slidingsynctest.HandlerTransport(s.Handler())}
		who, err := cli.Whoami(t.Context())
		require.NoError(t, err)
		assert.Equal(t, alice, who.UserID)
		assert.Equal(t, id.DeviceID("ALICEDEV"), who.DeviceID)
		members, err := cli.JoinedMembers(t.Context(), room)
		require.NoError(t, err)
		assert.ElementsMatch(t, []id.UserID{alice, BotUserID}, slices.Collect(maps.Keys(members.Joined)))
		cli.AccessToken = "unknown"
		_, err = cli.Whoami(t.Context())
		assert.ErrorIs(t, err, mautrix.MUnknownToken)
	})
}
