package main

import (
	"context"
	"fmt"
	"path/filepath"
	"regexp"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/event"

	"github.com/sliding-e2ee/sdk/crypto/bot"
	"github.com/sliding-e2ee/sdk/internal/minihs"
	"github.com/sliding-e2ee/sdk/internal/testlog"
)

// demoContext returns a context whose logger keeps the bot's logs, shown if the test fails.
func demoContext(t *testing.T) context.Context {
	ctx, _ := testlog.Context(t)
	return ctx
}

func TestDemoCompletes(t *testing.T) {
	var out testlog.Buffer
	dbPath := filepath.Join(t.TempDir(), "demo.db")
	err := runDemoTo(demoContext(t), options{demoRooms: 600, db: dbPath, dbSet: true}, &out)
	require.NoError(t, err, out.String())
	printed := out.String()
	for _, want := range []string{
		`sync: rooms loaded 500 of 601`,
		`sync: rooms loaded 601 of 601`,
		`sync: every room known after`,
		`keys: bot uploaded device keys, 50 one-time keys and a fallback key`,
		`bot: joined alice's encrypted room after the invite`,
		`peer: alice sent an encrypted message`,
		`bot: decrypted it and replied encrypted`,
		`peer: alice decrypted the reply "echo: hello"`,
		`to-device: the bot's next request acknowledged alice's room key message`,
		`keys: \d+ one-time keys claimed, server holds \d+ → bot topped up to 50`,
		`keys: alice claimed every one-time key and then the fallback key`,
		`keys: fallback key used by a claim → bot uploaded a new fallback key`,
		`devices: alice added a device \(ALICEDEV2\)`,
		`devices: the bot saw alice in device_lists.changed → re-queried alice's devices \(2\)`,
		`peer: alice decrypted the reply "echo: are you there\?"`,
		`peer: alice's new device decrypted the reply "echo: are you there\?"`,
		`db: reloading the database gives back all 601 rooms`,
		`(?m)^summary: .*all 601 rooms`,
	} {
		assert.Regexp(t, regexp.MustCompile(want), printed)
	}
	// The demo kept its database where -db said, and refuses to run again on it: the embedded
	// homeserver starts empty, so a stored device would not match it.
	assert.FileExists(t, dbPath)
	err = runDemoTo(demoContext(t), options{demoRooms: 10, db: dbPath, dbSet: true}, &out)
	assert.ErrorContains(t, err, "already exists")
}

func TestDemoFailsWhenInterrupted(t *testing.T) {
	ctx, cancel := context.WithCancel(demoContext(t))
	cancel()
	var out testlog.Buffer
	err := runDemoTo(ctx, options{demoRooms: 10}, &out)
	require.Error(t, err)
	assert.NotErrorIs(t, err, context.Canceled, "main exits 0 on context.Canceled; an unfinished demo must not")
}

// TestBotDiscoversDemoServer runs the bot as a separate run would, with protocol discovery,
// against the demo homeserver by URL.
func TestBotDiscoversDemoServer(t *testing.T) {
	srv, err := minihs.NewServer(minihs.Options{Rooms: 30, Dir: t.TempDir()})
	require.NoError(t, err)
	defer srv.Close()
	bot, dev, token := srv.Bot()
	ctx, cancel := context.WithCancel(demoContext(t))
	defer cancel()
	done := make(chan error, 1)
	go func() {
		done <- runBot(ctx, options{
			homeserver: srv.URL(), user: bot.String(), accessToken: token, deviceID: dev.String(),
			db: filepath.Join(t.TempDir(), "bot.db"), protocol: "auto",
		})
	}()
	wctx, wcancel := context.WithTimeout(ctx, 30*time.Second)
	defer wcancel()
	require.NoError(t, srv.WaitFor(wctx, func() bool {
		n, fb, unused := srv.KeyCounts(bot, dev)
		return n == 50 && fb != "" && unused
	}))
	cancel()
	assert.ErrorIs(t, <-done, context.Canceled)
}

// TestBotRestartsAgainstDemoServer stops the bot and starts it again on the same database, as
// a crash harness does: the restarted bot resumes from its committed pos and answers a message
// sent while it was down.
func TestBotRestartsAgainstDemoServer(t *testing.T) {
	srv, err := minihs.NewServer(minihs.Options{Rooms: 30, Dir: t.TempDir()})
	require.NoError(t, err)
	defer srv.Close()
	bot, dev, token := srv.Bot()
	alice, err := srv.NewPeer(t.Context(), demoPeer)
	require.NoError(t, err)
	roomID, err := alice.CreateEncryptedRoom(t.Context(), "Restarts", bot)
	require.NoError(t, err)
	o := options{
		homeserver: srv.URL(), user: bot.String(), accessToken: token, deviceID: dev.String(),
		db: filepath.Join(t.TempDir(), "bot.db"), protocol: "msc4186",
	}
	echoed := make(chan string, 32)
	start := func() (stop func()) {
		_, stop = startBot(t, demoContext(t), o, nil, func(e answered) { echoed <- e.body })
		return stop
	}
	wctx, wcancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer wcancel()

	stop := start()
	// Alice can only share her room key with a device whose keys are on the server.
	require.NoError(t, srv.WaitFor(wctx, func() bool {
		_, fb, _ := srv.KeyCounts(bot, dev)
		return srv.Membership(roomID, bot) == event.MembershipJoin && fb != ""
	}))
	stop()

	// More messages than the bot's timeline limit (5): the response is limited, and the bot
	// fetches the ones it left out.
	const missed = 12
	for i := range missed {
		_, err = alice.SendEncrypted(wctx, roomID, fmt.Sprintf("while you were away %d", i))
		require.NoError(t, err)
	}
	stop = start()
	defer stop()
	got := map[string]bool{}
	for len(got) < missed {
		select {
		case body := <-echoed:
			got[body] = true
		case <-wctx.Done():
			t.Fatalf("the restarted bot answered %d of %d messages", len(got), missed)
		}
	}
	for i := range missed {
		assert.True(t, got[fmt.Sprintf("echo: while you were away %d", i)], "message %d answered", i)
	}
	reply, err := alice.NextMessage(wctx, roomID, bot)
	require.NoError(t, err)
	assert.Contains(t, reply.Content.AsMessage().Body, "echo: while you were away")
	assert.True(t, srv.Uploads(bot, dev)[0].DeviceKeys, "the device keys were uploaded once, by the first run")
	for _, u := range srv.Uploads(bot, dev)[1:] {
		assert.False(t, u.DeviceKeys, "the restarted bot keeps its device")
	}
}

// answered is a message the bot answered.
type answered struct {
	body string // the answer's
	at   time.Time
}

// startBot runs the echo bot of o as the command does, with setup applied to its client and
// configuration first; onAnswer is told of every answer once it was sent. stop cancels the
// bot and waits until Run returned.
func startBot(t testing.TB, ctx context.Context, o options, setup func(*mautrix.Client, *bot.Config), onAnswer func(answered)) (h *bot.Helper, stop func()) {
	t.Helper()
	cli, cfg, err := config(ctx, o)
	require.NoError(t, err)
	if setup != nil {
		setup(cli, &cfg)
	}
	h, err = newEcho(cli, cfg)
	require.NoError(t, err)
	if onAnswer != nil {
		// Handlers run in order: this one after the echo's send returned.
		h.OnEventType(event.EventMessage, func(_ context.Context, evt *event.Event) {
			onAnswer(answered{"echo: " + evt.Content.AsMessage().Body, time.Now()})
		})
	}
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- h.Run(ctx) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			<-done // stopped: whatever it says, it must return
		})
	}
	t.Cleanup(stop)
	return h, stop
}
