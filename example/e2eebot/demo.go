package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/sliding-e2ee/sdk/crypto/bot"
	"github.com/sliding-e2ee/sdk/internal/minihs"
	"github.com/sliding-e2ee/sdk/slidingsync"
	"github.com/sliding-e2ee/sdk/slidingsync/sqlstore"
	"github.com/sliding-e2ee/sdk/slidingsync/sqlstore/dbopen"
)

// stepTimeout bounds every step of the demo script.
const stepTimeout = 30 * time.Second

// demoPeer is the scripted user who talks to the bot.
const demoPeer = id.UserID("@alice:" + minihs.ServerName)

// runDemo starts the embedded homeserver with a scripted peer, runs the bot against it
// through runBot and prints what happens on stdout.
func runDemo(ctx context.Context, o options) error {
	return runDemoTo(ctx, o, os.Stdout)
}

// demo is the state of one demo run, shared between the script and the bot's hooks.
type demo struct {
	out io.Writer

	mu        sync.Mutex
	started   time.Time
	responses int
	known     int
	seen      map[id.RoomID]bool // rooms the responses carried
	count     int
	allKnown  time.Duration
	shrunk    bool // the window was shrunk once every room was known
}

func (d *demo) printf(format string, args ...any) {
	d.mu.Lock()
	defer d.mu.Unlock()
	fmt.Fprintf(d.out, format+"\n", args...)
}

// onResponse prints the progress of the initial sync: the rooms seen so far (the window
// scans the list, so its positions alone do not say it).
func (d *demo) onResponse(_ context.Context, res *slidingsync.Result) {
	ls, ok := res.Lists["all"]
	d.mu.Lock()
	defer d.mu.Unlock()
	d.responses++
	if d.seen == nil {
		d.seen = make(map[id.RoomID]bool)
	}
	for roomID := range res.Rooms {
		d.seen[roomID] = true
	}
	if !ok {
		return
	}
	known := len(d.seen)
	if known == d.known && ls.Count == d.count {
		return
	}
	d.known, d.count = known, ls.Count
	if d.allKnown != 0 {
		if !d.shrunk && len(ls.Rooms) < ls.Count {
			d.shrunk = true
			fmt.Fprintf(d.out, "sync: window shrunk to the top %d rooms of the list; all %d stay known and stored\n", len(ls.Rooms), ls.Count)
		}
		return
	}
	fmt.Fprintf(d.out, "sync: rooms loaded %d of %d\n", min(known, ls.Count), ls.Count)
	if known >= ls.Count && d.allKnown == 0 {
		d.allKnown = time.Since(d.started)
		fmt.Fprintf(d.out, "sync: every room known after %s (%d responses)\n", d.allKnown.Round(time.Millisecond), d.responses)
	}
}

// runDemoTo is runDemo writing to out.
func runDemoTo(ctx context.Context, o options, out io.Writer) (err error) {
	defer func() {
		if errors.Is(err, context.Canceled) {
			// main exits 0 on context.Canceled, but a demo cut short did not succeed.
			err = fmt.Errorf("demo interrupted before the script finished: %v", err)
		}
	}()
	rooms := o.demoRooms
	if rooms <= 0 {
		rooms = -1 // minihs: no generated rooms
	}
	srv, err := minihs.NewServer(minihs.Options{Rooms: rooms, Seed: 1})
	if err != nil {
		return err
	}
	defer srv.Close()
	d := &demo{out: out, started: time.Now()}
	botUser, botDevice, token := srv.Bot()

	alice, err := srv.NewPeer(ctx, demoPeer)
	if err != nil {
		return fmt.Errorf("demo failed: create alice: %w", err)
	}
	roomID, err := alice.CreateEncryptedRoom(ctx, "Encrypted demo room", botUser)
	if err != nil {
		return fmt.Errorf("demo failed: create the encrypted room: %w", err)
	}
	d.printf("demo: embedded homeserver at %s with %d plain rooms; alice created an encrypted room and invited the bot %s (device %s)",
		srv.URL(), max(rooms, 0), botUser, botDevice)

	dbTarget := o.db
	if o.dbSet && !strings.Contains(dbTarget, "://") {
		if _, err := os.Stat(dbTarget); err == nil {
			return fmt.Errorf("demo: %s already exists; the embedded homeserver starts empty, so the demo needs a new database", dbTarget)
		}
	}
	if !o.dbSet {
		dir, err := os.MkdirTemp("", "e2eebot-demo")
		if err != nil {
			return err
		}
		defer os.RemoveAll(dir)
		dbTarget = filepath.Join(dir, "demo.db")
	}
	botOpts := options{
		homeserver:  srv.URL(),
		user:        botUser.String(),
		accessToken: token,
		deviceID:    botDevice.String(),
		db:          dbTarget,
		protocol:    string(slidingsync.ProtocolMSC4186),
		connID:      o.connID,
	}
	cli, cfg, err := config(ctx, botOpts)
	if err != nil {
		return err
	}
	cfg.OnResponse = func(ctx context.Context, res *slidingsync.Result) (slidingsync.Step, error) {
		d.onResponse(ctx, res)
		return slidingsync.Step{}, nil
	}
	// A short rotation interval makes the replacement of a used fallback key visible.
	cfg.Crypto = bot.CryptoConfig{FallbackKeyRotation: time.Second}
	h, err := newEcho(cli, cfg)
	if err != nil {
		return err
	}
	botCtx, stopBot := context.WithCancel(ctx)
	defer stopBot()
	exited := make(chan struct{})
	var botErr error
	go func() {
		defer close(exited)
		botErr = h.Run(botCtx)
	}()

	sc := &script{d: d, srv: srv, alice: alice, roomID: roomID, bot: botUser, botDevice: botDevice, exited: exited, botErr: &botErr}
	scriptErr := sc.run(ctx)
	stopBot()
	<-exited
	if scriptErr != nil {
		return fmt.Errorf("demo failed: %w", scriptErr)
	}
	if botErr != nil && !errors.Is(botErr, context.Canceled) {
		return fmt.Errorf("demo failed: the bot: %w", botErr)
	}

	// Reopen what was committed, as a restarted bot would.
	conn := h.Conn()
	store, closeStore, err := openStore(context.WithoutCancel(ctx), dbTarget)
	if err != nil {
		return fmt.Errorf("demo failed: reload: %w", err)
	}
	defer closeStore()
	cp, err := store.Load(context.WithoutCancel(ctx), conn.Key())
	if err != nil {
		return fmt.Errorf("demo failed: reload: %w", err)
	}
	total := srv.Rooms()
	if len(cp.Rooms) != total || cp.Pos != conn.Pos() {
		return fmt.Errorf("demo failed: reload: %d rooms at pos %q, want %d at %q", len(cp.Rooms), cp.Pos, total, conn.Pos())
	}
	d.printf("db: reloading the database gives back all %d rooms at pos %q", len(cp.Rooms), cp.Pos)
	d.printf("summary: the bot ran through the same code as against a real homeserver (MSC4186 sliding sync with the e2ee and "+
		"to_device extensions, state and crypto in one SQLite database): it loaded all %d rooms in %s scanning the list 500 rooms at a time, "+
		"uploaded its device keys, one-time keys and a fallback key, joined the encrypted room it was invited to, decrypted "+
		"alice's message and answered it encrypted, topped its one-time keys up after %d were claimed, replaced its fallback key "+
		"after a claim used it, re-queried alice's devices when she added one so that her new device could decrypt the next "+
		"reply, and committed every response with its cursors in one transaction, so the reloaded database holds all %d rooms at pos %q.",
		total, d.allKnown.Round(time.Millisecond), sc.claimed, len(cp.Rooms), cp.Pos)
	return nil
}

// script is the scripted peer's side of the demo.
type script struct {
	d         *demo
	srv       *minihs.Server
	alice     *minihs.Peer
	roomID    id.RoomID
	bot       id.UserID
	botDevice id.DeviceID
	exited    <-chan struct{}
	botErr    *error
	claimed   int
}

// wait waits up to stepTimeout for cond, failing with what when it does not happen or when
// the bot stops.
func (sc *script) wait(ctx context.Context, what string, cond func() bool) error {
	return sc.waitUpTo(ctx, stepTimeout, what, cond)
}

// waitUpTo is wait with another bound.
func (sc *script) waitUpTo(ctx context.Context, timeout time.Duration, what string, cond func() bool) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	stopped := false
	err := sc.srv.WaitFor(ctx, func() bool {
		select {
		case <-sc.exited:
			stopped = true
			return true
		default:
		}
		return cond()
	})
	switch {
	case stopped:
		return fmt.Errorf("%s: the bot stopped: %v", what, *sc.botErr)
	case err != nil:
		return fmt.Errorf("%s: %w", what, err)
	}
	return nil
}

// stepCtx bounds a peer action.
func stepCtx(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, stepTimeout)
}

func (sc *script) run(ctx context.Context) error {
	d, srv := sc.d, sc.srv
	const full = 50 // one-time keys the bot keeps on the server (half of goolm's 100)

	err := sc.wait(ctx, "the bot's first key upload", func() bool {
		otks, fb, unused := srv.KeyCounts(sc.bot, sc.botDevice)
		return otks >= full && fb != "" && unused
	})
	if err != nil {
		return err
	}
	ups := srv.Uploads(sc.bot, sc.botDevice)
	otks := 0
	for _, u := range ups {
		otks += u.OTKs
	}
	d.printf("keys: bot uploaded device keys, %d one-time keys and a fallback key", otks)

	// The initial sync writes every room's state; give it time in proportion.
	if err := sc.waitUpTo(ctx, stepTimeout+time.Duration(sc.srv.Rooms())*30*time.Millisecond, "the initial sync", func() bool {
		d.mu.Lock()
		defer d.mu.Unlock()
		return d.allKnown != 0
	}); err != nil {
		return err
	}
	if err := sc.wait(ctx, "the bot joining the encrypted room", func() bool {
		return srv.Membership(sc.roomID, sc.bot) == event.MembershipJoin
	}); err != nil {
		return err
	}
	d.printf("bot: joined alice's encrypted room after the invite")

	// An encrypted message and its encrypted answer.
	if err := sc.exchange(ctx, sc.alice, "hello"); err != nil {
		return err
	}
	if err := sc.wait(ctx, "the acknowledgement of the room key", func() bool {
		return srv.PendingToDevice(sc.bot, sc.botDevice) == 0
	}); err != nil {
		return err
	}
	d.printf("to-device: the bot's next request acknowledged alice's room key message, so the server deleted it")

	// One-time keys claimed by others are topped up.
	before, _, _ := srv.KeyCounts(sc.bot, sc.botDevice)
	claimN := before - 5
	actx, cancel := stepCtx(ctx)
	got, _, err := sc.alice.ClaimBotKeys(actx, claimN)
	cancel()
	if err != nil {
		return fmt.Errorf("claim the bot's one-time keys: %w", err)
	}
	sc.claimed = got
	held, _, _ := srv.KeyCounts(sc.bot, sc.botDevice)
	if err := sc.wait(ctx, "the one-time key top-up", func() bool {
		n, _, _ := srv.KeyCounts(sc.bot, sc.botDevice)
		return n >= full
	}); err != nil {
		return err
	}
	now, _, _ := srv.KeyCounts(sc.bot, sc.botDevice)
	d.printf("keys: %d one-time keys claimed, server holds %d → bot topped up to %d", got, held, now)

	// A claim that finds no one-time key gets the fallback key, which the bot replaces.
	_, oldFallback, _ := srv.KeyCounts(sc.bot, sc.botDevice)
	actx, cancel = stepCtx(ctx)
	fallbackUsed := false
	// The bot would top up after every claim it hears of: it hears of none until the claims
	// are done, as if they all came while it was busy.
	release := srv.HoldSync()
	defer release()
	for range 4 * full {
		_, fb, err := sc.alice.ClaimBotKeys(actx, 1)
		if err != nil {
			cancel()
			return fmt.Errorf("claim the bot's keys: %w", err)
		}
		if fb > 0 {
			fallbackUsed = true
			break
		}
	}
	cancel()
	release()
	if !fallbackUsed {
		return errors.New("the bot's one-time keys never ran out, so no claim used its fallback key")
	}
	d.printf("keys: alice claimed every one-time key and then the fallback key; the server reports no unused fallback key")
	if err := sc.wait(ctx, "the fallback key rotation", func() bool {
		_, fb, unused := srv.KeyCounts(sc.bot, sc.botDevice)
		return unused && fb != oldFallback
	}); err != nil {
		return err
	}
	if err := sc.wait(ctx, "the one-time key top-up after the fallback claim", func() bool {
		n, _, _ := srv.KeyCounts(sc.bot, sc.botDevice)
		return n >= full
	}); err != nil {
		return err
	}
	d.printf("keys: fallback key used by a claim → bot uploaded a new fallback key (and topped up to %d one-time keys)", full)

	// A new device of alice: the bot hears of it and queries her devices again.
	queried := len(srv.Queries(sc.bot, demoPeer))
	actx, cancel = stepCtx(ctx)
	alice2, err := sc.alice.AddDevice(actx)
	cancel()
	if err != nil {
		return fmt.Errorf("add a device to alice: %w", err)
	}
	d.printf("devices: alice added a device (%s)", alice2.DeviceID)
	var devices int
	if err := sc.wait(ctx, "the re-query of alice's devices", func() bool {
		qs := srv.Queries(sc.bot, demoPeer)
		for _, q := range qs[min(queried, len(qs)):] {
			if q.Devices >= 2 {
				devices = q.Devices
				return true
			}
		}
		return false
	}); err != nil {
		return err
	}
	d.printf("devices: the bot saw alice in device_lists.changed → re-queried alice's devices (%d)", devices)
	if err := sc.exchange(ctx, sc.alice, "are you there?"); err != nil {
		return err
	}
	actx, cancel = stepCtx(ctx)
	reply, err := alice2.NextMessage(actx, sc.roomID, sc.bot)
	cancel()
	if err != nil {
		return fmt.Errorf("alice's new device decrypting the reply: %w", err)
	}
	d.printf("peer: alice's new device decrypted the reply %q", replyBody(reply))
	return nil
}

// exchange has peer send body encrypted and waits for the bot's encrypted answer, which the
// peer decrypts.
func (sc *script) exchange(ctx context.Context, peer *minihs.Peer, body string) error {
	actx, cancel := stepCtx(ctx)
	defer cancel()
	if _, err := peer.SendEncrypted(actx, sc.roomID, body); err != nil {
		return fmt.Errorf("alice sending %q: %w", body, err)
	}
	sc.d.printf("peer: alice sent an encrypted message (room key shared with the bot's device over to-device)")
	want := "echo: " + body
	reply, err := peer.NextMessage(actx, sc.roomID, sc.bot)
	if err != nil {
		return fmt.Errorf("the bot's answer to %s, decrypted by alice: %w", body, err)
	}
	sc.d.printf("bot: decrypted it and replied encrypted")
	if got := replyBody(reply); got != want {
		return fmt.Errorf("alice decrypted %q, want %q", got, want)
	}
	sc.d.printf("peer: alice decrypted the reply %q", want)
	return nil
}

// replyBody returns the text of a decrypted message.
func replyBody(evt *event.Event) string {
	if msg, ok := evt.Content.Parsed.(*event.MessageEventContent); ok {
		return strings.TrimSpace(msg.Body)
	}
	return ""
}

// openStore opens the database and upgrades the sliding sync store on it.
func openStore(ctx context.Context, target string) (*sqlstore.Store, func(), error) {
	db, err := dbopen.Open(target, dbopen.Config{})
	if err != nil {
		return nil, nil, err
	}
	store := sqlstore.New(db, nil)
	if err := store.Upgrade(ctx); err != nil {
		_ = db.Close()
		return nil, nil, fmt.Errorf("upgrade store: %w", err)
	}
	return store, func() { _ = db.Close() }, nil
}
