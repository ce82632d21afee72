package ssfront_test

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"net/url"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/sliding-e2ee/sdk/e2ee"
	"github.com/sliding-e2ee/sdk/internal/dendritetest"
	"github.com/sliding-e2ee/sdk/internal/dendritetest/ssfront"
	"github.com/sliding-e2ee/sdk/slidingsync"
)

// recorder records what the extensions hand over.
type recorder struct {
	mu        sync.Mutex
	toDevice  []*event.Event
	deltas    int
	responses int
	state     e2ee.State // committed
}

func (r *recorder) HandleE2EE(_ context.Context, st e2ee.State, d *e2ee.Delta) slidingsync.Step {
	step := slidingsync.Step{After: func(context.Context) {
		r.mu.Lock()
		defer r.mu.Unlock()
		r.state = st
	}}
	if !d.Empty() {
		step.Commit = func(context.Context) error {
			r.mu.Lock()
			defer r.mu.Unlock()
			r.deltas++
			return nil
		}
	}
	return step
}

func (r *recorder) committed() e2ee.State {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.state
}

func (r *recorder) handleToDevice(_ context.Context, evts []*event.Event) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.toDevice = append(r.toDevice, evts...)
	return nil
}

func (r *recorder) counts() (toDevice, responses int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.toDevice), r.responses
}

// eventually polls cond every 50 ms for up to 30 s.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// rawSync posts one sliding sync request to the front as cli and returns the status and body.
func rawSync(t *testing.T, ctx context.Context, base string, cli *mautrix.Client, query url.Values, body any) (int, map[string]json.RawMessage) {
	t.Helper()
	b, err := json.Marshal(body)
	require.NoError(t, err)
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, base+ssfront.SyncPath+"?"+query.Encode(), bytes.NewReader(b))
	require.NoError(t, err)
	req.Header.Set("Authorization", "Bearer "+cli.AccessToken)
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	defer resp.Body.Close()
	var out map[string]json.RawMessage
	require.NoError(t, json.NewDecoder(resp.Body).Decode(&out))
	return resp.StatusCode, out
}

type toDeviceSection struct {
	NextBatch string            `json:"next_batch"`
	Events    []json.RawMessage `json:"events"`
}

func extensions(t *testing.T, out map[string]json.RawMessage) map[string]json.RawMessage {
	t.Helper()
	var exts map[string]json.RawMessage
	require.NoError(t, json.Unmarshal(out["extensions"], &exts))
	return exts
}

// startFront starts Dendrite and the front before it, on loopback.
func startFront(t *testing.T) (*dendritetest.Server, *httptest.Server) {
	t.Helper()
	srv := dendritetest.Start(t)
	upstream, err := url.Parse(srv.URL)
	require.NoError(t, err)
	front := httptest.NewServer(ssfront.New(upstream))
	t.Cleanup(front.Close)
	return srv, front
}

// frontClient returns a client for the same account that talks to the front.
func frontClient(t *testing.T, front *httptest.Server, c *mautrix.Client) *mautrix.Client {
	t.Helper()
	cli, err := mautrix.NewClient(front.URL, c.UserID, c.AccessToken)
	require.NoError(t, err)
	cli.DeviceID = c.DeviceID
	cli.Client = &http.Client{Timeout: time.Minute}
	return cli
}

func TestFront(t *testing.T) {
	srv, front := startFront(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	alice := srv.Register(t, "alice")
	bob := srv.Register(t, "bob")

	// /versions through the front advertises the simplified dialect.
	bobFront := frontClient(t, front, bob)
	versions, err := bobFront.Versions(ctx)
	require.NoError(t, err)
	assert.True(t, versions.Supports(mautrix.UnstableFeature{UnstableFlag: "org.matrix.simplified_msc3575"}))

	// The e2ee section on raw requests: counts always there (0 for bob, who has no keys),
	// device_lists only on a request with pos; an unknown pos is M_UNKNOWN_POS.
	listReq := map[string]any{
		"lists":      map[string]any{"all": map[string]any{"ranges": [][2]int{{0, 9}}, "required_state": [][2]string{{"*", "*"}}, "timeline_limit": 5}},
		"extensions": map[string]any{"e2ee": map[string]any{"enabled": true}},
	}
	status, out := rawSync(t, ctx, front.URL, bob, url.Values{}, listReq)
	require.Equal(t, http.StatusOK, status)
	assert.JSONEq(t, `{"device_one_time_keys_count":{"signed_curve25519":0}}`, string(extensions(t, out)["e2ee"]))
	var pos string
	require.NoError(t, json.Unmarshal(out["pos"], &pos))
	status, out = rawSync(t, ctx, front.URL, bob, url.Values{"pos": {pos}, "timeout": {"0"}}, listReq)
	require.Equal(t, http.StatusOK, status)
	var sec struct {
		Counts      map[string]int  `json:"device_one_time_keys_count"`
		DeviceLists json.RawMessage `json:"device_lists"`
		Fallback    json.RawMessage `json:"device_unused_fallback_key_types"`
	}
	require.NoError(t, json.Unmarshal(extensions(t, out)["e2ee"], &sec))
	assert.Equal(t, map[string]int{"signed_curve25519": 0}, sec.Counts)
	assert.NotNil(t, sec.DeviceLists, "device_lists on a request with pos")
	assert.Nil(t, sec.Fallback, "no fallback key types from Dendrite")
	status, out = rawSync(t, ctx, front.URL, bob, url.Values{"pos": {"no-such-pos"}}, listReq)
	assert.Equal(t, http.StatusBadRequest, status)
	assert.JSONEq(t, `"M_UNKNOWN_POS"`, string(out["errcode"]))

	// Alice's room with a message; bob is invited and joins.
	room, err := alice.CreateRoom(ctx, &mautrix.ReqCreateRoom{Preset: "private_chat", Invite: []id.UserID{bob.UserID}, Name: "front test"})
	require.NoError(t, err)
	sent, err := alice.SendText(ctx, room.RoomID, "hello through the front")
	require.NoError(t, err)
	_, err = bob.JoinRoomByID(ctx, room.RoomID)
	require.NoError(t, err)

	// Bob's connection through the front.
	rec := &recorder{}
	exts, release, err := e2ee.New(bob.UserID, bob.DeviceID, e2ee.Config{Consumer: rec, ToDevice: rec.handleToDevice})
	require.NoError(t, err)
	t.Cleanup(release)
	store := slidingsync.NewMemoryStore()
	conn, err := slidingsync.New(bobFront, slidingsync.Config{
		Protocol: slidingsync.ProtocolMSC4186,
		Store:    store,
		Lists: map[string]slidingsync.List{"all": {ListConfig: slidingsync.ListConfig{
			Ranges:        []slidingsync.Range{{Start: 0, End: 19}},
			RequiredState: slidingsync.RequiredState{Include: []slidingsync.StateFilter{{Type: "m.room.name", StateKey: ""}}, LazyMembers: true},
			TimelineLimit: 10,
		}}},
		Extensions:  exts,
		PollTimeout: time.Second,
		MinBackoff:  50 * time.Millisecond,
		MaxBackoff:  time.Second,
		OnResponse: func(context.Context, *slidingsync.Result) (slidingsync.Step, error) {
			rec.mu.Lock()
			rec.responses++
			rec.mu.Unlock()
			return slidingsync.Step{}, nil
		},
	})
	require.NoError(t, err)
	runCtx, stop := context.WithCancel(ctx)
	runErr := make(chan error, 1)
	go func() { runErr <- conn.Run(runCtx) }()
	stopped := false
	stopConn := func() {
		if !stopped {
			stopped = true
			stop()
			<-runErr
		}
	}
	t.Cleanup(stopConn)

	eventually(t, "bob's connection to show alice's message", func() bool {
		rs, ok := conn.Room(room.RoomID)
		if !ok {
			return false
		}
		for _, evt := range rs.Timeline {
			if evt.ID == sent.EventID {
				return true
			}
		}
		return false
	})
	rs, _ := conn.Room(room.RoomID)
	assert.Equal(t, "front test", rs.Name)
	assert.NotNil(t, rs.StateEvent(event.StateRoomName, ""), "m.room.name in required_state")
	assert.Equal(t, event.MembershipJoin, rs.Membership)
	assert.NotNil(t, rs.StateEvent(event.StateMember, alice.UserID.String()), "lazy member of the sender")
	eventually(t, "the list to hold the room", func() bool {
		ls, ok := conn.List("all")
		return ok && ls.Count == 1 && len(ls.Rooms) == 1 && ls.Rooms[0] == room.RoomID
	})
	// The consumer is told the committed state after the commit.
	eventually(t, "the e2ee section to carry counts", func() bool { return rec.committed().OTKCountsKnown })

	// A to-device message from alice arrives once.
	toDevType := event.Type{Type: "org.example.front_test", Class: event.ToDeviceEventType}
	_, err = alice.SendToDevice(ctx, toDevType, &mautrix.ReqSendToDevice{Messages: map[id.UserID]map[id.DeviceID]*event.Content{
		bob.UserID: {bob.DeviceID: {Raw: map[string]any{"n": 1}}},
	}})
	require.NoError(t, err)
	eventually(t, "the to-device message", func() bool { n, _ := rec.counts(); return n >= 1 })
	_, atReceipt := rec.counts()
	// Two more responses: the request after the receipt acknowledged the batch.
	eventually(t, "two more responses", func() bool { _, r := rec.counts(); return r >= atReceipt+2 })
	n, _ := rec.counts()
	assert.Equal(t, 1, n, "the to-device message arrives once")
	rec.mu.Lock()
	assert.Equal(t, toDevType.Type, rec.toDevice[0].Type.Type)
	assert.Equal(t, alice.UserID, rec.toDevice[0].Sender)
	rec.mu.Unlock()
	cp, err := store.Load(ctx, conn.Key())
	require.NoError(t, err)
	var committed struct{ Since string }
	require.NoError(t, json.Unmarshal(cp.Extensions["to_device"], &committed))
	ack := committed.Since
	require.NotEmpty(t, ack)
	stopConn()

	// After the acknowledgement Dendrite has deleted it: a fresh to-device cursor sees nothing.
	tdOnly := func(since string) map[string]any {
		td := map[string]any{"enabled": true, "limit": 10}
		if since != "" {
			td["since"] = since
		}
		return map[string]any{"lists": map[string]any{}, "extensions": map[string]any{"to_device": td}}
	}
	status, out = rawSync(t, ctx, front.URL, bob, url.Values{}, tdOnly(""))
	require.Equal(t, http.StatusOK, status)
	var td toDeviceSection
	require.NoError(t, json.Unmarshal(extensions(t, out)["to_device"], &td))
	assert.Empty(t, td.Events, "acknowledged messages are gone")

	// Unacknowledged messages are re-sent for the same since, and gone once its next_batch is
	// sent.
	_, err = alice.SendToDevice(ctx, toDevType, &mautrix.ReqSendToDevice{Messages: map[id.UserID]map[id.DeviceID]*event.Content{
		bob.UserID: {bob.DeviceID: {Raw: map[string]any{"n": 2}}},
	}})
	require.NoError(t, err)
	since := td.NextBatch
	eventually(t, "the second to-device message", func() bool {
		status, out = rawSync(t, ctx, front.URL, bob, url.Values{}, tdOnly(since))
		require.Equal(t, http.StatusOK, status)
		require.NoError(t, json.Unmarshal(extensions(t, out)["to_device"], &td))
		return len(td.Events) == 1
	})
	status, out = rawSync(t, ctx, front.URL, bob, url.Values{}, tdOnly(since))
	require.Equal(t, http.StatusOK, status)
	var again toDeviceSection
	require.NoError(t, json.Unmarshal(extensions(t, out)["to_device"], &again))
	assert.Len(t, again.Events, 1, "not acknowledged yet: sent again")
	status, out = rawSync(t, ctx, front.URL, bob, url.Values{}, tdOnly(td.NextBatch))
	require.Equal(t, http.StatusOK, status)
	require.NoError(t, json.Unmarshal(extensions(t, out)["to_device"], &again))
	assert.Empty(t, again.Events, "acknowledged: not sent again")
}

// TestToDeviceSurvivesRoomCursor checks that the room cursor never deletes to-device messages
// the client has not acknowledged: Dendrite deletes every message up to the to-device position
// of whatever since a /sync carries, so the front must not hand the room cursor's own position
// to Dendrite while the to_device extension lags behind it.
func TestToDeviceSurvivesRoomCursor(t *testing.T) {
	srv, front := startFront(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	alice := srv.Register(t, "alice")
	bob := srv.Register(t, "bob")

	type result struct {
		pos string
		td  toDeviceSection
	}
	do := func(pos, since string) result {
		td := map[string]any{"enabled": true, "limit": 10}
		if since != "" {
			td["since"] = since
		}
		q := url.Values{"timeout": {"0"}}
		if pos != "" {
			q.Set("pos", pos)
		}
		status, out := rawSync(t, ctx, front.URL, bob, q, map[string]any{"lists": map[string]any{}, "extensions": map[string]any{"to_device": td}})
		require.Equal(t, http.StatusOK, status)
		var r result
		require.NoError(t, json.Unmarshal(out["pos"], &r.pos))
		require.NoError(t, json.Unmarshal(extensions(t, out)["to_device"], &r.td))
		return r
	}

	first := do("", "")
	require.NotEmpty(t, first.td.NextBatch)
	_, err := alice.SendToDevice(ctx, event.Type{Type: "org.example.front_test", Class: event.ToDeviceEventType}, &mautrix.ReqSendToDevice{
		Messages: map[id.UserID]map[id.DeviceID]*event.Content{bob.UserID: {bob.DeviceID: {Raw: map[string]any{"n": 1}}}},
	})
	require.NoError(t, err)
	got := first
	eventually(t, "the to-device message", func() bool {
		got = do(got.pos, first.td.NextBatch)
		return len(got.td.Events) == 1
	})
	// Not acknowledged (the client did not commit the batch): the room cursor has moved past
	// the message, yet the message is served again.
	again := do(got.pos, first.td.NextBatch)
	assert.Len(t, again.td.Events, 1, "an unacknowledged message survives the room cursor")
	// Acknowledged: gone.
	acked := do(again.pos, again.td.NextBatch)
	assert.Empty(t, acked.td.Events)
}

// TestInviteThenJoin follows a room from invite to join on one connection, and the one-time
// key count after an upload.
func TestInviteThenJoin(t *testing.T) {
	srv, front := startFront(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	alice := srv.Register(t, "alice")
	bob := srv.Register(t, "bob")

	bobFront := frontClient(t, front, bob)
	rec := &recorder{}
	exts, release, err := e2ee.New(bob.UserID, bob.DeviceID, e2ee.Config{Consumer: rec})
	require.NoError(t, err)
	t.Cleanup(release)
	conn, err := slidingsync.New(bobFront, slidingsync.Config{
		Protocol: slidingsync.ProtocolMSC4186,
		Lists: map[string]slidingsync.List{"all": {ListConfig: slidingsync.ListConfig{
			Ranges:        []slidingsync.Range{{Start: 0, End: 19}},
			RequiredState: slidingsync.RequiredState{Include: []slidingsync.StateFilter{{Type: "*", StateKey: "*"}}},
			TimelineLimit: 20,
		}}},
		Extensions:  exts,
		PollTimeout: time.Second,
		MinBackoff:  50 * time.Millisecond,
		MaxBackoff:  time.Second,
	})
	require.NoError(t, err)
	runCtx, stop := context.WithCancel(ctx)
	runErr := make(chan error, 1)
	go func() { runErr <- conn.Run(runCtx) }()
	t.Cleanup(func() { stop(); <-runErr })
	eventually(t, "the first response", func() bool { return conn.Pos() != "" })

	room, err := alice.CreateRoom(ctx, &mautrix.ReqCreateRoom{Preset: "private_chat", Invite: []id.UserID{bob.UserID}})
	require.NoError(t, err)
	eventually(t, "the invite", func() bool {
		rs, ok := conn.Room(room.RoomID)
		return ok && rs.Membership == event.MembershipInvite && len(rs.InviteState) > 0
	})
	sent, err := alice.SendText(ctx, room.RoomID, "before the join")
	require.NoError(t, err)
	_, err = bob.JoinRoomByID(ctx, room.RoomID)
	require.NoError(t, err)
	eventually(t, "the joined room with the message", func() bool {
		rs, ok := conn.Room(room.RoomID)
		if !ok || rs.Membership != event.MembershipJoin {
			return false
		}
		for _, evt := range rs.Timeline {
			if evt.ID == sent.EventID {
				return true
			}
		}
		return false
	})
	rs, _ := conn.Room(room.RoomID)
	assert.Empty(t, rs.InviteState, "the initial join entry replaced the invite")
	assert.NotNil(t, rs.StateEvent(event.StateCreate, ""), "full state after the join")
	assert.NotNil(t, rs.StateEvent(event.StateMember, bob.UserID.String()))

	// Bob uploads one-time keys: the count reaches the e2ee extension.
	otks := map[id.KeyID]mautrix.OneTimeKey{}
	for i := range 3 {
		otks[id.NewKeyID(id.KeyAlgorithmSignedCurve25519, "AAAA"+string(rune('A'+i)))] = mautrix.OneTimeKey{
			Key: id.Curve25519("key" + string(rune('A'+i)) + "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"),
		}
	}
	_, err = bob.UploadKeys(ctx, &mautrix.ReqUploadKeys{OneTimeKeys: otks})
	require.NoError(t, err)
	eventually(t, "a count of 3", func() bool {
		return rec.committed().OTKCounts[id.KeyAlgorithmSignedCurve25519] == 3
	})
}
