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
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"maunium.net/go/mautrix"
	mcrypto "maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

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
