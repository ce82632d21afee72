package main

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"maunium.net/go/mautrix/id"

	"github.com/sliding-e2ee/sdk/internal/crashtest"
	"github.com/sliding-e2ee/sdk/internal/minihs"
	"github.com/sliding-e2ee/sdk/internal/pgtest"
)

// Environment of the crash harness.
const (
	// crashChildEnv carries the command-line arguments (JSON) of a child that runs the bot.
	crashChildEnv = "E2EEBOT_CRASH_CHILD"
	// crashSeedEnv replays a run: the seed drives the kill moments and the scripted stream.
	crashSeedEnv = "E2EEBOT_CRASH_SEED"
	// crashKillsEnv overrides the number of kills (200).
	crashKillsEnv = "E2EEBOT_CRASH_KILLS"
)

func TestMain(m *testing.M) {
	if args := os.Getenv(crashChildEnv); args != "" {
		// A child of the crash harness: run the command itself, as a user would.
		var a []string
		if err := json.Unmarshal([]byte(args), &a); err != nil {
			fmt.Fprintln(os.Stderr, "bad", crashChildEnv, err)
			os.Exit(2)
		}
		os.Args = append([]string{"e2eebot"}, a...)
		main()
		os.Exit(0)
	}
	os.Exit(pgtest.Main(m))
}

// deviceChange is a device added to alice's account: when the addition began, and how many
// devices the stream had added by its end.
type deviceChange struct {
	began   time.Time
	devices int
}

// crashStream is the scripted traffic of a crash run: encrypted messages (with room key
// rotations, so room keys keep arriving over to-device), new peer devices (device-list
// changes), and claims of the bot's keys until the fallback key is used. It records what it
// did for the final checks.
type crashStream struct {
	srv   *minihs.Server
	room  id.RoomID
	alice *minihs.Peer

	mu        sync.Mutex
	devices   []*minihs.Peer // alice's devices after the first
	sent      []string       // bodies of the messages sent
	changes   []deviceChange // each new device of alice
	rotations int
	claimed   int
	fallbacks int
}

func (s *crashStream) step(ctx context.Context, rng *rand.Rand) error {
	switch r := rng.IntN(100); {
	case r < 45:
		s.mu.Lock()
		body := fmt.Sprintf("message %d", len(s.sent)+1)
		s.mu.Unlock()
		if _, err := s.alice.SendEncrypted(ctx, s.room, body); err != nil {
			return fmt.Errorf("send %q: %w", body, err)
		}
		s.mu.Lock()
		s.sent = append(s.sent, body)
		s.mu.Unlock()
	case r < 60:
		// The next message goes out under a new session, whose key reaches the bot over
		// to-device (after a claim of one of its one-time keys).
		if err := s.alice.Olm.CryptoStore.RemoveOutboundGroupSession(ctx, s.room); err != nil {
			return err
		}
		s.mu.Lock()
		s.rotations++
		s.mu.Unlock()
	case r < 70:
		s.mu.Lock()
		n := len(s.devices)
		s.mu.Unlock()
		if n >= 6 {
			return nil
		}
		// The bot may learn of the device and query it before AddDevice returns: the change
		// counts from before it began.
		began := time.Now()
		dev, err := s.alice.AddDevice(ctx)
		if err != nil {
			return fmt.Errorf("add device: %w", err)
		}
		s.mu.Lock()
		s.devices = append(s.devices, dev)
		s.changes = append(s.changes, deviceChange{began: began, devices: len(s.devices)})
		s.mu.Unlock()
	default:
		otks, fallbacks, err := s.alice.ClaimBotKeys(ctx, 1+rng.IntN(20))
		if err != nil {
			return fmt.Errorf("claim: %w", err)
		}
		s.mu.Lock()
		s.claimed += otks
		s.fallbacks += fallbacks
		s.mu.Unlock()
	}
	return nil
}

// The crash harness: the example bot runs as a child process (this test binary running the
// command's main) against an in-process homeserver with a scripted stream, and is SIGKILLed
// at random moments. Afterwards a last run must catch up with everything: every message
// decrypted and answered (no room key lost), every device-list change followed by a key
// query, no key upload rejected for a reused key ID.
func TestCrashHarness(t *testing.T) {
	if testing.Short() {
		t.Skip("the crash harness takes minutes")
	}
	seed, kills := crashtest.Plan(t, crashSeedEnv, crashKillsEnv, 200)
	rng := rand.New(rand.NewPCG(seed, 1))
	streamRng := rand.New(rand.NewPCG(seed, 2))

	ctx, cancel := context.WithTimeout(t.Context(), 15*time.Minute)
	defer cancel()
	srv, err := minihs.NewServer(minihs.Options{Rooms: 40, Seed: seed, Dir: t.TempDir()})
	require.NoError(t, err)
	defer srv.Close()
	bot, dev, _ := srv.Bot()
	alice, err := srv.NewPeer(ctx, "@alice:demo.invalid")
	require.NoError(t, err)
	room, err := alice.CreateEncryptedRoom(ctx, "crash room", bot)
	require.NoError(t, err)

	start := botChild(t, srv, "-protocol", "msc4186", "-lease-holder", "crash-harness")

	// The stream starts once the bot has its keys up and has joined: before that, messages
	// could not reach it whatever it did.
	first := start()
	require.NoError(t, srv.WaitFor(ctx, func() bool {
		return len(srv.Uploads(bot, dev)) > 0 && srv.Membership(room, bot) == "join"
	}), "the bot uploads its keys and joins")

	stream := &crashStream{srv: srv, room: room, alice: alice}
	streamCtx, stopStream := context.WithCancel(ctx)
	var streamErr error
	var wg sync.WaitGroup
	wg.Go(func() {
		for streamCtx.Err() == nil {
			if err := stream.step(streamCtx, streamRng); err != nil && streamCtx.Err() == nil {
				streamErr = err
				return
			}
			select {
			case <-streamCtx.Done():
			case <-time.After(time.Duration(100+streamRng.IntN(300)) * time.Millisecond):
			}
		}
	})

	// Kill at random moments: right after the start (during upgrades, the lease, the first
	// request), in the middle of processing, or while idle in a long-poll.
	cmd := first
	began := time.Now()
	for i := range kills {
		if i > 0 {
			cmd = start()
		}
		time.Sleep(time.Duration(rng.IntN(900)) * time.Millisecond)
		require.NoError(t, cmd.Process.Signal(syscall.SIGKILL))
		_ = cmd.Wait()
	}
	killTime := time.Since(began)
	stopStream()
	wg.Wait()
	require.NoError(t, streamErr)

	// A last message every device of alice must decrypt the answer to, then a clean run
	// until everything is answered.
	_, err = alice.SendEncrypted(ctx, room, "final")
	require.NoError(t, err)
	stream.sent = append(stream.sent, "final")
	cmd = start()
	// The catch-up ends early if the bot exits on its own: that is a failure.
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	catchCtx, stopCatch := context.WithCancelCause(ctx)
	defer stopCatch(nil)
	go func() {
		select {
		case err := <-exited:
			stopCatch(fmt.Errorf("the bot exited during the catch-up: %v", err))
			exited <- err
		case <-catchCtx.Done():
		}
	}()
	defer func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(30 * time.Second):
			t.Error("the bot did not stop within 30 s of SIGTERM")
			_ = cmd.Process.Kill()
		}
	}()
	want := map[string]bool{}
	for _, body := range stream.sent {
		want["echo: "+body] = true
	}
	catchUp := time.Now()
	answered := map[string]bool{}
	readers := append([]*minihs.Peer{alice}, stream.devices...)
	for len(answered) < len(want) {
		readCtx, done := context.WithTimeout(catchCtx, 90*time.Second)
		evt, err := alice.NextMessage(readCtx, room, bot)
		done()
		if err != nil {
			break
		}
		if body := evt.Content.AsMessage().Body; want[body] {
			answered[body] = true
		}
	}
	require.NoError(t, context.Cause(catchCtx))
	var lost []string
	for body := range want {
		if !answered[body] {
			lost = append(lost, body)
		}
	}
	// Every device of alice can read the answer to the last message.
	for _, p := range readers[1:] {
		readCtx, done := context.WithTimeout(catchCtx, 60*time.Second)
		var got bool
		for !got {
			evt, err := p.NextMessage(readCtx, room, bot)
			if err != nil {
				break
			}
			got = evt.Content.AsMessage().Body == "echo: final"
		}
		done()
		assert.True(t, got, "alice's device %s decrypts the answer to the last message", p.DeviceID)
	}

	// Device-list changes: each must be followed by a key query of alice by the bot that
	// returned the new device.
	queries := srv.Queries(bot, alice.UserID)
	changesLost := 0
	for _, c := range stream.changes {
		if !slices.ContainsFunc(queries, func(q minihs.Query) bool {
			return q.At.After(c.began) && q.Devices >= c.devices+1 // alice's first device and the new ones
		}) {
			changesLost++
		}
	}
	var uploads, otksUploaded, fallbackUploads int
	for _, u := range srv.Uploads(bot, dev) {
		uploads++
		otksUploaded += u.OTKs
		if u.Fallback != "" {
			fallbackUploads++
		}
	}
	t.Logf("%d kills in %s (seed %d); stream: %d messages, %d room key rotations, %d new devices, %d one-time keys and %d fallback keys claimed",
		kills, killTime.Round(time.Second), seed, len(stream.sent), stream.rotations, len(stream.devices), stream.claimed, stream.fallbacks)
	t.Logf("bot: %d key uploads (%d one-time keys, %d fallback keys), %d key queries of alice; caught up in %s",
		uploads, otksUploaded, fallbackUploads, len(queries), time.Since(catchUp).Round(time.Millisecond))
	t.Logf("figures: device-list changes lost %d, messages left unanswered (room key lost or undecryptable) %d, key uploads rejected for a reused key ID %d, replies repeated after a crash (deduplicated by transaction ID) %d",
		changesLost, len(lost), srv.UploadRejections(), srv.RepeatedSends())
	assert.Zero(t, changesLost, "device-list changes lost")
	assert.Empty(t, lost, "messages left unanswered: %s", strings.Join(lost, ", "))
	assert.Zero(t, srv.UploadRejections(), "key uploads rejected for a reused key ID")
	assert.Greater(t, len(stream.sent), 10, "the stream sent messages")
}

// crashSendKillsEnv overrides the number of kills of TestCrashDuringReplySend (100).
const crashSendKillsEnv = "E2EEBOT_CRASH_SEND_KILLS"

// The bot is killed during every reply's send, after the server stored the reply and before
// it answers, on a server that does not deduplicate transaction IDs (Dendrite accepts a
// transaction ID again after a lost answer). The restarted bot handles the message again and
// must find its own stored reply by transaction ID instead of sending it again: every message
// is answered exactly once.
func TestCrashDuringReplySend(t *testing.T) {
	if testing.Short() {
		t.Skip("the crash test takes a minute")
	}
	_, kills := crashtest.Plan(t, crashSeedEnv, crashSendKillsEnv, 100)
	ctx, cancel := context.WithTimeout(t.Context(), 15*time.Minute)
	defer cancel()
	var hang atomic.Bool
	hang.Store(true)
	hung := make(chan string, 1)
	var mu sync.Mutex
	attempts := map[string]int{}
	srv, err := minihs.NewServer(minihs.Options{Rooms: 20, Dir: t.TempDir(), NoTxnDedup: true,
		SendFault: func(_ id.RoomID, txn string) minihs.SendFault {
			mu.Lock()
			attempts[txn]++
			first := attempts[txn] == 1
			mu.Unlock()
			if first && hang.Load() {
				select {
				case hung <- txn:
				default:
				}
				return minihs.SendStoreHang
			}
			return minihs.SendAnswer
		}})
	require.NoError(t, err)
	defer srv.Close()
	bot, _, _ := srv.Bot()
	alice, err := srv.NewPeer(ctx, "@alice:demo.invalid")
	require.NoError(t, err)
	room, err := alice.CreateEncryptedRoom(ctx, "crash during send", bot)
	require.NoError(t, err)

	start := botChild(t, srv, "-protocol", "msc4186")

	began := time.Now()
	for i := range kills {
		cmd := start()
		if i == 0 {
			require.NoError(t, srv.WaitFor(ctx, func() bool { return srv.Membership(room, bot) == "join" }), "the bot joins")
		}
		_, err := alice.SendEncrypted(ctx, room, fmt.Sprintf("message %d", i))
		require.NoError(t, err)
		select {
		case <-hung: // the reply is stored; its answer is held
		case <-time.After(60 * time.Second):
			_ = cmd.Process.Kill()
			t.Fatalf("kill %d: the reply to message %d never reached the server", i, i)
		}
		require.NoError(t, cmd.Process.Signal(syscall.SIGKILL))
		_ = cmd.Wait()
	}
	killTime := time.Since(began)

	// A last run answers normally and must settle the last message without sending again.
	hang.Store(false)
	cmd := start()
	defer func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		_ = cmd.Wait()
	}()
	_, err = alice.SendEncrypted(ctx, room, "final")
	require.NoError(t, err)
	counts := map[string]int{}
	for {
		readCtx, done := context.WithTimeout(ctx, 30*time.Second)
		evt, err := alice.NextMessage(readCtx, room, bot)
		done()
		if err != nil {
			break
		}
		body := evt.Content.AsMessage().Body
		counts[body]++
		if body == "echo: final" {
			break
		}
	}
	time.Sleep(500 * time.Millisecond) // a repeated send would come right after
	var botEvents int
	for _, e := range srv.RoomEvents(room) {
		if e.Sender == bot && e.Type.Type == "m.room.encrypted" {
			botEvents++
		}
	}
	var missing, doubled []string
	for i := range kills {
		switch body := fmt.Sprintf("echo: message %d", i); counts[body] {
		case 1:
		case 0:
			missing = append(missing, body)
		default:
			doubled = append(doubled, body)
		}
	}
	t.Logf("%d kills during a reply's send in %s; replies stored %d for %d messages, stored twice by the server %d, sends repeated %d",
		kills, killTime.Round(time.Second), botEvents, kills+1, srv.DuplicateSends(), srv.RepeatedSends())
	assert.Empty(t, missing, "messages not answered")
	assert.Empty(t, doubled, "messages answered twice")
	assert.Equal(t, 1, counts["echo: final"])
	assert.Equal(t, kills+1, botEvents, "one stored reply per message")
	assert.Zero(t, srv.DuplicateSends(), "no transaction ID stored twice")
}

// botChild returns a function that starts the example bot as a child process (this test
// binary running the command's main) against srv, logged in as its bot with the access token,
// with extra flags. Every process shares one database and one log, whose end is shown if the
// test fails.
func botChild(t *testing.T, srv *minihs.Server, extra ...string) func() *exec.Cmd {
	t.Helper()
	bot, dev, token := srv.Bot()
	dir := t.TempDir()
	args, err := json.Marshal(append([]string{
		"-homeserver", srv.URL(), "-user", bot.String(), "-access-token", token, "-device-id", dev.String(),
		"-db", filepath.Join(dir, "bot.db"),
	}, extra...))
	require.NoError(t, err)
	logPath := filepath.Join(dir, "bot.log")
	logFile, err := os.Create(logPath)
	require.NoError(t, err)
	t.Cleanup(func() {
		_ = logFile.Close()
		if t.Failed() {
			if b, err := os.ReadFile(logPath); err == nil {
				t.Logf("bot log (last 6 KiB):\n%s", b[max(0, len(b)-6<<10):])
			}
		}
	})
	return func() *exec.Cmd {
		cmd := exec.Command(os.Args[0], "-test.run=^$")
		cmd.Env = append(os.Environ(), crashChildEnv+"="+string(args))
		cmd.Stdout, cmd.Stderr = logFile, logFile
		require.NoError(t, cmd.Start())
		return cmd
	}
}
