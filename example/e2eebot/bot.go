package main

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"database/sql"
	"embed"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"slices"
	"sync"
	"time"

	"github.com/rs/zerolog"
	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix"
	mcrypto "maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
	"maunium.net/go/mautrix/sqlstatestore"

	"github.com/sliding-e2ee/sdk/crypto"
	"github.com/sliding-e2ee/sdk/e2ee"
	"github.com/sliding-e2ee/sdk/slidingsync"
	"github.com/sliding-e2ee/sdk/slidingsync/sqlstore"
	"github.com/sliding-e2ee/sdk/slidingsync/sqlstore/dbopen"
)

//go:embed upgrades/*.sql
var upgrades embed.FS

var upgradeTable = dbutil.BuildUpgradeTable().WithFSPath(upgrades, "upgrades").Finish()

// pickleKeyEnv names the environment variable that, when set, gives the key the Olm account
// and sessions are encrypted with in the database. Without it a random key is made on the
// first start and kept in the database, which protects nothing from a reader of the database
// but keeps the example self-contained.
const pickleKeyEnv = "E2EEBOT_PICKLE_KEY"

// maxTries bounds how often an event that cannot be decrypted yet is retried (about a quarter
// of an hour with the backoff) before the bot gives up on it.
const maxTries = 12

// botHooks lets the demo and the tests watch the bot. Every field may be nil.
type botHooks struct {
	// transport replaces the HTTP transport (in-process servers).
	transport http.RoundTripper
	// onResponse runs after the bot's own handling of every response, before the commit.
	onResponse func(ctx context.Context, res *slidingsync.Result)
	// onEcho runs after a reply was sent.
	onEcho func(roomID id.RoomID, body string, encrypted bool)
	// onConn runs once the connection is built, before it runs.
	onConn func(conn *slidingsync.Conn, mach *crypto.Machine)
	// crypto configures the crypto Machine (the demo rotates fallback keys faster).
	crypto crypto.Config
	// openDB replaces dbopen.Open (benchmarks count the statements through a wrapping driver).
	openDB func(target string) (*dbutil.Database, error)
}

// bot is the running echo bot: one database holds its session, its task queue, mautrix's state
// and crypto stores, the crypto Machine's tables and the sliding sync store.
type bot struct {
	cli     *mautrix.Client
	db      *dbutil.Database
	state   *sqlstatestore.SQLStateStore
	olm     *mcrypto.OlmMachine
	mach    *crypto.Machine
	conn    *slidingsync.Conn
	hooks   botHooks
	created time.Time // events older than the bot's first start are history, not echoed

	staged    []task              // tasks of the response being processed, written by the commit
	stagedRes *slidingsync.Result // the response being processed, its state written by the commit
	seq       int64
	wake      chan struct{}
}

// task is something the bot has to do for one event: join a room it is invited to, or echo a
// message.
type task struct {
	EventID id.EventID
	Kind    string // "join" or "echo"
	RoomID  id.RoomID
	Event   json.RawMessage
}

// runBot runs the echo bot with the options of the command line until ctx is done or the
// connection fails.
func runBot(ctx context.Context, o options, hooks botHooks) error {
	open := func(target string) (*dbutil.Database, error) { return dbopen.Open(target, dbopen.Config{}) }
	if hooks.openDB != nil {
		open = hooks.openDB
	}
	db, err := open(o.db)
	if err != nil {
		return err
	}
	defer db.Close()
	b := &bot{db: db, hooks: hooks, wake: make(chan struct{}, 1)}
	if err := db.Child("e2eebot_version", upgradeTable, nil).Upgrade(ctx); err != nil {
		return fmt.Errorf("upgrade the bot's tables: %w", err)
	}
	pickleKey, err := b.session(ctx, o)
	if err != nil {
		return err
	}
	store := sqlstore.New(db, nil)
	if err := store.Upgrade(ctx); err != nil {
		return fmt.Errorf("upgrade the sliding sync store: %w", err)
	}
	// One process at a time runs a device's e2ee connection: a second one waits in standby
	// and takes over once the lease of the first expires. The account is loaded only once the
	// lease is held, so it is never a copy older than what the previous holder saved.
	leaseCfg := sqlstore.LeaseConfig{Duration: o.leaseDuration, Holder: o.leaseHolder}
	err = store.RunWithLease(ctx, b.cli.UserID, b.cli.DeviceID, leaseCfg, func(ctx context.Context, l *sqlstore.Lease) error {
		return b.run(ctx, o, l.Guard(store), pickleKey)
	})
	if ctx.Err() != nil {
		// Asked to stop: what failed while stopping (a commit fenced by the released lease,
		// a cancelled query) is part of stopping, not an error.
		return context.Cause(ctx)
	}
	return err
}

// run loads the crypto state and runs the bot while the lease is held.
func (b *bot) run(ctx context.Context, o options, store slidingsync.Store, pickleKey []byte) error {
	log := zerolog.Ctx(ctx)
	db, hooks := b.db, b.hooks
	var err error
	b.state = sqlstatestore.NewSQLStateStore(db, dbutil.ZeroLogger(log.With().Str("db", "state").Logger()), false)
	if err := b.state.Upgrade(ctx); err != nil {
		return fmt.Errorf("upgrade the state store: %w", err)
	}
	b.cli.StateStore = b.state
	cs := mcrypto.NewSQLCryptoStore(db, dbutil.ZeroLogger(log.With().Str("db", "crypto").Logger()), b.cli.UserID.String(), b.cli.DeviceID, pickleKey)
	if err := cs.DB.Upgrade(ctx); err != nil {
		return fmt.Errorf("upgrade the crypto store: %w", err)
	}
	olmLog := log.With().Str("component", "olm").Logger()
	b.olm = mcrypto.NewOlmMachine(b.cli, &olmLog, cs, b.state)
	if err := b.olm.Load(ctx); err != nil {
		return fmt.Errorf("load the Olm account: %w", err)
	}
	if b.mach, err = crypto.New(b.cli, b.olm, hooks.crypto); err != nil {
		return err
	}
	if err := b.mach.Upgrade(ctx); err != nil {
		return err
	}
	e2eeExt, err := e2ee.NewE2EE(b.cli.UserID, b.cli.DeviceID, e2ee.Config{Consumer: b.mach})
	if err != nil {
		return err
	}
	defer e2eeExt.Close()
	toDevice, err := e2ee.NewToDevice(b.cli.UserID, b.cli.DeviceID, e2ee.ToDeviceConfig{Handler: b.mach.HandleToDevice})
	if err != nil {
		return err
	}
	defer toDevice.Close()
	proto := protocolOf(o.protocol)
	if o.syncURL != "" && proto == slidingsync.ProtocolAuto {
		proto = slidingsync.ProtocolMSC3575 // a separate sync server is a proxy
	}
	b.conn, err = slidingsync.New(b.cli, slidingsync.Config{
		Protocol:   proto,
		BaseURL:    o.syncURL,
		ConnID:     o.connID,
		Store:      store,
		Extensions: []slidingsync.Extension{e2eeExt, toDevice, taskQueue{b}},
		Lists: map[string]slidingsync.ListConfig{"all": {
			GrowBatch:     500,
			ShrinkTo:      5,
			TimelineLimit: 5,
			RequiredState: crypto.BotRequiredState(false),
		}},
		AllowInsecureHTTP: o.insecure,
		PollTimeout:       o.pollTimeout,
		OnResponse:        b.onResponse,
		// The bot reads events from the responses only: keep the state model small.
		CompactState: true,
		TimelineCap:  5,
		// Nor does it read rooms from the Conn: keep the last 1000 touched in memory (about
		// 4.5 MB), not every room of the account.
		RoomCache: 1000,
	})
	if err != nil {
		return err
	}
	if hooks.onConn != nil {
		hooks.onConn(b.conn, b.mach)
	}
	log.Info().Stringer("user_id", b.cli.UserID).Stringer("device_id", b.cli.DeviceID).
		Str("identity_key", string(b.olm.OwnIdentity().IdentityKey)).Msg("Bot starting")

	// Run owns three goroutines: the connection, the Machine's network work and the replier.
	// Whichever stops first stops the others; runBot returns once all have stopped.
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	var wg sync.WaitGroup
	var connErr, machErr, replyErr error
	wg.Go(func() { connErr = b.conn.Run(ctx); cancel(connErr) })
	wg.Go(func() { machErr = b.mach.Run(ctx); cancel(machErr) })
	wg.Go(func() { replyErr = b.replier(ctx); cancel(replyErr) })
	wg.Wait()
	var errs []error
	for _, err := range []error{connErr, machErr, replyErr} {
		if err != nil && !errors.Is(err, context.Canceled) {
			errs = append(errs, err)
		}
	}
	if len(errs) == 0 {
		return context.Cause(ctx)
	}
	return errors.Join(errs...)
}

// session returns the client of the stored session, or logs in once and stores the new
// session, so that a restart never creates a new device (and a new identity).
func (b *bot) session(ctx context.Context, o options) (pickleKey []byte, err error) {
	if o.user == "" {
		return nil, errors.New("-user is required with -homeserver")
	}
	userID := id.UserID(o.user)
	var deviceID, token string
	var created int64
	err = b.db.QueryRow(ctx, `SELECT device_id, access_token, pickle_key, created_at FROM e2eebot_session WHERE user_id=$1`, userID).
		Scan(&deviceID, &token, &pickleKey, &created)
	stored := err == nil
	if err != nil && !errors.Is(err, sql.ErrNoRows) {
		return nil, fmt.Errorf("read the stored session: %w", err)
	}
	if b.cli, err = mautrix.NewClient(o.homeserver, userID, ""); err != nil {
		return nil, err
	}
	b.cli.Log = *zerolog.Ctx(ctx)
	if b.hooks.transport != nil {
		b.cli.Client = &http.Client{Transport: b.hooks.transport}
	}
	if stored {
		if o.deviceID != "" && id.DeviceID(o.deviceID) != id.DeviceID(deviceID) {
			return nil, fmt.Errorf("the database holds device %s of %s, not %s: use another -db", deviceID, userID, o.deviceID)
		}
		b.cli.AccessToken, b.cli.DeviceID = token, id.DeviceID(deviceID)
		b.created = time.UnixMilli(created)
		zerolog.Ctx(ctx).Info().Stringer("device_id", b.cli.DeviceID).Msg("Using the stored session")
		return b.pickleKey(pickleKey), nil
	}
	switch {
	case o.accessToken != "":
		if o.deviceID == "" {
			return nil, errors.New("-access-token needs -device-id")
		}
		b.cli.AccessToken, b.cli.DeviceID = o.accessToken, id.DeviceID(o.deviceID)
	case o.password != "":
		_, err := b.cli.Login(ctx, &mautrix.ReqLogin{
			Type:                     mautrix.AuthTypePassword,
			Identifier:               mautrix.UserIdentifier{Type: mautrix.IdentifierTypeUser, User: o.user},
			Password:                 o.password,
			InitialDeviceDisplayName: "e2eebot",
			StoreCredentials:         true,
		})
		if err != nil {
			return nil, fmt.Errorf("login: %w", err)
		}
	default:
		return nil, errors.New("-password or -access-token is required on the first start")
	}
	pickleKey = make([]byte, 32)
	_, _ = rand.Read(pickleKey)
	b.created = time.Now()
	_, err = b.db.Exec(ctx, `INSERT INTO e2eebot_session (user_id, device_id, access_token, pickle_key, created_at) VALUES ($1, $2, $3, $4, $5)`,
		b.cli.UserID, b.cli.DeviceID, b.cli.AccessToken, pickleKey, b.created.UnixMilli())
	if err != nil {
		return nil, fmt.Errorf("store the session: %w", err)
	}
	zerolog.Ctx(ctx).Info().Stringer("device_id", b.cli.DeviceID).Msg("Logged in; session stored")
	return b.pickleKey(pickleKey), nil
}

func (b *bot) pickleKey(stored []byte) []byte {
	if env := os.Getenv(pickleKeyEnv); env != "" {
		return []byte(env)
	}
	return stored
}

// onResponse stages the room state and the tasks of the response; the commit of the response
// writes them (taskQueue.CommitTxn).
func (b *bot) onResponse(ctx context.Context, res *slidingsync.Result) error {
	b.stagedRes = res
	b.staged = b.staged[:0]
	for roomID, room := range res.Response.Rooms {
		if room == nil {
			continue
		}
		if inv := room.InviteState; inv.HasValue() && len(inv.Val) > 0 {
			b.staged = append(b.staged, task{EventID: id.EventID("join:" + roomID.String()), Kind: "join", RoomID: roomID, Event: json.RawMessage("{}")})
		}
		timeline := room.Timeline
		if room.Limited && room.PrevBatch.HasValue() && len(timeline) > 0 && timeline[0] != nil &&
			!time.UnixMilli(timeline[0].Timestamp).Before(b.created) {
			// More happened than the timeline holds, since the bot exists: fetch what was left
			// out, so that no message goes unanswered (history older than the bot is not). A
			// failure fails the cycle, which is retried.
			older, err := b.backfill(ctx, roomID, room.PrevBatch.Val)
			if err != nil {
				return fmt.Errorf("fetch the events a limited timeline left out in %s: %w", roomID, err)
			}
			timeline = append(older, timeline...)
		}
		for _, evt := range timeline {
			if evt == nil || evt.Sender == b.cli.UserID || evt.StateKey != nil || evt.ID == "" {
				continue
			}
			if evt.Type != event.EventMessage && evt.Type != event.EventEncrypted {
				continue
			}
			if time.UnixMilli(evt.Timestamp).Before(b.created) {
				continue // history from before the bot existed
			}
			raw, err := json.Marshal(evt)
			if err != nil {
				return fmt.Errorf("encode event %s: %w", evt.ID, err)
			}
			b.staged = append(b.staged, task{EventID: evt.ID, Kind: "echo", RoomID: roomID, Event: raw})
		}
	}
	if b.hooks.onResponse != nil {
		b.hooks.onResponse(ctx, res)
	}
	return nil
}

// maxBackfillPages bounds how far back a limited timeline is filled (pages of 100 events).
const maxBackfillPages = 20

// backfill pages back from a limited timeline's prev_batch until an event the bot already
// queued, or one from before the bot existed, and returns the events in between, oldest first.
func (b *bot) backfill(ctx context.Context, roomID id.RoomID, from string) ([]*event.Event, error) {
	var newestFirst []*event.Event
	for page := 0; from != ""; page++ {
		if page == maxBackfillPages {
			zerolog.Ctx(ctx).Warn().Stringer("room_id", roomID).Int("events", len(newestFirst)).
				Msg("Stopped filling a timeline gap: older events are not answered")
			break
		}
		resp, err := b.cli.Messages(ctx, roomID, from, "", mautrix.DirectionBackward, nil, 100)
		if err != nil {
			return nil, err
		}
		for _, evt := range resp.Chunk {
			if evt == nil {
				continue
			}
			if time.UnixMilli(evt.Timestamp).Before(b.created) {
				return reversed(newestFirst), nil
			}
			var known bool
			err := b.db.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM e2eebot_task WHERE event_id=$1)`, evt.ID).Scan(&known)
			if err != nil {
				return nil, fmt.Errorf("look up %s: %w", evt.ID, err)
			}
			if known {
				return reversed(newestFirst), nil
			}
			newestFirst = append(newestFirst, evt)
		}
		from = resp.End
	}
	return reversed(newestFirst), nil
}

func reversed(evts []*event.Event) []*event.Event {
	slices.Reverse(evts)
	return evts
}

// taskQueue is a client-side extension (it sends nothing) that writes the staged tasks in the
// transaction of the commit and wakes the replier after it.
type taskQueue struct{ b *bot }

func (taskQueue) Name() string { return "e2eebot_tasks" }

func (taskQueue) Request(context.Context, slidingsync.RequestInfo) (any, error) { return nil, nil }

func (taskQueue) Process(context.Context, slidingsync.RequestInfo, json.RawMessage) error {
	return nil
}

// SkipTxn tells the Conn that a response without rooms (an idle long-poll) gives CommitTxn
// nothing to write.
func (q taskQueue) SkipTxn() bool {
	return len(q.b.staged) == 0 && (q.b.stagedRes == nil || len(q.b.stagedRes.Response.Rooms) == 0)
}

// CommitTxn writes the tasks; an event seen again (a timeline overlap after a restart) keeps
// its first row, except that a new invite to a room makes its join pending again.
func (q taskQueue) CommitTxn(ctx context.Context) error {
	// Room state goes to mautrix's state store in the same transaction: one fsync instead of
	// one per state event, and the state store never runs ahead of, or behind, pos.
	if res := q.b.stagedRes; res != nil {
		q.b.mach.HandleRooms(ctx, q.b.state, res)
	}
	for _, t := range q.b.staged {
		q.b.seq++
		_, err := q.b.db.Exec(ctx, `INSERT INTO e2eebot_task (event_id, kind, room_id, event, seq) VALUES ($1, $2, $3, $4, $5)
			ON CONFLICT (event_id) DO UPDATE SET done=false WHERE e2eebot_task.kind='join' AND e2eebot_task.done`, t.EventID, t.Kind, t.RoomID, string(t.Event), time.Now().UnixNano()+q.b.seq)
		if err != nil {
			return fmt.Errorf("queue %s: %w", t.EventID, err)
		}
	}
	return nil
}

// AfterCommit wakes the replier when the commit queued tasks: an idle response queues none,
// and the replier's own retries wait on its timer.
func (q taskQueue) AfterCommit(context.Context) {
	queued := len(q.b.staged) > 0
	q.b.staged, q.b.stagedRes = q.b.staged[:0], nil
	if !queued {
		return
	}
	select {
	case q.b.wake <- struct{}{}:
	default:
	}
}

// replier works through the task queue until ctx is done. A task is marked done only after
// its effect happened, so a crash repeats it: joins are idempotent, and a repeated reply uses
// the same transaction ID, which the homeserver deduplicates.
func (b *bot) replier(ctx context.Context) error {
	log := zerolog.Ctx(ctx)
	// Joining or answering before the device keys are on the server would let others
	// encrypt without this device.
	select {
	case <-ctx.Done():
		return context.Cause(ctx)
	case <-b.mach.KeysUploaded():
	}
	for {
		next, err := b.runTasks(ctx)
		if ctx.Err() != nil {
			return context.Cause(ctx)
		}
		if err != nil {
			log.Warn().Err(err).Msg("Task queue failed; retrying")
			next = time.Now().Add(5 * time.Second)
		}
		var wait <-chan time.Time
		var timer *time.Timer
		if !next.IsZero() {
			timer = time.NewTimer(time.Until(next))
			wait = timer.C
		}
		select {
		case <-ctx.Done():
		case <-b.wake:
		case <-wait:
		}
		if timer != nil {
			timer.Stop()
		}
	}
}

// runTasks does every pending task once. next is when a task that could not be done yet (no
// room key yet) should be tried again, zero if none waits.
func (b *bot) runTasks(ctx context.Context) (next time.Time, err error) {
	type row struct {
		eventID id.EventID
		kind    string
		roomID  id.RoomID
		raw     string
		tries   int
	}
	rows, err := b.db.Query(ctx, `SELECT event_id, kind, room_id, event, tries FROM e2eebot_task WHERE done=false ORDER BY seq`)
	pending, err := dbutil.NewRowIterWithError(rows, func(s dbutil.Scannable) (r row, err error) {
		err = s.Scan(&r.eventID, &r.kind, &r.roomID, &r.raw, &r.tries)
		return
	}, err).AsList()
	if err != nil {
		return time.Time{}, fmt.Errorf("read tasks: %w", err)
	}
	for _, r := range pending {
		log := zerolog.Ctx(ctx).With().Stringer("room_id", r.roomID).Stringer("event_id", r.eventID).Logger()
		var done bool
		switch r.kind {
		case "join":
			_, err = b.cli.JoinRoomByID(ctx, r.roomID)
			done = err == nil
			if err == nil {
				log.Info().Msg("Joined a room the bot was invited to")
			}
		case "echo":
			done, err = b.echo(log.WithContext(ctx), r.roomID, json.RawMessage(r.raw))
		default:
			done = true
		}
		if ctx.Err() != nil {
			return time.Time{}, ctx.Err()
		}
		tries := r.tries + 1
		if err != nil {
			log.Warn().Err(err).Int("tries", tries).Msg("Task failed")
		}
		if !done && tries >= maxTries {
			log.Error().Err(err).Msg("Giving up on a task")
			done = true
		}
		if _, err := b.db.Exec(ctx, `UPDATE e2eebot_task SET done=$2, tries=$3 WHERE event_id=$1`, r.eventID, done, tries); err != nil {
			return time.Time{}, fmt.Errorf("update task: %w", err)
		}
		if !done {
			at := time.Now().Add(min(time.Second<<min(tries, 8), 2*time.Minute))
			if next.IsZero() || at.Before(next) {
				next = at
			}
		}
	}
	return next, nil
}

// echo answers one message. It returns done=false with no error when the message cannot be
// decrypted yet (its room key has not arrived).
func (b *bot) echo(ctx context.Context, roomID id.RoomID, raw json.RawMessage) (done bool, err error) {
	var evt event.Event
	if err := json.Unmarshal(raw, &evt); err != nil {
		return true, fmt.Errorf("decode queued event: %w", err)
	}
	evt.RoomID = roomID
	encrypted := evt.Type == event.EventEncrypted
	if encrypted {
		evt.Type.Class = event.MessageEventType
		if err := evt.Content.ParseRaw(evt.Type); err != nil {
			return true, fmt.Errorf("parse encrypted event: %w", err)
		}
		dec, err := b.olm.DecryptMegolmEvent(ctx, &evt)
		if errors.Is(err, mcrypto.ErrNoSessionFound) {
			content := evt.Content.AsEncrypted()
			if b.olm.WaitForSession(ctx, roomID, content.SenderKey, content.SessionID, 10*time.Second) {
				dec, err = b.olm.DecryptMegolmEvent(ctx, &evt)
			}
		}
		if errors.Is(err, mcrypto.ErrNoSessionFound) {
			return false, nil
		}
		if err != nil {
			return true, fmt.Errorf("decrypt: %w", err)
		}
		evt = *dec
	} else if err := evt.Content.ParseRaw(evt.Type); err != nil {
		return true, fmt.Errorf("parse message: %w", err)
	}
	msg := evt.Content.AsMessage()
	if evt.Type != event.EventMessage || msg.MsgType != event.MsgText {
		return true, nil
	}
	reply := &event.MessageEventContent{MsgType: event.MsgText, Body: "echo: " + msg.Body}
	reply.RelatesTo = (&event.RelatesTo{}).SetReplyTo(evt.ID)
	// The transaction ID is derived from the event, so a reply repeated after a crash is
	// deduplicated by the homeserver.
	sum := sha256.Sum256([]byte(evt.ID))
	txnID := "echo-" + hex.EncodeToString(sum[:12])
	isEncrypted, err := b.state.IsEncrypted(ctx, roomID)
	if err != nil {
		return false, fmt.Errorf("read room encryption: %w", err)
	}
	var content any = reply
	evtType := event.EventMessage
	if isEncrypted || encrypted {
		enc, err := b.mach.EncryptRoomEvent(ctx, roomID, event.EventMessage, reply)
		if err != nil {
			return false, err
		}
		content, evtType = enc, event.EventEncrypted
	}
	if _, err := b.cli.SendMessageEvent(ctx, roomID, evtType, content, mautrix.ReqSendEvent{TransactionID: txnID}); err != nil {
		return false, fmt.Errorf("send reply: %w", err)
	}
	zerolog.Ctx(ctx).Info().Bool("encrypted", evtType == event.EventEncrypted).Msg("Replied")
	if b.hooks.onEcho != nil {
		b.hooks.onEcho(roomID, reply.Body, evtType == event.EventEncrypted)
	}
	return true, nil
}
