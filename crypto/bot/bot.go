package bot

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"sync"
	"sync/atomic"
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

// defaultKeyWait is what a zero Config.KeyWait means.
const defaultKeyWait = time.Hour

// defaultKeyRequestDelay is what a zero Config.KeyRequestDelay means: mautrix's cryptohelper
// on /sync asks after the same wait.
const defaultKeyRequestDelay = 3 * time.Second

// ErrNotRunning is returned by what needs the stores that Run opens (encryption, decryption,
// sends under an idempotency key) when Run is not running.
var ErrNotRunning = errors.New("bot: Helper is not running")

// Config configures a Helper. Only DB is required; every other zero value is usable.
type Config struct {
	// DB is where everything is kept: a SQLite file path or a postgres:// URI (opened by Run
	// with dbopen and closed when it returns), or a *dbutil.Database the caller opened and
	// closes. Required.
	DB any
	// PickleKey encrypts the Olm account and sessions in the database. Empty means a random
	// key made on the first start and kept in the database, which protects nothing from a
	// reader of the database. Set it on the first start or never: a key that changes makes
	// the stored account unreadable.
	PickleKey []byte
	// LoginAs logs in once when the database holds no session for the user and the client
	// has no access token; the session is stored and reused from then on, so a restart
	// never creates a new device. Its identifier must be a full user ID (@bot:example.org).
	// Nil means the client must carry an access token (and the device ID, or Run asks the
	// server with whoami) on the first start.
	LoginAs *mautrix.ReqLogin
	// Syncer receives the decrypted events (DefaultSyncer.Dispatch), so handlers registered
	// on it work unchanged. Nil means the client's Syncer when it is a *mautrix.DefaultSyncer,
	// else a new one, which OnEvent and OnEventType register on.
	Syncer *mautrix.DefaultSyncer
	// AutoJoin joins the rooms the bot is invited to, once its device keys are on the server
	// (so the first message sent to it is encrypted for it too). False: invites are only
	// dispatched.
	AutoJoin bool
	// KeyWait is how long an encrypted event waits for its room key before it is given up
	// (and passed to OnDecryptionError), counted while Run runs: after a restart an event
	// waits again from the start of the Run. Zero means 1 h.
	KeyWait time.Duration
	// KeyRequestDelay is how long an encrypted event waits for its room key before the bot
	// asks the device that sent the event for it (m.room_key_request), once per room key and
	// Run. A sender that shared the key with the bot answers with it, which recovers a room
	// key whose to-device message was lost. The bot's own other devices are not asked: an
	// unverified one would answer m.room_key.withheld, which gives the event up. Zero means
	// 3 s; negative means never.
	KeyRequestDelay time.Duration
	// OnDecryptionError is called, from the dispatching goroutine, with an event that could
	// not be decrypted and was given up. Nil means such events are only logged.
	OnDecryptionError func(ctx context.Context, evt *event.Event, err error)
	// OnResponse is called with every processed sliding sync response after the Helper has
	// staged its events, before the commit; an error fails the cycle, which retries the same
	// response later. Its Step is committed with the Helper's (see slidingsync.Config). Nil
	// means none.
	OnResponse func(ctx context.Context, res *slidingsync.Result) (slidingsync.Step, error)

	// Protocol is the sliding sync dialect; empty means discovery when Run starts.
	Protocol slidingsync.Protocol
	// BaseURL is where sliding sync is served when it is not the homeserver (an MSC3575
	// proxy); empty means the homeserver, or what discovery finds.
	BaseURL string
	// ConnID is the sliding sync conn_id; empty means the default connection.
	ConnID string
	// PollTimeout is the long-poll asked of the server; zero means 30 s.
	PollTimeout time.Duration
	// AllowInsecureHTTP allows plain http:// to a host that is not a loopback address. False:
	// such a homeserver is refused before any request (the login included), and the client's
	// transport refuses every such request.
	AllowInsecureHTTP bool
	// Lease configures the lease that keeps a second process of the same device in standby.
	// The zero value is usable: with no Holder, a process restarted on the same host after a
	// crash takes the lease over at once.
	Lease LeaseConfig
	// Crypto configures the crypto Machine (fallback key rotation, retry delays). The zero
	// value is usable.
	Crypto CryptoConfig
}

// LeaseConfig is sqlstore.LeaseConfig, named here so that a bot configures the Helper
// without importing the store package.
type LeaseConfig = sqlstore.LeaseConfig

// CryptoConfig is the Config of this module's crypto package, named here so that a bot's
// imports need no package called crypto (mautrix's and Go's have the same name).
type CryptoConfig = crypto.Config

// Helper runs an end-to-end encrypted bot on sliding sync: see the package documentation.
// It implements mautrix.CryptoHelper, so setting the client's Crypto to it makes the client's
// sends encrypt in encrypted rooms. Its methods are safe for concurrent use.
type Helper struct {
	cli    *mautrix.Client
	cfg    Config
	syncer *mautrix.DefaultSyncer

	running atomic.Bool

	mu      sync.Mutex // guards the fields below, set while Run runs
	db      *dbutil.Database
	mach    *crypto.Machine
	olm     *mcrypto.OlmMachine
	conn    *slidingsync.Conn
	account string

	ready     chan struct{}
	readyOnce sync.Once

	sendLocks [64]sync.Mutex // by transaction ID: one attempt at a time per send
}

var _ mautrix.CryptoHelper = (*Helper)(nil)

// New returns a Helper for cli, which must have its homeserver set, and a user ID unless
// Config.LoginAs names it. New does no I/O: Run opens the database, logs in when needed and
// syncs. New wraps the client's HTTP transport (a copy of cli.Client) so that plain HTTP to a
// remote host is refused unless Config.AllowInsecureHTTP, and so that the sends of event
// handlers are exactly once (see the package documentation).
func New(cli *mautrix.Client, cfg Config) (*Helper, error) {
	if cli == nil || cli.HomeserverURL == nil {
		return nil, errors.New("bot: a client with a homeserver URL is required")
	}
	switch cfg.DB.(type) {
	case string, *dbutil.Database:
	case nil:
		return nil, errors.New("bot: Config.DB is required (a path, a postgres:// URI or a *dbutil.Database)")
	default:
		return nil, fmt.Errorf("bot: Config.DB is a %T, not a string or a *dbutil.Database", cfg.DB)
	}
	if cfg.KeyWait <= 0 {
		cfg.KeyWait = defaultKeyWait
	}
	if cfg.KeyRequestDelay == 0 {
		cfg.KeyRequestDelay = defaultKeyRequestDelay
	}
	h := &Helper{cli: cli, cfg: cfg, syncer: cfg.Syncer, ready: make(chan struct{})}
	if h.syncer == nil {
		if s, ok := cli.Syncer.(*mautrix.DefaultSyncer); ok {
			h.syncer = s
		} else {
			h.syncer = mautrix.NewDefaultSyncer()
		}
	}
	hc := http.Client{Timeout: 180 * time.Second}
	if cli.Client != nil {
		hc = *cli.Client
	}
	hc.Transport = &sendTransport{h: h, next: hc.Transport}
	cli.Client = &hc
	return h, nil
}

// OnEventType registers a handler for decrypted events of one type, as DefaultSyncer's
// OnEventType does (it registers on the Helper's syncer). Message events are of class
// event.MessageEventType, state events of event.StateEventType.
func (h *Helper) OnEventType(eventType event.Type, fn mautrix.EventHandler) {
	h.syncer.OnEventType(eventType, fn)
}

// OnEvent registers a handler for every dispatched event.
func (h *Helper) OnEvent(fn mautrix.EventHandler) { h.syncer.OnEvent(fn) }

// Conn returns the sliding sync connection of the current or last Run, nil before Run built
// it.
func (h *Helper) Conn() *slidingsync.Conn {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.conn
}

// Machine returns the crypto Machine of the current or last Run, nil before Run built it.
func (h *Helper) Machine() *crypto.Machine {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.mach
}

// Ready returns a channel that is closed once the first Run has its device keys on the
// server and dispatches events.
func (h *Helper) Ready() <-chan struct{} { return h.ready }

// Run runs the bot until ctx is done or something fails for good: it opens and upgrades
// every store, restores or creates the session, takes the device's lease (waiting in standby
// while another process holds it), then runs the sliding sync connection, the crypto
// Machine's key work and the dispatching of events. It returns only once everything it
// started has stopped: context.Cause(ctx) when ctx ended it, else the error that stopped it.
func (h *Helper) Run(ctx context.Context) error {
	if !h.running.CompareAndSwap(false, true) {
		return slidingsync.ErrAlreadyRunning
	}
	defer h.running.Store(false)
	if !h.cfg.AllowInsecureHTTP {
		if err := slidingsync.CheckTransport(h.cli.HomeserverURL); err != nil {
			return fmt.Errorf("bot: homeserver: %w", err)
		}
		if h.cfg.BaseURL != "" {
			u, err := url.Parse(h.cfg.BaseURL)
			if err != nil {
				return fmt.Errorf("bot: sliding sync URL: %w", err)
			}
			if err := slidingsync.CheckTransport(u); err != nil {
				return fmt.Errorf("bot: sliding sync URL: %w", err)
			}
		}
	}
	db, botDB, closeDB, err := h.openDB(ctx)
	if err != nil {
		return err
	}
	defer closeDB()
	sess, err := h.session(ctx, botDB)
	if err != nil {
		return err
	}
	store := sqlstore.New(db, nil)
	if err := store.Upgrade(ctx); err != nil {
		return fmt.Errorf("bot: upgrade the sliding sync store: %w", err)
	}
	// The account is loaded only once the lease is held, so it is never older than what the
	// previous holder saved.
	err = store.RunWithLease(ctx, h.cli.UserID, h.cli.DeviceID, h.cfg.Lease, func(ctx context.Context, l *sqlstore.Lease) error {
		return h.run(ctx, db, botDB, l.Guard(store), sess)
	})
	if ctx.Err() != nil {
		// Asked to stop: what failed while stopping (a commit fenced by the released lease, a
		// cancelled query) is part of stopping.
		return context.Cause(ctx)
	}
	return err
}

// openDB opens Config.DB (unless it is a *dbutil.Database already) and upgrades the bot's
// tables. closeDB closes what openDB opened.
func (h *Helper) openDB(ctx context.Context) (db, botDB *dbutil.Database, closeDB func(), err error) {
	db, _ = h.cfg.DB.(*dbutil.Database)
	closeDB = func() {}
	if path, ok := h.cfg.DB.(string); ok {
		if db, err = dbopen.Open(path, dbopen.Config{}); err != nil {
			return nil, nil, nil, fmt.Errorf("bot: %w", err)
		}
		closeDB = func() { _ = db.Close() }
	}
	botDB = db.Child(versionTableName, upgradeTable, nil)
	if err := botDB.Upgrade(ctx); err != nil {
		closeDB()
		return nil, nil, nil, fmt.Errorf("bot: upgrade the bot's tables: %w", err)
	}
	return db, botDB, closeDB, nil
}

// run builds the stores, the Machine and the connection, and runs them while the lease is
// held.
func (h *Helper) run(ctx context.Context, db, botDB *dbutil.Database, store slidingsync.Store, sess session) error {
	log := zerolog.Ctx(ctx)
	olm, mach, err := h.cryptoStores(ctx, db, sess)
	if err != nil {
		return err
	}
	exts, release, err := e2ee.New(h.cli.UserID, h.cli.DeviceID, e2ee.Config{Consumer: mach, ToDevice: mach.HandleToDevice})
	if err != nil {
		return err
	}
	defer release()
	in := &inbox{h: h, db: botDB, mach: mach, account: accountKey(h.cli), created: sess.created,
		wake: make(chan struct{}, 1), responded: make(chan struct{}), requested: map[id.SessionID]bool{}}
	if err := in.start(ctx); err != nil {
		return err
	}
	conn, err := h.newConn(store, in, exts)
	if err != nil {
		return err
	}
	h.mu.Lock()
	h.db, h.mach, h.olm, h.conn, h.account = botDB, mach, olm, conn, in.account
	h.mu.Unlock()
	defer func() {
		h.mu.Lock()
		h.db, h.olm = nil, nil
		h.mu.Unlock()
	}()
	log.Info().Stringer("user_id", h.cli.UserID).Stringer("device_id", h.cli.DeviceID).
		Str("identity_key", string(olm.OwnIdentity().IdentityKey)).Msg("Bot starting")
	return runAll(ctx, conn, mach, in, !olm.GetAccount().Shared)
}

// cryptoStores upgrades mautrix's state and crypto stores and loads the Olm account and the
// crypto Machine.
func (h *Helper) cryptoStores(ctx context.Context, db *dbutil.Database, sess session) (*mcrypto.OlmMachine, *crypto.Machine, error) {
	log := zerolog.Ctx(ctx)
	sql := sqlstatestore.NewSQLStateStore(db, dbutil.ZeroLogger(log.With().Str("db", "state").Logger()), false)
	if err := sql.Upgrade(ctx); err != nil {
		return nil, nil, fmt.Errorf("bot: upgrade the state store: %w", err)
	}
	state := &stateStore{SQLStateStore: sql, cli: h.cli, plain: map[id.RoomID]bool{}}
	h.cli.StateStore = state
	cs := mcrypto.NewSQLCryptoStore(db, dbutil.ZeroLogger(log.With().Str("db", "crypto").Logger()), h.cli.UserID.String(), h.cli.DeviceID, sess.pickleKey)
	if err := cs.DB.Upgrade(ctx); err != nil {
		return nil, nil, fmt.Errorf("bot: upgrade the crypto store: %w", err)
	}
	olmLog := log.With().Str("component", "olm").Logger()
	olm := mcrypto.NewOlmMachine(h.cli, &olmLog, cs, state)
	if err := olm.Load(ctx); err != nil {
		return nil, nil, fmt.Errorf("bot: load the Olm account: %w", err)
	}
	mach, err := crypto.New(h.cli, olm, h.cfg.Crypto)
	if err != nil {
		return nil, nil, err
	}
	if err := mach.Upgrade(ctx); err != nil {
		return nil, nil, err
	}
	return olm, mach, nil
}

// newConn returns the bot's sliding sync connection: every room, scanned 500 at a time, then
// the 5 most recently active (a room with news moves into the window).
func (h *Helper) newConn(store slidingsync.Store, in *inbox, exts []slidingsync.Extension) (*slidingsync.Conn, error) {
	return slidingsync.New(h.cli, slidingsync.Config{
		Protocol:   h.cfg.Protocol,
		BaseURL:    h.cfg.BaseURL,
		ConnID:     h.cfg.ConnID,
		Store:      store,
		Extensions: exts,
		Lists: map[string]slidingsync.List{"all": {
			Window: slidingsync.Scan(500, 5),
			ListConfig: slidingsync.ListConfig{
				TimelineLimit: 5, // limited timelines are filled from /messages
				RequiredState: crypto.RequiredState(false),
			},
		}},
		AllowInsecureHTTP: h.cfg.AllowInsecureHTTP,
		PollTimeout:       h.cfg.PollTimeout,
		OnResponse:        in.onResponse,
		CompactState:      true, // the bot reads events from the responses, not the room model
		TimelineCap:       5,
		RoomCache:         1000,
	})
}

// runAll runs three goroutines: the connection, the Machine's network work and the
// dispatcher. Whichever stops first stops the others; runAll returns once all have stopped.
// The Machine of a new device starts when the first response arrives, so a connection that
// fails at once (a wrong URL, no sliding sync) leaves no first key upload half done; a known
// device starts it at once, so its device-list queries are done by the time the first
// response asks for a key top-up.
func runAll(ctx context.Context, conn *slidingsync.Conn, mach *crypto.Machine, in *inbox, newDevice bool) error {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	var wg sync.WaitGroup
	var connErr, machErr, dispErr error
	wg.Go(func() { connErr = conn.Run(ctx); cancel(connErr) })
	wg.Go(func() {
		if newDevice {
			select {
			case <-ctx.Done():
				return
			case <-in.responded:
			}
		}
		machErr = mach.Run(ctx)
		cancel(machErr)
	})
	wg.Go(func() { dispErr = in.dispatchLoop(ctx); cancel(dispErr) })
	wg.Wait()
	var errs []error
	for _, err := range []error{connErr, machErr, dispErr} {
		if err != nil && !errors.Is(err, context.Canceled) {
			errs = append(errs, err)
		}
	}
	if len(errs) == 0 {
		return context.Cause(ctx)
	}
	return errors.Join(errs...)
}

// accountKey names the account in the bot's tables.
func accountKey(cli *mautrix.Client) string {
	return cli.UserID.String() + "|" + cli.DeviceID.String()
}

func (h *Helper) machines() (*mcrypto.OlmMachine, *crypto.Machine, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.olm == nil {
		return nil, nil, ErrNotRunning
	}
	return h.olm, h.mach, nil
}

// Init implements mautrix.CryptoHelper. It does nothing: Run sets everything up.
func (h *Helper) Init(context.Context) error { return nil }

// Encrypt implements mautrix.CryptoHelper with crypto.Machine.EncryptRoomEvent: the room's
// members and their outdated device lists are fetched before the room key is shared. The
// client calls it for sends to encrypted rooms while Run runs.
func (h *Helper) Encrypt(ctx context.Context, roomID id.RoomID, evtType event.Type, content any) (*event.EncryptedEventContent, error) {
	_, mach, err := h.machines()
	if err != nil {
		return nil, err
	}
	return mach.EncryptRoomEvent(ctx, roomID, evtType, content)
}

// Decrypt implements mautrix.CryptoHelper: it decrypts a megolm event with the stored room
// keys, returning mcrypto.ErrNoSessionFound when its key has not arrived.
func (h *Helper) Decrypt(ctx context.Context, evt *event.Event) (*event.Event, error) {
	olm, _, err := h.machines()
	if err != nil {
		return nil, err
	}
	if evt.Content.Parsed == nil {
		evt.Type.Class = event.MessageEventType
		if err := evt.Content.ParseRaw(event.EventEncrypted); err != nil {
			return nil, fmt.Errorf("bot: parse encrypted event: %w", err)
		}
	}
	return olm.DecryptMegolmEvent(ctx, evt)
}

// WaitForSession implements mautrix.CryptoHelper with crypto.Machine.WaitForRoomKey: it is
// woken only once a room key is committed, so a true answer means Decrypt finds the key.
func (h *Helper) WaitForSession(ctx context.Context, roomID id.RoomID, _ id.SenderKey, sessionID id.SessionID, timeout time.Duration) bool {
	_, mach, err := h.machines()
	if err != nil {
		return false
	}
	return mach.WaitForRoomKey(ctx, roomID, sessionID, timeout)
}

// RequestSession implements mautrix.CryptoHelper: it asks the sender's device and the bot's
// other devices for a room key, as mautrix's cryptohelper does. Failures are logged.
func (h *Helper) RequestSession(ctx context.Context, roomID id.RoomID, senderKey id.SenderKey, sessionID id.SessionID, userID id.UserID, deviceID id.DeviceID) {
	olm, _, err := h.machines()
	if err == nil {
		err = olm.SendRoomKeyRequest(ctx, roomID, senderKey, sessionID, "", map[id.UserID][]id.DeviceID{
			userID:       {deviceID},
			h.cli.UserID: {"*"},
		})
	}
	if err != nil {
		zerolog.Ctx(ctx).Warn().Err(err).Stringer("room_id", roomID).Stringer("session_id", sessionID).
			Msg("Failed to request a room key")
	}
}
