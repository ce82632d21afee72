package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/crypto/cryptohelper"
	"maunium.net/go/mautrix/crypto/signatures"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/sliding-e2ee/sdk/internal/dendritetest"
	"github.com/sliding-e2ee/sdk/internal/pgtest"
	"github.com/sliding-e2ee/sdk/internal/proxytest"
	"github.com/sliding-e2ee/sdk/slidingsync"
	"github.com/sliding-e2ee/sdk/slidingsync/sqlstore/dbopen"
)

// peerDevice is a client on mautrix's own v2 /sync with its own OlmMachine (cryptohelper):
// what a user of another Matrix client looks like to the bot.
type peerDevice struct {
	cli    *mautrix.Client
	helper *cryptohelper.CryptoHelper

	mu   sync.Mutex
	msgs []string // bodies of the decrypted messages the bot sent
}

func newPeerDevice(t *testing.T, ctx context.Context, cli *mautrix.Client, bot id.UserID) *peerDevice {
	t.Helper()
	db, err := dbopen.Open(filepath.Join(t.TempDir(), "peer.db"), dbopen.Config{})
	require.NoError(t, err)
	t.Cleanup(func() { _ = db.Close() })
	cli.Log = zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.InfoLevel).With().Str("peer", cli.DeviceID.String()).Logger()
	helper, err := cryptohelper.NewCryptoHelper(cli, []byte("peer pickle key"), db)
	require.NoError(t, err)
	require.NoError(t, helper.Init(ctx))
	cli.Crypto = helper
	p := &peerDevice{cli: cli, helper: helper}
	syncer := cli.Syncer.(*mautrix.DefaultSyncer)
	syncer.OnEventType(event.EventMessage, func(_ context.Context, evt *event.Event) {
		if evt.Sender != bot || !evt.Mautrix.WasEncrypted {
			return
		}
		p.mu.Lock()
		p.msgs = append(p.msgs, evt.Content.AsMessage().Body)
		p.mu.Unlock()
	})
	go func() { _ = cli.SyncWithContext(ctx) }()
	return p
}

func (p *peerDevice) received(body string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, m := range p.msgs {
		if m == body {
			return true
		}
	}
	return false
}

// waitFor polls cond every 100 ms for up to 90 s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(90 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// The acceptance run of the crypto layer against real servers: the MSC3575 sliding sync
// proxy (v0.99.19) in front of Dendrite, the bot run through the command's own code path
// (runBot with the options of its flags), and a peer on mautrix's v2 sync with its own
// OlmMachine. Keys, Olm and megolm sessions and messages are real.
//
// Here the bot is given the proxy with -sliding-sync-url (which implies -protocol msc3575)
// and Dendrite advertises no sliding sync at all, so nothing but the option can lead the bot
// there; every sync request must go to that URL. It runs once with the bot on SQLite and once
// on PostgreSQL (-db postgres://...), both against one proxy.
func TestEncryptedEchoThroughExplicitProxyOnSQLiteAndPostgres(t *testing.T) {
	srv, proxy := proxytest.Start(t, dendritetest.WithSlidingSyncProxy(""))
	_, err := slidingsync.Discover(context.Background(), srv.Client(t), slidingsync.ProtocolAuto)
	require.ErrorIs(t, err, slidingsync.ErrNotAdvertised, "Dendrite advertises no sliding sync here")
	env := acceptanceEnv{srv: srv, homeserver: srv.URL, syncURL: proxy.URL, protocol: "auto", proxy: proxy}

	t.Run("sqlite", func(t *testing.T) {
		acceptance(t, env, "sqlite", filepath.Join(t.TempDir(), "bot.db"))
	})
	t.Run("postgres", func(t *testing.T) {
		acceptance(t, env, "pg", pgtest.NewDatabase(t))
	})
}

// The same acceptance run through the proxy, found the way the bot finds it by default:
// -protocol auto against Dendrite's own URL, whose /versions does not advertise sliding sync
// and whose .well-known names the proxy. The proxy forgets every pos when it restarts
// (M_UNKNOWN_POS). After the echo and second-device steps (and before the one-time key steps,
// since a new peer device needs one of the bot's keys) it is killed with SIGKILL and started
// again on the same port and database; a room key and a new peer device that arrive while it
// is down, and a message sent right after the restart, must all still be handled.
func TestEncryptedEchoThroughProxyFoundByWellKnownSurvivesProxyRestart(t *testing.T) {
	srv, proxy := proxytest.Start(t)
	env := acceptanceEnv{srv: srv, homeserver: srv.URL, protocol: "auto", proxy: proxy, restartProxy: true}
	t.Run("sqlite", func(t *testing.T) {
		acceptance(t, env, "sqlite", filepath.Join(t.TempDir(), "bot.db"))
	})
}

// acceptanceEnv is where an acceptance run takes place.
type acceptanceEnv struct {
	srv        *dendritetest.Server
	homeserver string // the bot's -homeserver
	syncURL    string // the bot's -sliding-sync-url; empty: none
	protocol   string // the bot's -protocol
	// proxy is the MSC3575 proxy in front of srv: every sliding sync request of the bot must
	// go there.
	proxy *proxytest.Proxy
	// restartProxy kills and restarts the proxy in the middle of the run (proxyRestart).
	restartProxy bool
}

// acceptanceRun is the state of one acceptance run, shared by its steps.
type acceptanceRun struct {
	env          acceptanceEnv
	ctx          context.Context
	room         id.RoomID
	bot          id.UserID
	botDevice    id.DeviceID
	alice        *mautrix.Client
	peerPassword string
	peers        []*peerDevice
	syncs        *syncRecorder
	botDB        *dbutil.Database // the bot's database, to read what it stored
}

// newPeer logs in a new device of alice and starts it as a peer device.
func (r *acceptanceRun) newPeer(t *testing.T) *peerDevice {
	t.Helper()
	cli := r.env.srv.Client(t)
	_, err := cli.Login(r.ctx, &mautrix.ReqLogin{
		Type:             mautrix.AuthTypePassword,
		Identifier:       mautrix.UserIdentifier{Type: mautrix.IdentifierTypeUser, User: r.alice.UserID.String()},
		Password:         r.peerPassword,
		StoreCredentials: true,
	})
	require.NoError(t, err)
	p := newPeerDevice(t, r.ctx, cli, r.bot)
	r.peers = append(r.peers, p)
	return p
}

// waitBotKnows waits until the bot's crypto store holds the keys of p's device, which it
// learns only by querying alice's keys after device_lists.changed (or a gap) named her.
func (r *acceptanceRun) waitBotKnows(t *testing.T, p *peerDevice) {
	t.Helper()
	waitFor(t, "the bot to learn the keys of device "+p.cli.DeviceID.String(), func() bool {
		var n int
		err := r.botDB.QueryRow(r.ctx, `SELECT COUNT(*) FROM crypto_device WHERE user_id=$1 AND device_id=$2 AND NOT deleted`,
			p.cli.UserID, p.cli.DeviceID).Scan(&n)
		require.NoError(t, err)
		return n == 1
	})
}

// waitEchoEverywhere waits until every peer device has decrypted the bot's echo of body.
func (r *acceptanceRun) waitEchoEverywhere(t *testing.T, body string) {
	t.Helper()
	for i, p := range r.peers {
		waitFor(t, fmt.Sprintf("peer device %d to decrypt the echo of %q", i+1, body), func() bool { return p.received("echo: " + body) })
	}
}

// acceptance runs the steps both acceptance tests share, with the bot's database at dbPath
// and name telling the users of this run apart from those of another run on the same server.
func acceptance(t *testing.T, env acceptanceEnv, name, dbPath string) {
	const botPassword, peerPassword = "bot-password-1", "peer-password-1"
	srv := env.srv
	botReg := srv.RegisterWithPassword(t, "echobot-"+name, botPassword)
	alice := srv.RegisterWithPassword(t, "alice-"+name, peerPassword)
	var err error

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	drop := &keyDropper{}
	alice.Client = &http.Client{Timeout: alice.Client.Timeout, Transport: drop}
	peer1 := newPeerDevice(t, ctx, alice, botReg.UserID)
	run := &acceptanceRun{env: env, ctx: ctx, bot: botReg.UserID, alice: alice, peerPassword: peerPassword,
		peers: []*peerDevice{peer1}, syncs: &syncRecorder{}}
	t.Cleanup(func() {
		if t.Failed() {
			run.syncs.dump(t)
		}
	})

	// An encrypted room the bot is invited to.
	resp, err := alice.CreateRoom(ctx, &mautrix.ReqCreateRoom{
		Preset: "private_chat",
		Invite: []id.UserID{botReg.UserID},
		InitialState: []*event.Event{{
			Type:    event.StateEncryption,
			Content: event.Content{Parsed: &event.EncryptionEventContent{Algorithm: id.AlgorithmMegolmV1}},
		}},
	})
	require.NoError(t, err)
	room := resp.RoomID
	run.room = room

	opts := options{homeserver: env.homeserver, syncURL: env.syncURL, user: botReg.UserID.String(), password: botPassword, db: dbPath, protocol: env.protocol}
	startBot := func() (stop func()) {
		botCtx, botCancel := context.WithCancel(zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.InfoLevel).
			With().Str("side", "bot").Logger().WithContext(context.Background()))
		done := make(chan error, 1)
		go func() {
			cli, cfg, err := config(botCtx, opts)
			if err != nil {
				done <- err
				return
			}
			cli.Client = &http.Client{Transport: run.syncs}
			// The proxy never reports a one-time key count of 0 over Dendrite (see
			// internal/proxytest): after step 4 only the Machine's count check finds out.
			cfg.Crypto.KeyCountCheck = 5 * time.Second
			h, err := newEcho(cli, cfg)
			if err != nil {
				done <- err
				return
			}
			done <- h.Run(botCtx)
		}()
		return func() {
			botCancel()
			select {
			case err := <-done:
				require.ErrorIs(t, err, context.Canceled)
			case <-time.After(30 * time.Second):
				t.Fatal("the bot did not stop within 30 s")
			}
		}
	}
	stopBot := startBot()
	defer func() { stopBot() }()

	waitFor(t, "the bot to join", func() bool {
		return alice.StateStore.IsMembership(ctx, room, botReg.UserID, event.MembershipJoin)
	})

	// 1. The peer sends an encrypted message; the bot decrypts it and replies encrypted; the
	// peer decrypts the reply.
	_, err = alice.SendText(ctx, room, "hello bot")
	require.NoError(t, err)
	waitFor(t, "the encrypted echo of the first message", func() bool { return peer1.received("echo: hello bot") })

	// A restart reuses the stored session: same device, no second login.
	botDevice := storedDevice(t, dbPath)
	run.botDevice = botDevice
	run.botDB, err = dbopen.Open(dbPath, dbopen.Config{})
	require.NoError(t, err)
	defer run.botDB.Close()
	stopBot()
	opts.password = "" // a second login would fail now
	stopBot = startBot()
	require.Equal(t, botDevice, storedDevice(t, dbPath))

	// 2. The peer adds a second device; the bot learns of it from device_lists.changed, and
	// the new device can decrypt the bot's next reply. Dendrite writes a key upload's
	// device-list change to /sync asynchronously: a message sent right after the upload can
	// reach the bot first (seen through the proxy: the change of the login, then the message,
	// then the change of the upload), and the bot then rightly answers for the devices it
	// knows. So the message waits until the bot knows the new device.
	peer2 := run.newPeer(t)
	run.waitBotKnows(t, peer2)
	_, err = alice.SendText(ctx, room, "second message")
	require.NoError(t, err)
	waitFor(t, "the second device to decrypt the echo", func() bool { return peer2.received("echo: second message") })
	// Each device decrypts on its own sync: the first may be a moment behind the second.
	run.waitEchoEverywhere(t, "second message")

	if env.restartProxy {
		proxyRestart(t, run)
	}

	// 3. Some of the bot's one-time keys are claimed; the bot tops up from the count the next
	// response reports.
	botToken := storedToken(t, dbPath)
	claim := func() (id.KeyID, *mautrix.OneTimeKey) {
		res, err := alice.ClaimKeys(ctx, &mautrix.ReqClaimKeys{
			OneTimeKeys: mautrix.OneTimeKeysRequest{botReg.UserID: {botDevice: id.KeyAlgorithmSignedCurve25519}},
		})
		require.NoError(t, err)
		for keyID, key := range res.OneTimeKeys[botReg.UserID][botDevice] {
			return keyID, &key
		}
		return "", nil
	}
	for i := 0; i < 30; i++ {
		keyID, _ := claim()
		require.NotEmpty(t, keyID, "claim %d of 30", i+1)
	}
	// A message wakes the bot's long-poll (and the proxy's v2 poll for the bot), whose
	// response carries the lower count.
	_, err = alice.SendText(ctx, room, "after some claims")
	require.NoError(t, err)
	run.waitEchoEverywhere(t, "after some claims")
	waitFor(t, "the bot to top its one-time keys up to 50 again", func() bool {
		return serverOTKCount(t, ctx, env.srv, botToken) == 50
	})

	// 4. The bot's one-time keys are claimed until none is left; the bot tops up.
	claimed := 0
	for {
		keyID, _ := claim()
		if keyID == "" {
			break
		}
		claimed++
		require.Less(t, claimed, 200, "the server holds more one-time keys than the bot keeps")
	}
	t.Logf("claimed %d one-time keys until none was left", claimed)
	// At least the 50 the bot held; more when a count reported during the claims (a stale one,
	// or one woken by the bot's own reply) made it top up in between.
	require.GreaterOrEqual(t, claimed, 50, "the bot held 50 one-time keys on the server")
	// A message wakes the bot's long-poll. The proxy's responses carry no count of 0, so the
	// Machine's count check (5 s here, after the last response with a count) asks the server
	// and tops up.
	_, err = alice.SendText(ctx, room, "third message")
	require.NoError(t, err)
	waitFor(t, "the echo of the third message", func() bool { return peer1.received("echo: third message") })
	requireSyncedOnlyAt(t, run.syncs, env.proxy)
	var topped *mautrix.OneTimeKey
	waitFor(t, "a claimable one-time key after the top-up", func() bool {
		_, topped = claim()
		return topped != nil
	})
	// The new key is signed by the bot's device.
	devs, err := peer1.helper.Machine().CryptoStore.GetDevices(ctx, botReg.UserID)
	require.NoError(t, err)
	dev := devs[botDevice]
	require.NotNil(t, dev, "the peer knows the bot's device")
	ok, err := signatures.VerifySignatureJSON(topped, botReg.UserID, botDevice.String(), dev.SigningKey)
	require.NoError(t, err)
	require.True(t, ok, "the topped-up one-time key carries a valid signature")

	// 5. The room key of a new session never reaches the bot: the peer's encrypted to-device
	// message for the bot's device is dropped on its way to the server. The bot asks the
	// peer's device for the key (Config.KeyRequestDelay); the peer's OlmMachine, which shared
	// the session with the bot's device, forwards it over Dendrite and the proxy, and the bot
	// answers the message.
	require.NoError(t, peer1.helper.Machine().CryptoStore.RemoveOutboundGroupSession(ctx, room))
	drop.arm(botReg.UserID, botDevice)
	_, err = alice.SendText(ctx, room, "room key lost on its way")
	require.NoError(t, err)
	require.True(t, drop.dropped(), "the new session's room key was sent to the bot's device, and dropped")
	run.waitEchoEverywhere(t, "room key lost on its way")
}

// keyDropper is a peer's transport that, once armed, removes one device's message from the
// next encrypted sendToDevice (a room key share) and forwards the rest: a to-device message
// lost on its way, which nothing on the server can replay.
type keyDropper struct {
	mu     sync.Mutex
	user   id.UserID
	device id.DeviceID
	done   bool
}

func (d *keyDropper) arm(user id.UserID, device id.DeviceID) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.user, d.device, d.done = user, device, false
}

func (d *keyDropper) dropped() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.done
}

func (d *keyDropper) RoundTrip(req *http.Request) (*http.Response, error) {
	if req.Method != http.MethodPut || !strings.Contains(req.URL.Path, "/sendToDevice/"+event.ToDeviceEncrypted.Type+"/") {
		return http.DefaultTransport.RoundTrip(req) // the peer's long-polls pass unlocked
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.user == "" || d.done {
		return http.DefaultTransport.RoundTrip(req)
	}
	var body struct {
		Messages map[id.UserID]map[id.DeviceID]json.RawMessage `json:"messages"`
	}
	raw, err := io.ReadAll(req.Body)
	req.Body.Close()
	if err != nil {
		return nil, err
	}
	if err := json.Unmarshal(raw, &body); err != nil {
		return nil, err
	}
	if _, ok := body.Messages[d.user][d.device]; ok {
		delete(body.Messages[d.user], d.device)
		d.done = true
		if raw, err = json.Marshal(body); err != nil {
			return nil, err
		}
	}
	req = req.Clone(req.Context())
	req.Body = io.NopCloser(bytes.NewReader(raw))
	req.ContentLength = int64(len(raw))
	return http.DefaultTransport.RoundTrip(req)
}

// serverOTKCount asks the server how many signed_curve25519 one-time keys the device of token
// holds, with an empty /keys/upload (whose answer lists every algorithm with keys left).
func serverOTKCount(t *testing.T, ctx context.Context, srv *dendritetest.Server, token string) int {
	t.Helper()
	cli := srv.Client(t)
	cli.AccessToken = token
	resp, err := cli.UploadKeys(ctx, &mautrix.ReqUploadKeys{})
	require.NoError(t, err)
	return resp.OneTimeKeyCounts.SignedCurve25519
}

// requireSyncedOnlyAt checks that the bot's sliding sync requests so far went to the proxy,
// at least one of them successfully, and none elsewhere.
func requireSyncedOnlyAt(t *testing.T, syncs *syncRecorder, proxy *proxytest.Proxy) {
	t.Helper()
	syncPath := proxy.URL + "/_matrix/client/unstable/org.matrix.msc3575/sync"
	require.NotZero(t, syncs.count(syncPath, http.StatusOK), "the bot synced through the proxy")
	require.Zero(t, syncs.otherSyncs(syncPath), "the bot sent no sync request elsewhere")
}

// proxyRestart checks that the bot used the proxy, then kills the proxy (SIGKILL) and starts
// it again on the same port and database. While it is down, alice adds a device, which sends
// a message under a new megolm session (its room key reaches the bot as a to-device message
// the bot cannot fetch yet); right after the restart the first device sends another. The
// bot must get M_UNKNOWN_POS for its old pos, start a new connection, and answer both
// messages so that every device of alice, the new one included, decrypts the answers.
func proxyRestart(t *testing.T, r *acceptanceRun) {
	proxy := r.env.proxy
	requireSyncedOnlyAt(t, r.syncs, proxy)
	syncPath := proxy.URL + "/_matrix/client/unstable/org.matrix.msc3575/sync"

	proxy.Kill(t)
	down := r.newPeer(t)
	_, err := down.cli.SendText(r.ctx, r.room, "sent while the proxy is down")
	require.NoError(t, err)
	proxy.Restart(t)
	_, err = r.alice.SendText(r.ctx, r.room, "sent after the restart")
	require.NoError(t, err)

	r.waitEchoEverywhere(t, "sent while the proxy is down")
	r.waitEchoEverywhere(t, "sent after the restart")
	assert.NotZero(t, r.syncs.count(syncPath, http.StatusBadRequest, "M_UNKNOWN_POS"), "the restarted proxy answered the old pos with M_UNKNOWN_POS")

	// The bot keeps answering on its new connection.
	_, err = r.alice.SendText(r.ctx, r.room, "still there?")
	require.NoError(t, err)
	r.waitEchoEverywhere(t, "still there?")
}

// syncRecorder is the bot's HTTP transport: it passes every request on and records the
// outcome of the sliding sync ones (URL without query, status, and errcode of an error).
type syncRecorder struct {
	mu   sync.Mutex
	seen []syncOutcome
}

type syncOutcome struct {
	url     string
	status  int
	errcode string
	summary string // what a 200 response carried: pos, the e2ee section, timeline event IDs
}

// summarize returns pos, the e2ee section and, for each room, what shapes the bot's handling
// of it (initial, limited, prev_batch, invite state, required state, timeline event IDs).
func summarize(body []byte) string {
	var r struct {
		Pos   string `json:"pos"`
		Rooms map[string]struct {
			Initial       bool              `json:"initial"`
			Limited       bool              `json:"limited"`
			PrevBatch     string            `json:"prev_batch"`
			NumLive       int               `json:"num_live"`
			InviteState   []json.RawMessage `json:"invite_state"`
			RequiredState []json.RawMessage `json:"required_state"`
			Timeline      []struct {
				ID   string `json:"event_id"`
				Type string `json:"type"`
			} `json:"timeline"`
		} `json:"rooms"`
		Extensions map[string]json.RawMessage `json:"extensions"`
	}
	if err := json.Unmarshal(body, &r); err != nil {
		return "undecodable: " + err.Error()
	}
	var rooms []string
	for id, room := range r.Rooms {
		var evts []string
		for _, e := range room.Timeline {
			evts = append(evts, e.Type+" "+e.ID)
		}
		rooms = append(rooms, fmt.Sprintf("%s{initial=%v limited=%v prev_batch=%v num_live=%d invite_state=%d required_state=%d timeline=%v}",
			id, room.Initial, room.Limited, room.PrevBatch != "", room.NumLive, len(room.InviteState), len(room.RequiredState), evts))
	}
	return fmt.Sprintf("pos=%s e2ee=%s rooms=%v", r.Pos, r.Extensions["e2ee"], rooms)
}

// dump logs every recorded outcome.
func (s *syncRecorder) dump(t *testing.T) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for i, o := range s.seen {
		t.Logf("sync %d: %s -> %d %s %s", i+1, o.url, o.status, o.errcode, o.summary)
	}
}

func (s *syncRecorder) RoundTrip(req *http.Request) (*http.Response, error) {
	resp, err := http.DefaultTransport.RoundTrip(req)
	if !strings.HasSuffix(req.URL.Path, "/sync") || req.Method != http.MethodPost {
		return resp, err
	}
	u := *req.URL
	u.RawQuery = ""
	out := syncOutcome{url: u.String()}
	if err == nil {
		out.status = resp.StatusCode
		body, rerr := io.ReadAll(resp.Body)
		resp.Body.Close()
		resp.Body = io.NopCloser(bytes.NewReader(body))
		switch {
		case rerr != nil:
			out.summary = "body: " + rerr.Error()
		case resp.StatusCode == http.StatusOK:
			out.summary = summarize(body)
		default:
			var e struct {
				Errcode string `json:"errcode"`
			}
			_ = json.Unmarshal(body, &e)
			out.errcode = e.Errcode
		}
	}
	s.mu.Lock()
	s.seen = append(s.seen, out)
	s.mu.Unlock()
	return resp, err
}

// count returns how many sync requests to url got status (and errcode, if given).
func (s *syncRecorder) count(url string, status int, errcode ...string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, o := range s.seen {
		if o.url == url && o.status == status && (len(errcode) == 0 || o.errcode == errcode[0]) {
			n++
		}
	}
	return n
}

// otherSyncs returns how many sync requests went to another URL than url.
func (s *syncRecorder) otherSyncs(url string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, o := range s.seen {
		if o.url != url {
			n++
		}
	}
	return n
}

// storedToken reads the access token of the session the bot stored.
func storedToken(t *testing.T, dbPath string) string {
	t.Helper()
	db, err := dbopen.Open(dbPath, dbopen.Config{})
	require.NoError(t, err)
	defer db.Close()
	var token string
	require.NoError(t, db.QueryRow(context.Background(), `SELECT access_token FROM ssbot_session`).Scan(&token))
	return token
}

// storedDevice reads the device of the session the bot stored.
func storedDevice(t *testing.T, dbPath string) id.DeviceID {
	t.Helper()
	db, err := dbopen.Open(dbPath, dbopen.Config{})
	require.NoError(t, err)
	defer db.Close()
	var dev id.DeviceID
	require.NoError(t, db.QueryRow(context.Background(), `SELECT device_id FROM ssbot_session`).Scan(&dev))
	return dev
}
