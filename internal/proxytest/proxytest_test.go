package proxytest_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"maunium.net/go/mautrix"
	mcrypto "maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/sliding-e2ee/sdk/crypto"
	"github.com/sliding-e2ee/sdk/e2ee"
	"github.com/sliding-e2ee/sdk/internal/dendritetest"
	"github.com/sliding-e2ee/sdk/internal/pgtest"
	"github.com/sliding-e2ee/sdk/internal/proxytest"
	"github.com/sliding-e2ee/sdk/slidingsync"
	"github.com/sliding-e2ee/sdk/slidingsync/sqlstore/dbopen"
)

func TestMain(m *testing.M) {
	os.Exit(pgtest.Main(m))
}

// ssResponse is one MSC3575 response as the proxy sent it.
type ssResponse struct {
	Pos        string                     `json:"pos"`
	Lists      map[string]json.RawMessage `json:"lists"`
	Rooms      map[id.RoomID]ssRoom       `json:"rooms"`
	Extensions map[string]json.RawMessage `json:"extensions"`
	took       time.Duration
}

type ssRoom struct {
	Timeline []*event.Event `json:"timeline"`
}

// e2ee returns the response's e2ee section as sent (nil when absent) and its top-level keys.
func (r *ssResponse) e2ee(t *testing.T) (raw json.RawMessage, keys map[string]json.RawMessage) {
	t.Helper()
	raw = r.Extensions["e2ee"]
	if raw != nil {
		require.NoError(t, json.Unmarshal(raw, &keys))
	}
	return raw, keys
}

// otkCount returns the signed_curve25519 count of the e2ee section, and whether the response
// carried a device_one_time_keys_count at all.
func (r *ssResponse) otkCount(t *testing.T) (int, bool) {
	t.Helper()
	_, keys := r.e2ee(t)
	raw, ok := keys["device_one_time_keys_count"]
	if !ok {
		return 0, false
	}
	var counts map[string]int
	require.NoError(t, json.Unmarshal(raw, &counts))
	return counts["signed_curve25519"], true
}

func (r *ssResponse) changed(t *testing.T) []id.UserID {
	t.Helper()
	_, keys := r.e2ee(t)
	var dl struct {
		Changed []id.UserID `json:"changed"`
	}
	if raw, ok := keys["device_lists"]; ok {
		require.NoError(t, json.Unmarshal(raw, &dl))
	}
	return dl.Changed
}

func (r *ssResponse) hasMessage(body string) bool {
	for _, room := range r.Rooms {
		for _, evt := range room.Timeline {
			if evt != nil && evt.Type == event.EventMessage {
				var c struct {
					Body string `json:"body"`
				}
				if json.Unmarshal(evt.Content.VeryRaw, &c) == nil && c.Body == body {
					return true
				}
			}
		}
	}
	return false
}

// ssClient sends raw MSC3575 requests to the proxy for one device, with the same body every
// time (lists, e2ee and to_device), as a client that keeps stickiness itself does.
type ssClient struct {
	t       *testing.T
	proxy   string
	token   string
	http    *http.Client
	toSince string

	// last is the previous request, for retransmit.
	last struct {
		pos     string
		timeout int
		since   string
	}
}

// errResponse is a non-200 answer of the proxy.
type errResponse struct {
	status int
	body   map[string]any
}

func (e *errResponse) Error() string { return fmt.Sprintf("HTTP %d: %v", e.status, e.body) }

func (c *ssClient) sync(ctx context.Context, pos string, timeoutMS int) (*ssResponse, error) {
	c.t.Helper()
	c.last.pos, c.last.timeout, c.last.since = pos, timeoutMS, c.toSince
	q := url.Values{"timeout": {strconv.Itoa(timeoutMS)}}
	if pos != "" {
		q.Set("pos", pos)
	}
	toDevice := map[string]any{"enabled": true, "limit": 100}
	if c.toSince != "" {
		toDevice["since"] = c.toSince
	}
	body, err := json.Marshal(map[string]any{
		"lists": map[string]any{"all": map[string]any{
			"ranges":         [][2]int{{0, 10}},
			"timeline_limit": 5,
			"required_state": [][2]string{{"m.room.encryption", ""}},
		}},
		"extensions": map[string]any{"e2ee": map[string]any{"enabled": true}, "to_device": toDevice},
	})
	require.NoError(c.t, err)
	req, err := http.NewRequestWithContext(ctx, http.MethodPost,
		c.proxy+"/_matrix/client/unstable/org.matrix.msc3575/sync?"+q.Encode(), bytes.NewReader(body))
	require.NoError(c.t, err)
	req.Header.Set("Authorization", "Bearer "+c.token)
	req.Header.Set("Content-Type", "application/json")
	start := time.Now()
	resp, err := c.http.Do(req)
	require.NoError(c.t, err)
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	require.NoError(c.t, err)
	if resp.StatusCode != http.StatusOK {
		e := &errResponse{status: resp.StatusCode}
		_ = json.Unmarshal(raw, &e.body)
		return nil, e
	}
	out := &ssResponse{took: time.Since(start)}
	require.NoError(c.t, json.Unmarshal(raw, &out.Extensions))
	require.NoError(c.t, json.Unmarshal(raw, out))
	var td struct {
		NextBatch string `json:"next_batch"`
	}
	if raw := out.Extensions["to_device"]; raw != nil {
		require.NoError(c.t, json.Unmarshal(raw, &td))
		if td.NextBatch != "" {
			c.toSince = td.NextBatch
		}
	}
	c.t.Logf("pos %q timeout %d -> %s in %s: e2ee=%s", pos, timeoutMS, out.Pos, out.took.Round(time.Millisecond), out.Extensions["e2ee"])
	if pos != "" {
		assert.NotEqual(c.t, pos, out.Pos, "the proxy issues a new pos for every response")
	}
	return out, nil
}

// mustSync is sync for a request that must succeed.
func (c *ssClient) mustSync(ctx context.Context, pos string, timeoutMS int) *ssResponse {
	c.t.Helper()
	r, err := c.sync(ctx, pos, timeoutMS)
	require.NoError(c.t, err)
	return r
}

// retransmit sends the previous request again, byte for byte, as a client does whose
// response was lost.
func (c *ssClient) retransmit(ctx context.Context) *ssResponse {
	c.t.Helper()
	c.toSince = c.last.since
	return c.mustSync(ctx, c.last.pos, c.last.timeout)
}

// pollUntil long-polls from pos (2 s at a time, at most 45 s) until cond holds for a response;
// it returns that response and every response it got on the way.
func (c *ssClient) pollUntil(ctx context.Context, pos, what string, cond func(*ssResponse) bool) (*ssResponse, []*ssResponse) {
	c.t.Helper()
	deadline := time.Now().Add(45 * time.Second)
	var seen []*ssResponse
	for {
		r := c.mustSync(ctx, pos, 2000)
		seen = append(seen, r)
		if cond(r) {
			return r, seen
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("no response showed %s within 45 s", what)
		}
		pos = r.Pos
	}
}

// uploadKeys uploads the device keys and n one-time keys of cli's device through mautrix's
// OlmMachine (goolm) on a SQLite crypto store.
func uploadKeys(t *testing.T, ctx context.Context, cli *mautrix.Client, n int) {
	t.Helper()
	db, err := dbopen.Open(filepath.Join(t.TempDir(), cli.DeviceID.String()+"-crypto.db"), dbopen.Config{})
	require.NoError(t, err)
	t.Cleanup(func() { _ = db.Close() })
	store := mcrypto.NewSQLCryptoStore(db, nil, cli.UserID.String(), cli.DeviceID, []byte("pickle key"))
	require.NoError(t, store.DB.Upgrade(ctx))
	log := zerolog.Nop()
	mach := mcrypto.NewOlmMachine(cli, &log, store, mautrix.NewMemoryStateStore().(mcrypto.StateStore))
	require.NoError(t, mach.Load(ctx))
	// ShareKeys tops up to half of what goolm keeps (50): claiming 50-n as present uploads n.
	require.NoError(t, mach.ShareKeys(ctx, 50-n))
}

// claimOne claims one of dev's signed_curve25519 one-time keys and reports whether there was
// one.
func claimOne(t *testing.T, ctx context.Context, by *mautrix.Client, user id.UserID, dev id.DeviceID) bool {
	t.Helper()
	res, err := by.ClaimKeys(ctx, &mautrix.ReqClaimKeys{OneTimeKeys: mautrix.OneTimeKeysRequest{
		user: {dev: id.KeyAlgorithmSignedCurve25519},
	}})
	require.NoError(t, err)
	return len(res.OneTimeKeys[user][dev]) > 0
}

// The proxy in front of Dendrite, as the package documentation describes it: discovery
// through Dendrite's .well-known, no e2ee section in a connection's first response, one-time
// key counts only while Dendrite reports some (never 0), a new pos on every response, and
// M_UNKNOWN_POS for every pos issued before a restart, after which device-list changes made
// while it was down still arrive.
func TestProxyOverDendriteOmitsFirstE2EEAndZeroCountAndForgetsPosOnRestart(t *testing.T) {
	start := time.Now()
	srv, proxy := proxytest.Start(t)
	t.Logf("dendrite and the proxy answered after %s", time.Since(start).Round(time.Millisecond))
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()

	alice := srv.Register(t, "alice")
	bob := srv.Register(t, "bob")

	// Discovery: Dendrite does not advertise the Synapse dialect, and its .well-known names
	// the proxy.
	ep, err := slidingsync.Discover(ctx, alice, slidingsync.ProtocolAuto)
	require.NoError(t, err)
	assert.Equal(t, slidingsync.ProtocolMSC3575, ep.Protocol)
	require.NotNil(t, ep.BaseURL)
	assert.Equal(t, proxy.URL, ep.BaseURL.String())

	// Dendrite's initial v2 /sync (no since) carries no one-time key count even when the
	// device has keys, so neither does the proxy's initial poll of a device.
	uploadKeys(t, ctx, alice, 3)
	initial := v2Sync(t, ctx, alice, "")
	assert.NotContains(t, initial, "device_one_time_keys_count", "Dendrite's initial v2 /sync has no OTK count")
	// Dendrite applies writes asynchronously: wait until an incremental v2 /sync shows the
	// count, so that the proxy's first incremental poll finds nothing new and waits.
	var since string
	require.NoError(t, json.Unmarshal(initial["next_batch"], &since))
	deadline := time.Now().Add(20 * time.Second)
	for !strings.Contains(string(v2Sync(t, ctx, alice, since)["device_one_time_keys_count"]), `"signed_curve25519":3`) {
		require.True(t, time.Now().Before(deadline), "Dendrite's v2 /sync showed no count of 3 within 20 s")
		time.Sleep(100 * time.Millisecond)
	}
	c := &ssClient{t: t, proxy: proxy.URL, token: alice.AccessToken, http: &http.Client{Timeout: time.Minute}}

	// 1. The first response of a connection has no e2ee section, although Alice has keys (the
	// proxy has only polled Dendrite's initial v2 /sync for her), and it comes at once for
	// timeout=0.
	first := c.mustSync(ctx, "", 0)
	raw, _ := first.e2ee(t)
	assert.Nil(t, raw, "no e2ee section in the first response")
	require.NotEmpty(t, first.Pos)
	assert.Less(t, first.took, 5*time.Second, "the first response does not wait")

	// A room Alice writes to, so that her own messages wake the proxy's v2 poll of her device.
	room, err := alice.CreateRoom(ctx, &mautrix.ReqCreateRoom{Preset: "private_chat", Invite: []id.UserID{bob.UserID}})
	require.NoError(t, err)
	_, err = bob.JoinRoomByID(ctx, room.RoomID)
	require.NoError(t, err)

	// 2. The count of 3 comes with the first incremental v2 response of the proxy's poll,
	// here woken by a message (left alone, that poll times out after 30 s).
	_, err = alice.SendText(ctx, room.RoomID, "wake 0")
	require.NoError(t, err)
	r, _ := c.pollUntil(ctx, first.Pos, "an OTK count", func(r *ssResponse) bool { _, ok := r.otkCount(t); return ok })
	n, _ := r.otkCount(t)
	assert.Equal(t, 3, n)
	pos := r.Pos

	// The same request again (a client whose response was lost) gets the same response: the
	// same new pos, the same count.
	again := c.retransmit(ctx)
	assert.Equal(t, r.Pos, again.Pos, "a retransmitted request gets the response it had, with its pos")
	n, ok := again.otkCount(t)
	assert.True(t, ok && n == 3, "the retransmitted response carries the count again")

	// 3. One claim: the count goes down to 2 once a v2 response carries it.
	require.True(t, claimOne(t, ctx, bob, alice.UserID, alice.DeviceID))
	_, err = alice.SendText(ctx, room.RoomID, "wake 1")
	require.NoError(t, err)
	r, _ = c.pollUntil(ctx, pos, "the count after one claim", func(r *ssResponse) bool { n, ok := r.otkCount(t); return ok && n == 2 })
	pos = r.Pos

	// 4. The last two claims: Dendrite then leaves the count out of v2 /sync, and the proxy
	// never reports 0. The message after the claims comes from the same v2 response that
	// left the count out; a few more polls show no count either.
	require.True(t, claimOne(t, ctx, bob, alice.UserID, alice.DeviceID))
	require.True(t, claimOne(t, ctx, bob, alice.UserID, alice.DeviceID))
	require.False(t, claimOne(t, ctx, bob, alice.UserID, alice.DeviceID), "no key left")
	_, err = alice.SendText(ctx, room.RoomID, "wake 2")
	require.NoError(t, err)
	r, seen := c.pollUntil(ctx, pos, "the message after the last claim", func(r *ssResponse) bool { return r.hasMessage("wake 2") })
	for i := 0; i < 3; i++ {
		r = c.mustSync(ctx, r.Pos, 1000)
		seen = append(seen, r)
	}
	for _, s := range seen {
		n, ok := s.otkCount(t)
		assert.False(t, ok, "no count after the last claim (got %d)", n)
	}
	pos = r.Pos
	// What the proxy never says, an empty /keys/upload does: Dendrite answers it with the
	// device's real count (its map leaves signed_curve25519 out, which means 0).
	uploadResp, err := alice.MakeFullRequest(ctx, mautrix.FullRequest{Method: http.MethodPost,
		URL: alice.BuildClientURL("v3", "keys", "upload"), RequestJSON: map[string]any{}})
	require.NoError(t, err)
	t.Logf("empty /keys/upload after exhaustion: %s", uploadResp)
	var counts struct {
		Counts map[string]int `json:"one_time_key_counts"`
	}
	require.NoError(t, json.Unmarshal(uploadResp, &counts))
	assert.Zero(t, counts.Counts["signed_curve25519"], "the real count is 0")

	// 5. A restart forgets every connection: the last pos gets 400 M_UNKNOWN_POS. Bob's new
	// device keys, uploaded while the proxy was down, still reach Alice afterwards.
	proxy.Kill(t)
	uploadKeys(t, ctx, bob, 1)
	proxy.Restart(t)
	_, err = c.sync(ctx, pos, 0)
	var e *errResponse
	require.ErrorAs(t, err, &e)
	assert.Equal(t, http.StatusBadRequest, e.status)
	assert.Equal(t, "M_UNKNOWN_POS", e.body["errcode"])
	t.Logf("old pos after restart: %s", e)

	// The first response of the new connection repeats the last count the proxy stored, 2,
	// although the real count is 0.
	again = c.mustSync(ctx, "", 0)
	n, ok = again.otkCount(t)
	assert.True(t, ok, "the first response after the restart carries the stored count")
	assert.Equal(t, 2, n, "the stored count is the last non-zero one")
	if !contains(again.changed(t), bob.UserID) {
		c.pollUntil(ctx, again.Pos, "bob's device list change", func(r *ssResponse) bool { return contains(r.changed(t), bob.UserID) })
	}
	t.Logf("test body took %s", time.Since(start).Round(time.Millisecond))
}

// v2Sync returns the top-level keys of a v2 /sync of cli from since (initial if empty), with
// timeout 0.
func v2Sync(t *testing.T, ctx context.Context, cli *mautrix.Client, since string) map[string]json.RawMessage {
	t.Helper()
	q := map[string]string{"timeout": "0"}
	if since != "" {
		q["since"] = since
	}
	body, err := cli.MakeFullRequest(ctx, mautrix.FullRequest{Method: http.MethodGet,
		URL: cli.BuildURLWithQuery(mautrix.ClientURLPath{"v3", "sync"}, q)})
	require.NoError(t, err)
	var keys map[string]json.RawMessage
	require.NoError(t, json.Unmarshal(body, &keys))
	return keys
}

func contains(users []id.UserID, u id.UserID) bool {
	for _, x := range users {
		if x == u {
			return true
		}
	}
	return false
}

// toDevice returns the to_device section of the response: its next_batch and its events.
func (r *ssResponse) toDevice(t *testing.T) (nextBatch string, events []json.RawMessage) {
	t.Helper()
	raw := r.Extensions["to_device"]
	if raw == nil {
		return "", nil
	}
	var td struct {
		NextBatch string            `json:"next_batch"`
		Events    []json.RawMessage `json:"events"`
	}
	require.NoError(t, json.Unmarshal(raw, &td))
	return td.NextBatch, td.Events
}

// sendToDevice sends one to-device message of a test type from `from` to dev of `to`.
func sendToDevice(t *testing.T, ctx context.Context, from *mautrix.Client, to id.UserID, dev id.DeviceID, n int) {
	t.Helper()
	_, err := from.SendToDevice(ctx, event.Type{Type: "org.example.proxy_test", Class: event.ToDeviceEventType}, &mautrix.ReqSendToDevice{
		Messages: map[id.UserID]map[id.DeviceID]*event.Content{to: {dev: {Raw: map[string]any{"n": n}}}},
	})
	require.NoError(t, err)
}

// eventually polls cond every 50 ms for up to 60 s (the proxy may take up to its 30 s v2
// long-poll to pass something on).
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// recorder is the Consumer and to-device handler of a Conn under test: it keeps what the
// extensions handed over and the e2ee state once committed.
type recorder struct {
	mu        sync.Mutex
	toDevice  []*event.Event
	responses int
	state     e2ee.State // committed
}

func (r *recorder) HandleE2EE(_ context.Context, st e2ee.State, _ *e2ee.Delta) slidingsync.Step {
	return slidingsync.Step{After: func(context.Context) {
		r.mu.Lock()
		defer r.mu.Unlock()
		r.state = st
	}}
}

func (r *recorder) handleToDevice(_ context.Context, evts []*event.Event) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.toDevice = append(r.toDevice, evts...)
	return nil
}

func (r *recorder) onResponse(context.Context, *slidingsync.Result) (slidingsync.Step, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.responses++
	return slidingsync.Step{}, nil
}

func (r *recorder) committed() e2ee.State {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.state
}

func (r *recorder) counts() (toDevice, responses int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.toDevice), r.responses
}

// runConn runs a slidingsync.Conn of cli's device against the proxy, configured explicitly
// (msc3575 at the proxy's URL), with the e2ee and to_device extensions feeding a recorder
// and the given lists. stop ends Run and waits for it; it is also called when the test ends.
func runConn(t *testing.T, ctx context.Context, cli *mautrix.Client, proxy *proxytest.Proxy, lists map[string]slidingsync.List) (conn *slidingsync.Conn, rec *recorder, store slidingsync.Store, stop func()) {
	t.Helper()
	rec = &recorder{}
	exts, release, err := e2ee.New(cli.UserID, cli.DeviceID, e2ee.Config{Consumer: rec, ToDevice: rec.handleToDevice})
	require.NoError(t, err)
	store = slidingsync.NewMemoryStore()
	conn, err = slidingsync.New(cli, slidingsync.Config{
		Protocol:    slidingsync.ProtocolMSC3575,
		BaseURL:     proxy.URL,
		Store:       store,
		Lists:       lists,
		Extensions:  exts,
		OnResponse:  rec.onResponse,
		PollTimeout: time.Second,
		MinBackoff:  50 * time.Millisecond,
		MaxBackoff:  time.Second,
	})
	require.NoError(t, err)
	runCtx, cancel := context.WithCancel(ctx)
	runErr := make(chan error, 1)
	go func() { runErr <- conn.Run(runCtx) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			assert.ErrorIs(t, <-runErr, context.Canceled)
			release()
		})
	}
	t.Cleanup(stop)
	return conn, rec, store, stop
}

// timelineHas reports whether the Conn's timeline of room holds evt.
func timelineHas(conn *slidingsync.Conn, room id.RoomID, evt id.EventID) bool {
	rs, ok := conn.Room(room)
	if !ok {
		return false
	}
	for _, e := range rs.Timeline {
		if e.ID == evt {
			return true
		}
	}
	return false
}

// startAliceAndBob starts Dendrite and the proxy and registers alice and bob; ctx ends
// after 3 minutes or with the test.
func startAliceAndBob(t *testing.T) (ctx context.Context, srv *dendritetest.Server, proxy *proxytest.Proxy, alice, bob *mautrix.Client) {
	t.Helper()
	srv, proxy = proxytest.Start(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	t.Cleanup(cancel)
	return ctx, srv, proxy, srv.Register(t, "alice"), srv.Register(t, "bob")
}

// A Conn configured with the proxy's URL follows a room from invite to join: the proxy sends
// the invite as invite_state (it has no membership field, unlike MSC4186), then, after the
// join, the room with its full required state and a timeline that starts at the join. The
// proxy shows no event from before a user's join: a message sent between the invite and the
// join is left out, and limited does not say so. Messages after the join come. The e2ee
// extension then gets the one-time key count of an upload (3), which the proxy passes on from
// Dendrite's v2 /sync.
func TestConnThroughProxySeesInviteThenRoomFromItsJoinAndUploadedKeyCount(t *testing.T) {
	ctx, _, proxy, alice, bob := startAliceAndBob(t)

	conn, rec, _, _ := runConn(t, ctx, bob, proxy, map[string]slidingsync.List{"all": {ListConfig: slidingsync.ListConfig{
		Ranges:        []slidingsync.Range{{Start: 0, End: 19}},
		RequiredState: slidingsync.RequiredState{Include: []slidingsync.StateFilter{{Type: "*", StateKey: "*"}}},
		TimelineLimit: 20,
	}}})
	eventually(t, "the first response", func() bool { return conn.Pos() != "" })

	room, err := alice.CreateRoom(ctx, &mautrix.ReqCreateRoom{Preset: "private_chat", Invite: []id.UserID{bob.UserID}, Name: "proxy test"})
	require.NoError(t, err)
	eventually(t, "the invite", func() bool {
		rs, ok := conn.Room(room.RoomID)
		return ok && len(rs.InviteState) > 0
	})
	rs, _ := conn.Room(room.RoomID)
	assert.Equal(t, "proxy test", rs.Name)
	assert.Empty(t, rs.Membership, "no membership field on MSC3575")

	before, err := alice.SendText(ctx, room.RoomID, "before the join")
	require.NoError(t, err)
	_, err = bob.JoinRoomByID(ctx, room.RoomID)
	require.NoError(t, err)
	after, err := alice.SendText(ctx, room.RoomID, "after the join")
	require.NoError(t, err)
	eventually(t, "the joined room with the message sent after the join", func() bool {
		return timelineHas(conn, room.RoomID, after.EventID)
	})
	rs, _ = conn.Room(room.RoomID)
	assert.Empty(t, rs.InviteState, "the join replaced the invite")
	assert.NotNil(t, rs.StateEvent(event.StateCreate, ""), "full state after the join")
	assert.NotNil(t, rs.StateEvent(event.StateMember, alice.UserID.String()))
	own := rs.StateEvent(event.StateMember, bob.UserID.String())
	require.NotNil(t, own)
	c := own.Content // shared with the Conn's state: parse a copy
	require.NoError(t, c.ParseRaw(event.StateMember))
	assert.Equal(t, event.MembershipJoin, c.AsMember().Membership)
	assert.Equal(t, "proxy test", rs.Name)
	require.NotEmpty(t, rs.Timeline)
	assert.Equal(t, own.ID, rs.Timeline[0].ID, "the timeline starts at the join event")
	assert.False(t, timelineHas(conn, room.RoomID, before.EventID), "no event from before the join")
	assert.False(t, rs.Limited, "the left-out message is not signalled")
	ls, ok := conn.List("all")
	require.True(t, ok)
	assert.Equal(t, 1, ls.Count)
	assert.Equal(t, []id.RoomID{room.RoomID}, ls.Rooms)

	uploadKeys(t, ctx, bob, 3)
	// An upload need not end the proxy's 30 s v2 long-poll of bob's device; a message does.
	_, err = alice.SendText(ctx, room.RoomID, "wake")
	require.NoError(t, err)
	eventually(t, "a count of 3", func() bool {
		n, known := rec.committed().OTKCount(id.KeyAlgorithmSignedCurve25519)
		return known && n == 3
	})
}

// A Conn asking for the required state a bot asks for by default (crypto.RequiredState
// without every member: m.room.encryption, m.room.history_visibility and the members of the
// timeline's senders, $LAZY) gets, for a room it has joined, those state events, the room's
// name in its own field, and the membership of alice, who writes after bob joined; not that
// of carol, who joined before bob and has sent nothing since.
func TestConnThroughProxyGetsEncryptionStateAndLazyMembersOfTimelineSenders(t *testing.T) {
	ctx, srv, proxy, alice, bob := startAliceAndBob(t)
	carol := srv.Register(t, "carol")
	room, err := alice.CreateRoom(ctx, &mautrix.ReqCreateRoom{
		Preset: "private_chat",
		Name:   "lazy members",
		Invite: []id.UserID{bob.UserID, carol.UserID},
		InitialState: []*event.Event{{
			Type:    event.StateEncryption,
			Content: event.Content{Parsed: &event.EncryptionEventContent{Algorithm: id.AlgorithmMegolmV1}},
		}},
	})
	require.NoError(t, err)
	_, err = carol.JoinRoomByID(ctx, room.RoomID)
	require.NoError(t, err)
	_, err = bob.JoinRoomByID(ctx, room.RoomID)
	require.NoError(t, err)

	conn, _, _, _ := runConn(t, ctx, bob, proxy, map[string]slidingsync.List{"all": {ListConfig: slidingsync.ListConfig{
		Ranges:        []slidingsync.Range{{Start: 0, End: 19}},
		RequiredState: crypto.RequiredState(false),
		TimelineLimit: 10,
	}}})
	sent, err := alice.SendText(ctx, room.RoomID, "after bob joined")
	require.NoError(t, err)
	eventually(t, "alice's message", func() bool { return timelineHas(conn, room.RoomID, sent.EventID) })

	rs, _ := conn.Room(room.RoomID)
	assert.Equal(t, "lazy members", rs.Name)
	assert.NotNil(t, rs.StateEvent(event.StateEncryption, ""), "m.room.encryption")
	assert.NotNil(t, rs.StateEvent(event.StateHistoryVisibility, ""), "m.room.history_visibility")
	assert.NotNil(t, rs.StateEvent(event.StateMember, alice.UserID.String()), "the member who sent a timeline event")
	assert.Nil(t, rs.StateEvent(event.StateMember, carol.UserID.String()), "not a member who sent none")
	assert.Nil(t, rs.StateEvent(event.StateCreate, ""), "no state that was not asked for")
}

// A to-device message reaches the to_device extension once, and the since the Conn commits
// acknowledges it: a new connection asking from that since gets nothing, and neither does
// one asking from the start of the device's to-device stream, because the proxy deletes
// what a since acknowledges.
func TestProxyDeliversToDeviceOnceAndDropsWhatTheCommittedSinceAcknowledges(t *testing.T) {
	ctx, _, proxy, alice, bob := startAliceAndBob(t)

	conn, rec, store, stop := runConn(t, ctx, bob, proxy, nil)
	eventually(t, "the first response", func() bool { return conn.Pos() != "" })
	sendToDevice(t, ctx, alice, bob.UserID, bob.DeviceID, 1)
	eventually(t, "the to-device message", func() bool { n, _ := rec.counts(); return n >= 1 })
	_, atReceipt := rec.counts()
	// Two more responses: the request after the one that carried the message sent its
	// next_batch as since.
	eventually(t, "two more responses", func() bool { _, r := rec.counts(); return r >= atReceipt+2 })
	stop()
	n, _ := rec.counts()
	assert.Equal(t, 1, n, "the to-device message arrives once")
	rec.mu.Lock()
	assert.Equal(t, "org.example.proxy_test", rec.toDevice[0].Type.Type)
	assert.Equal(t, alice.UserID, rec.toDevice[0].Sender)
	rec.mu.Unlock()

	cp, err := store.Load(ctx, conn.Key())
	require.NoError(t, err)
	var committed struct{ Since string }
	require.NoError(t, json.Unmarshal(cp.Extensions["to_device"], &committed))
	require.NotEmpty(t, committed.Since)
	c := &ssClient{t: t, proxy: proxy.URL, token: bob.AccessToken, http: &http.Client{Timeout: time.Minute}, toSince: committed.Since}
	fresh := c.mustSync(ctx, "", 0)
	_, events := fresh.toDevice(t)
	assert.Empty(t, events, "nothing after the committed since")
	// From the start of the device's to-device stream ("0", the next_batch of its first
	// response) too: the proxy deleted the message when the committed since came.
	c.toSince = "0"
	fresh = c.mustSync(ctx, "", 0)
	_, events = fresh.toDevice(t)
	assert.Empty(t, events, "the acknowledged message is gone")
}

// The proxy serves a to-device message again for the same since while the client has not
// acknowledged it, although pos has moved on; the next_batch that came with it acknowledges
// it. A client may therefore keep since until it has handled a batch, whatever pos does.
func TestProxyServesUnacknowledgedToDeviceAgainAfterPosMovedOn(t *testing.T) {
	ctx, _, proxy, alice, bob := startAliceAndBob(t)

	c := &ssClient{t: t, proxy: proxy.URL, token: bob.AccessToken, http: &http.Client{Timeout: time.Minute}}
	first := c.mustSync(ctx, "", 0)
	since, _ := first.toDevice(t)
	t.Logf("first to_device section: %s", first.Extensions["to_device"])
	sendToDevice(t, ctx, alice, bob.UserID, bob.DeviceID, 1)
	c.toSince = since
	got, _ := c.pollUntil(ctx, first.Pos, "the to-device message", func(r *ssResponse) bool {
		c.toSince = since // not acknowledged: every poll sends the first since again
		_, evts := r.toDevice(t)
		return len(evts) == 1
	})
	next, _ := got.toDevice(t)

	c.toSince = since
	again := c.mustSync(ctx, got.Pos, 0)
	_, evts := again.toDevice(t)
	assert.Len(t, evts, 1, "not acknowledged: served again after pos moved on")

	c.toSince = next
	acked := c.mustSync(ctx, again.Pos, 0)
	_, evts = acked.toDevice(t)
	assert.Empty(t, evts, "acknowledged: not served again")
}
