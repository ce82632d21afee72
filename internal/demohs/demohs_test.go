package demohs

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
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
	roomID := s.generated[0]
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
	status, body := call(t, s, http.MethodPost, syncPath+"?timeout=0&pos=999999_0_0", list(20))
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
	s, err := NewServer(Options{Rooms: 3, Seed: 7, Dir: t.TempDir(), PollTimeout: 200 * time.Millisecond})
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
	assert.GreaterOrEqual(t, time.Since(began), 200*time.Millisecond, "the long-poll waited, up to PollTimeout")
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
	roomID := s.generated[0]
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
		Password:   DefaultBotPassword})
	require.NoError(t, err)
	assert.Equal(t, dev, resp.DeviceID)
	assert.Equal(t, token, resp.AccessToken)
	assert.Equal(t, 1, s.Logins())
}
