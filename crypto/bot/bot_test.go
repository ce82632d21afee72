package bot

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/sliding-e2ee/sdk/internal/minihs"
	"github.com/sliding-e2ee/sdk/internal/testlog"
	"github.com/sliding-e2ee/sdk/slidingsync"
)

// testCtx returns a context whose logger keeps the logs, shown if the test fails.
var testCtx = testlog.Context

// fixture is a demo homeserver with alice, an encrypted room she invited the bot to, and the
// bot's database.
type fixture struct {
	t     *testing.T
	srv   *minihs.Server
	alice *minihs.Peer
	room  id.RoomID
	db    string
}

func newFixture(t *testing.T, opts minihs.Options) *fixture {
	t.Helper()
	opts.Dir = t.TempDir()
	if opts.Rooms == 0 {
		opts.Rooms = 10
	}
	srv, err := minihs.NewServer(opts)
	require.NoError(t, err)
	t.Cleanup(srv.Close)
	bot, _, _ := srv.Bot()
	alice, err := srv.NewPeer(t.Context(), "@alice:"+minihs.ServerName)
	require.NoError(t, err)
	room, err := alice.CreateEncryptedRoom(t.Context(), "Encrypted", bot)
	require.NoError(t, err)
	return &fixture{t: t, srv: srv, alice: alice, room: room, db: filepath.Join(t.TempDir(), "bot.db")}
}

// client returns a client of the bot, with its access token.
func (f *fixture) client() *mautrix.Client {
	bot, dev, token := f.srv.Bot()
	cli, err := mautrix.NewClient(f.srv.URL(), bot, token)
	require.NoError(f.t, err)
	cli.DeviceID = dev
	return cli
}

// running is a bot started by start.
type running struct {
	h    *Helper
	cli  *mautrix.Client
	done chan error
	stop func() error
}

// start runs an echo bot (or what setup registers) until the returned stop is called.
func (f *fixture) start(ctx context.Context, cli *mautrix.Client, cfg Config, setup func(h *Helper, cli *mautrix.Client)) *running {
	f.t.Helper()
	if cfg.DB == nil {
		cfg.DB = f.db
	}
	cfg.AutoJoin = true
	cfg.Protocol = slidingsync.ProtocolMSC4186
	h, err := New(cli, cfg)
	require.NoError(f.t, err)
	cli.Crypto = h
	if setup == nil {
		setup = echo
	}
	setup(h, cli)
	ctx, cancel := context.WithCancel(ctx)
	r := &running{h: h, cli: cli, done: make(chan error, 1)}
	go func() { r.done <- h.Run(ctx) }()
	var once sync.Once
	var err2 error
	r.stop = func() error {
		once.Do(func() {
			cancel()
			select {
			case err2 = <-r.done:
			case <-time.After(30 * time.Second):
				f.t.Error("Run did not return within 30 s of the end of its context")
			}
		})
		return err2
	}
	f.t.Cleanup(func() { _ = r.stop() })
	return r
}

// echo answers every text message with "echo: <body>".
func echo(h *Helper, cli *mautrix.Client) {
	h.OnEventType(event.EventMessage, func(ctx context.Context, evt *event.Event) {
		if _, err := cli.SendText(ctx, evt.RoomID, "echo: "+evt.Content.AsMessage().Body); err != nil {
			zerolog.Ctx(ctx).Error().Err(err).Msg("echo failed")
		}
	})
}

// waitJoined waits until the bot joined the fixture's room and its keys are up.
func (f *fixture) waitJoined(ctx context.Context, r *running) {
	f.t.Helper()
	bot, _, _ := f.srv.Bot()
	wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	require.NoError(f.t, f.srv.WaitFor(wctx, func() bool {
		select {
		case err := <-r.done:
			f.t.Fatalf("the bot stopped: %v", err)
		default:
		}
		return f.srv.Membership(f.room, bot) == event.MembershipJoin
	}), "the bot joins the room it was invited to")
}

// replies returns the bodies alice decrypts from the bot, up to n of them or until timeout.
func (f *fixture) replies(ctx context.Context, n int, timeout time.Duration) []string {
	f.t.Helper()
	bot, _, _ := f.srv.Bot()
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var out []string
	for len(out) < n {
		evt, err := f.alice.NextMessage(ctx, f.room, bot)
		if err != nil {
			f.t.Logf("alice read %d replies: %v", len(out), err)
			break
		}
		out = append(out, evt.Content.AsMessage().Body)
	}
	return out
}

// The bot in one call: it joins the encrypted room it is invited to, the handler receives
// alice's message decrypted, and its plain cli.SendText goes out encrypted (cli.Crypto), for
// alice to decrypt.
func TestEchoInEncryptedRoom(t *testing.T) {
	ctx, _ := testCtx(t)
	f := newFixture(t, minihs.Options{})
	var got []*event.Event
	var mu sync.Mutex
	r := f.start(ctx, f.client(), Config{}, func(h *Helper, cli *mautrix.Client) {
		h.OnEventType(event.EventMessage, func(ctx context.Context, evt *event.Event) {
			mu.Lock()
			got = append(got, evt)
			mu.Unlock()
			assert.NotEmpty(t, IdempotencyKey(ctx), "a handler gets an idempotency key")
		})
		echo(h, cli)
	})
	f.waitJoined(ctx, r)
	_, err := f.alice.SendEncrypted(ctx, f.room, "hello")
	require.NoError(t, err)
	assert.Equal(t, []string{"echo: hello"}, f.replies(ctx, 1, 30*time.Second))
	mu.Lock()
	defer mu.Unlock()
	require.Len(t, got, 1)
	assert.True(t, got[0].Mautrix.WasEncrypted, "the handler got the decrypted event")
	assert.Equal(t, f.room, got[0].RoomID)
	require.ErrorIs(t, r.stop(), context.Canceled)
}

// botReplies returns the bot's events in the fixture's room.
func (f *fixture) botReplies() []*event.Event {
	bot, _, _ := f.srv.Bot()
	var out []*event.Event
	for _, e := range f.srv.RoomEvents(f.room) {
		if e.Sender == bot && e.Type == event.EventEncrypted {
			out = append(out, e)
		}
	}
	return out
}

// sendWithoutKeys holds the bot's to-device messages, makes alice send bodies, and waits until
// the bot holds a message it cannot decrypt yet. release lets the room keys through.
func (f *fixture) sendWithoutKeys(ctx context.Context, logs fmt.Stringer, bodies ...string) (release func()) {
	f.t.Helper()
	release = f.srv.HoldToDevice()
	f.t.Cleanup(release)
	for _, body := range bodies {
		_, err := f.alice.SendEncrypted(ctx, f.room, body)
		require.NoError(f.t, err)
	}
	wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	require.NoError(f.t, f.srv.WaitFor(wctx, func() bool {
		return strings.Contains(logs.String(), "Waiting for the room key of an encrypted event")
	}), "the bot saw a message without its key")
	return release
}

// An encrypted message that arrives before its room key waits for it, and is dispatched once
// the key is committed: the dispatcher has no retry timer (only Config.KeyWait, an hour), so
// a missed wake-up fails this test.
func TestEventWaitsForItsRoomKey(t *testing.T) {
	ctx, logs := testCtx(t)
	f := newFixture(t, minihs.Options{})
	r := f.start(ctx, f.client(), Config{}, nil)
	f.waitJoined(ctx, r)

	release := f.sendWithoutKeys(ctx, logs, "before its key")
	release()
	assert.Equal(t, []string{"echo: before its key"}, f.replies(ctx, 1, 30*time.Second))
}

// A room key whose to-device message is lost (a server that dropped it, a wedged Olm session)
// never arrives by itself: the bot asks the device that sent the events for it, once for the
// session however many events wait on it (again after a 502 on the way, not after a refusal),
// and the sender's mautrix OlmMachine, which shared the key with the bot's device, forwards
// it. Without the request both messages would wait for Config.KeyWait (an hour) and be given
// up.
func TestLostRoomKeyIsRequestedFromTheSendersDevice(t *testing.T) {
	ctx, logs := testCtx(t)
	var mu sync.Mutex
	var requests []minihs.Event
	f := newFixture(t, minihs.Options{Observer: func(ev minihs.Event) {
		if ev.Kind == minihs.KindSendToDevice && ev.EventType == event.ToDeviceRoomKeyRequest.Type {
			mu.Lock()
			requests = append(requests, ev)
			mu.Unlock()
		}
	}})
	cli := f.client()
	gateway := &requestFaults{next: http.DefaultTransport, status: []int{http.StatusBadGateway}}
	cli.Client = &http.Client{Transport: gateway}
	r := f.start(ctx, cli, Config{KeyRequestDelay: 100 * time.Millisecond}, nil)
	f.waitJoined(ctx, r)

	release := f.sendWithoutKeys(ctx, logs, "first", "second")
	bot, dev, _ := f.srv.Bot()
	require.Positive(t, f.srv.DropToDevice(bot, dev), "the room key was queued for the bot")
	release()

	assert.ElementsMatch(t, []string{"echo: first", "echo: second"}, f.replies(ctx, 2, 30*time.Second))
	mu.Lock()
	defer mu.Unlock()
	require.Len(t, requests, 1, "one request for the one session both messages need")
	assert.Equal(t, []id.UserID{f.alice.UserID}, requests[0].Users, "the sender is asked, not the bot's own devices")
	assert.EqualValues(t, 2, gateway.attempts.Load(), "the request that met a 502 was made again")
}

// An event that waited for its room key when the bot stopped gets Config.KeyWait again when
// the bot restarts, however long it was stopped: the key may still be in the server's
// to-device queue, which the bot reads only once it runs.
func TestRestartAfterKeyWaitStillWaitsForTheKey(t *testing.T) {
	ctx, logs := testCtx(t)
	f := newFixture(t, minihs.Options{})
	var gaveUp atomic.Int32
	cfg := Config{KeyWait: 3 * time.Second, KeyRequestDelay: -1,
		OnDecryptionError: func(context.Context, *event.Event, error) { gaveUp.Add(1) }}
	r := f.start(ctx, f.client(), cfg, nil)
	f.waitJoined(ctx, r)

	release := f.sendWithoutKeys(ctx, logs, "while the key is held")
	require.ErrorIs(t, r.stop(), context.Canceled)
	time.Sleep(cfg.KeyWait + 500*time.Millisecond) // stopped for longer than KeyWait
	release()

	f.start(ctx, f.client(), cfg, nil)
	assert.Equal(t, []string{"echo: while the key is held"}, f.replies(ctx, 1, 30*time.Second))
	assert.Zero(t, gaveUp.Load(), "nothing was given up")
}

// A wedged Olm session (the bot lost its copy, as after a restore from an older backup)
// makes the next room key from alice undecryptable: the bot opens a new Olm session with her
// device (mautrix's unwedging: a new session and an m.dummy on it), asks her device for the
// key after Config.KeyRequestDelay, and her OlmMachine forwards it on the new session, so the
// message is answered.
func TestWedgedOlmSessionRecoversTheRoomKey(t *testing.T) {
	ctx, logs := testCtx(t)
	f := newFixture(t, minihs.Options{})
	cfg := Config{KeyRequestDelay: time.Second}
	r := f.start(ctx, f.client(), cfg, nil)
	f.waitJoined(ctx, r)
	_, err := f.alice.SendEncrypted(ctx, f.room, "before")
	require.NoError(t, err)
	require.Equal(t, []string{"echo: before"}, f.replies(ctx, 1, 30*time.Second))
	require.ErrorIs(t, r.stop(), context.Canceled)

	db := botTables(t, f.db)
	res, err := db.Exec(ctx, `DELETE FROM crypto_olm_session WHERE sender_key=$1`, f.alice.Olm.OwnIdentity().IdentityKey)
	require.NoError(t, err)
	n, err := res.RowsAffected()
	require.NoError(t, err)
	require.Positive(t, n, "the bot had an Olm session with alice's device")

	require.NoError(t, f.alice.Olm.CryptoStore.RemoveOutboundGroupSession(ctx, f.room))
	_, err = f.alice.SendEncrypted(ctx, f.room, "after")
	require.NoError(t, err)
	r = f.start(ctx, f.client(), cfg, nil)
	assert.Equal(t, []string{"echo: after"}, f.replies(ctx, 1, 30*time.Second))
	assert.Contains(t, logs.String(), "unwedge olm session", "the session was wedged and mautrix unwedged it")
	assert.Contains(t, logs.String(), "Asked the sender's device for the room key of a waiting event")
}

// A refused request for a room key (a 4xx) is not made again: the server would refuse it
// again.
func TestRefusedRoomKeyRequestIsNotRepeated(t *testing.T) {
	ctx, logs := testCtx(t)
	f := newFixture(t, minihs.Options{})
	cli := f.client()
	refusing := &requestFaults{next: http.DefaultTransport, status: []int{http.StatusForbidden, http.StatusForbidden}}
	cli.Client = &http.Client{Transport: refusing}
	r := f.start(ctx, cli, Config{KeyRequestDelay: 50 * time.Millisecond}, nil)
	f.waitJoined(ctx, r)

	// Two sessions lose their keys, one after the other: the second request comes after the
	// first was refused, late enough that a repeat of the first (100 ms after its refusal)
	// would come before it.
	bot, dev, _ := f.srv.Bot()
	release := f.srv.HoldToDevice()
	defer release()
	for i, body := range []string{"first", "second"} {
		require.NoError(t, f.alice.Olm.CryptoStore.RemoveOutboundGroupSession(ctx, f.room))
		_, err := f.alice.SendEncrypted(ctx, f.room, body)
		require.NoError(t, err)
		require.Positive(t, f.srv.DropToDevice(bot, dev), "the room key was queued for the bot")
		wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		require.NoError(t, f.srv.WaitFor(wctx, func() bool { return refusing.attempts.Load() >= int32(i+1) }),
			"the request for session %d", i+1)
		cancel()
		time.Sleep(300 * time.Millisecond) // past a repeat of the refused request
	}
	assert.EqualValues(t, 2, refusing.attempts.Load(), "each refused request was made once")
	assert.Equal(t, 2, strings.Count(logs.String(), "The server refused the request for the room key"))
}

// requestFaults answers the bot's room key requests with the given statuses, in turn, and
// passes them on once the statuses run out; every other request passes.
type requestFaults struct {
	next     http.RoundTripper
	mu       sync.Mutex
	status   []int
	attempts atomic.Int32
}

func (f *requestFaults) RoundTrip(req *http.Request) (*http.Response, error) {
	if !strings.Contains(req.URL.Path, "/sendToDevice/"+event.ToDeviceRoomKeyRequest.Type+"/") {
		return f.next.RoundTrip(req)
	}
	f.attempts.Add(1)
	f.mu.Lock()
	var status int
	if len(f.status) > 0 {
		status, f.status = f.status[0], f.status[1:]
	}
	f.mu.Unlock()
	if status == 0 {
		return f.next.RoundTrip(req)
	}
	body := `{"errcode":"M_UNKNOWN","error":"scripted"}`
	if status == http.StatusForbidden {
		body = `{"errcode":"M_FORBIDDEN","error":"scripted"}`
	}
	return &http.Response{StatusCode: status, Header: http.Header{"Content-Type": {"application/json"}},
		Body: io.NopCloser(strings.NewReader(body)), Request: req}, nil
}

// The server stores a reply and loses its answer, and does not deduplicate transaction IDs
// (Dendrite after a lost answer): the bot looks for its own event by transaction ID before
// sending again, so every message is answered exactly once.
func TestLostAnswerIsNotSentTwice(t *testing.T) {
	ctx, _ := testCtx(t)
	var mu sync.Mutex
	seen := map[string]bool{}
	f := newFixture(t, minihs.Options{NoTxnDedup: true, SendFault: func(_ id.RoomID, txn string) minihs.SendFault {
		mu.Lock()
		defer mu.Unlock()
		if seen[txn] {
			return minihs.SendAnswer
		}
		seen[txn] = true
		return minihs.SendStoreDropResponse // every send's first attempt: stored, answer lost
	}})
	r := f.start(ctx, f.client(), Config{}, nil)
	f.waitJoined(ctx, r)
	const n = 3
	for i := range n {
		_, err := f.alice.SendEncrypted(ctx, f.room, fmt.Sprintf("m%d", i))
		require.NoError(t, err)
	}
	got := f.replies(ctx, n, 30*time.Second)
	assert.ElementsMatch(t, []string{"echo: m0", "echo: m1", "echo: m2"}, got)
	time.Sleep(200 * time.Millisecond) // a duplicate would come right after
	assert.Len(t, f.botReplies(), n, "one event per reply")
	assert.Zero(t, f.srv.DuplicateSends())
}

// A bot stopped while the server holds a stored reply's answer handles the message again when
// it restarts: the handler's first send, known done in the outbox, is answered from it
// without a request, and the second, attempted with an unknown outcome, is found by its
// transaction ID. No reply is sent twice.
func TestRestartDuringSendSendsNothingTwice(t *testing.T) {
	ctx, _ := testCtx(t)
	var hang atomic.Bool
	hung := make(chan struct{}, 1)
	var attempts atomic.Int32
	f := newFixture(t, minihs.Options{NoTxnDedup: true, SendFault: func(_ id.RoomID, txn string) minihs.SendFault {
		attempts.Add(1)
		if strings.HasSuffix(txn, ".1") && hang.Load() {
			hung <- struct{}{}
			return minihs.SendStoreHang
		}
		return minihs.SendAnswer
	}})
	twice := func(h *Helper, cli *mautrix.Client) {
		h.OnEventType(event.EventMessage, func(ctx context.Context, evt *event.Event) {
			body := evt.Content.AsMessage().Body
			if _, err := cli.SendText(ctx, evt.RoomID, "first: "+body); err != nil {
				return
			}
			_, _ = cli.SendText(ctx, evt.RoomID, "second: "+body)
		})
	}
	hang.Store(true)
	r := f.start(ctx, f.client(), Config{}, twice)
	f.waitJoined(ctx, r)
	_, err := f.alice.SendEncrypted(ctx, f.room, "x")
	require.NoError(t, err)
	select {
	case <-hung:
	case <-time.After(30 * time.Second):
		t.Fatal("the second send never reached the server")
	}
	require.ErrorIs(t, r.stop(), context.Canceled)
	hang.Store(false)
	before := attempts.Load()

	r = f.start(ctx, f.client(), Config{}, twice)
	f.waitJoined(ctx, r)
	_, err = f.alice.SendEncrypted(ctx, f.room, "y")
	require.NoError(t, err)
	got := f.replies(ctx, 4, 30*time.Second)
	assert.Equal(t, []string{"first: x", "second: x", "first: y", "second: y"}, got)
	assert.Len(t, f.botReplies(), 4)
	assert.Zero(t, f.srv.DuplicateSends())
	assert.Equal(t, before+2, attempts.Load(), "after the restart only y's two sends reached the server")
}

// newClientFor returns a client of the bot at url.
func newClientFor(tb testing.TB, url string, user id.UserID, dev id.DeviceID, token string) *mautrix.Client {
	cli, err := mautrix.NewClient(url, user, token)
	require.NoError(tb, err)
	cli.DeviceID = dev
	return cli
}
