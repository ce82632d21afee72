package crypto

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"
	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix"
	mcrypto "maunium.net/go/mautrix/crypto"
	goolmaccount "maunium.net/go/mautrix/crypto/goolm/account"
	"maunium.net/go/mautrix/crypto/signatures"
	"maunium.net/go/mautrix/id"

	"github.com/sliding-e2ee/sdk/e2ee"
	"github.com/sliding-e2ee/sdk/slidingsync"
)

// What the zero values of Config mean.
const (
	defaultMinRetryDelay = time.Second
	defaultMaxRetryDelay = 5 * time.Minute
	defaultKeyCountCheck = time.Minute
)

// Config configures a Machine. The zero value is ready to use.
type Config struct {
	// MinRetryDelay is the delay before the background work is retried after its first
	// failure; it doubles after every further failure. Zero means 1 s.
	MinRetryDelay time.Duration
	// MaxRetryDelay caps the retry delay. Zero means 5 min.
	MaxRetryDelay time.Duration
	// DisableFallbackKeys turns fallback keys off. Fallback keys need the goolm Olm backend;
	// with another backend New fails with ErrFallbackNeedsGoolm unless this is set.
	DisableFallbackKeys bool
	// FallbackKeyRotation is the shortest time between two rotations of the fallback key,
	// which bounds the churn when the server keeps reporting that no unused fallback key is
	// left (stale reports after an upload, or a key used at once). Zero means
	// 1 h.
	FallbackKeyRotation time.Duration
	// FallbackKeyGrace is how long the previous fallback private key is kept after a
	// rotation, so that pre-key messages made with it while the new key propagates still
	// decrypt. Zero means 1 h.
	FallbackKeyGrace time.Duration
	// KeyCountCheck is how long Run trusts the last one-time key count while responses come
	// without one. Servers that send counts only when they change cannot tell an unchanged
	// count from one the homeserver stopped reporting (the MSC3575 proxy over Dendrite never
	// reports 0), so once responses without counts arrive and the last count is this old,
	// Run asks the server with an empty /keys/upload and tops up from its answer. Servers
	// that send counts in every response (Synapse) never cause a check. Zero means 1 min;
	// a negative value turns the check off.
	KeyCountCheck time.Duration
}

// Machine feeds what the sliding sync e2ee and to_device extensions deliver into mautrix's
// OlmMachine. It is the [e2ee.Consumer] of the e2ee extension; [Machine.HandleToDevice] is
// the [e2ee.Config.ToDevice] handler. Its network work (key queries, key uploads, unwedging)
// runs in [Machine.Run].
// See the package documentation for its guarantees.
type Machine struct {
	cli   *mautrix.Client
	olm   *mcrypto.OlmMachine
	store *mcrypto.SQLCryptoStore
	db    *dbutil.Database
	cfg   Config
	goolm *goolmaccount.Account // nil when fallback keys are disabled

	accountKey string // row key of this device in the Machine's tables

	// acctMu serialises every use of the Olm account (decryption, key uploads, fallback
	// keys): mautrix guards decryption and uploads with different locks, and here they run
	// on different goroutines.
	acctMu sync.Mutex

	kick    chan struct{}
	running atomic.Bool

	keysUp     chan struct{} // closed once the device keys are on the server
	keysUpOnce sync.Once

	keyMu   sync.Mutex
	keyNext chan struct{} // closed and replaced when a room key is committed

	mu         sync.Mutex
	otkSeen    bool                    // otkLast holds counts of a committed State
	otkLast    map[id.KeyAlgorithm]int // last counts committed
	otkPending bool                    // otkLast still has to be acted on
	otkSeq     uint64                  // bumped whenever otkLast changes
	countNews  time.Time               // when a response last carried counts, or Run last asked
	countQuiet bool                    // a response without counts was committed since countNews

	// marksStaged is set by HandleE2EE when it marked users outdated, and turned into
	// outdatedDirty once the commit is done: Run reads the outdated users only then (and on
	// its first pass), not after every commit.
	marksStaged   atomic.Bool
	outdatedDirty atomic.Bool

	membersFresh map[id.RoomID]struct{}     // rooms whose member list was fetched since the last limited timeline
	unwedge      map[id.SenderKey]id.UserID // guarded by mu: devices whose Olm session is wedged, for Run

	fb fallbackCache // guarded by mu
	// fallbackDirty is set when the fallback key row may have changed since Run last read it;
	// fallbackDue is when Run's fallback work is due again (zero: not timed). Only Run's
	// goroutine uses fallbackDue.
	fallbackDirty atomic.Bool
	fallbackDue   time.Time
}

var _ e2ee.Consumer = (*Machine)(nil)

// New returns a Machine for cli, the client the OlmMachine olm was built with. olm must be
// loaded (OlmMachine.Load) and use a *mcrypto.SQLCryptoStore: the Machine writes its own
// tables into a child database of that store's database, and device-list changes are recorded
// in the transaction of the sliding sync store's commit, so the sliding sync store (sqlstore)
// must live in the same database for them to commit together with pos. Call
// [Machine.Upgrade] before using the Machine.
func New(cli *mautrix.Client, olm *mcrypto.OlmMachine, cfg Config) (*Machine, error) {
	if cli == nil || olm == nil {
		return nil, errors.New("crypto: client and OlmMachine are required")
	}
	store, ok := olm.CryptoStore.(*mcrypto.SQLCryptoStore)
	if !ok {
		return nil, fmt.Errorf("crypto: the OlmMachine's crypto store is a %T, not a *crypto.SQLCryptoStore", olm.CryptoStore)
	}
	if olm.GetAccount() == nil {
		return nil, errors.New("crypto: the OlmMachine is not loaded (call Load first)")
	}
	if cfg.MinRetryDelay <= 0 {
		cfg.MinRetryDelay = defaultMinRetryDelay
	}
	if cfg.MaxRetryDelay <= 0 {
		cfg.MaxRetryDelay = defaultMaxRetryDelay
	}
	cfg.MaxRetryDelay = max(cfg.MaxRetryDelay, cfg.MinRetryDelay)
	if cfg.FallbackKeyRotation <= 0 {
		cfg.FallbackKeyRotation = defaultFallbackKeyRotation
	}
	if cfg.FallbackKeyGrace <= 0 {
		cfg.FallbackKeyGrace = defaultFallbackKeyGrace
	}
	if cfg.KeyCountCheck == 0 {
		cfg.KeyCountCheck = defaultKeyCountCheck
	}
	var gacc *goolmaccount.Account
	if !cfg.DisableFallbackKeys {
		if gacc = goolmAccount(olm.GetAccount().Internal); gacc == nil {
			return nil, ErrFallbackNeedsGoolm
		}
	}
	m := &Machine{
		cli:        cli,
		olm:        olm,
		store:      store,
		db:         store.DB.Child(versionTableName, upgradeTable, nil),
		cfg:        cfg,
		goolm:      gacc,
		accountKey: cli.UserID.String() + "|" + cli.DeviceID.String(),
		kick:       make(chan struct{}, 1),

		membersFresh: make(map[id.RoomID]struct{}),
		keysUp:       make(chan struct{}),
		keyNext:      make(chan struct{}),
		countNews:    time.Now(),
	}
	if olm.NeedsUnwedgeCallback == nil {
		olm.NeedsUnwedgeCallback = m.needsUnwedge
	}
	m.outdatedDirty.Store(true) // rows left by an earlier run are queried on the first pass
	m.fallbackDirty.Store(true)
	if olm.GetAccount().Shared {
		m.keysUpOnce.Do(func() { close(m.keysUp) })
	}
	return m, nil
}

// Upgrade creates or upgrades the Machine's own tables. The crypto store's tables must exist
// already (SQLCryptoStore.DB.Upgrade).
func (m *Machine) Upgrade(ctx context.Context) error {
	return m.db.Upgrade(ctx)
}

// OlmMachine returns the OlmMachine the Machine feeds.
func (m *Machine) OlmMachine() *mcrypto.OlmMachine { return m.olm }

// HandleE2EE implements e2ee.Consumer. It makes no network call. Its Step.Commit, when the
// delta has something to write, runs inside the sliding sync store's commit transaction
// (carried by ctx): Changed users that are tracked are marked outdated, on a gap every tracked
// user is, and Left users are untracked; whether a fallback key upload is pending is recorded
// when the response changed it. A user is tracked once mautrix has fetched their devices; an
// untracked user's devices are fetched again by the next OlmMachine.ShareGroupSession that
// needs them. Its Step.After notes the committed one-time key counts and wakes the goroutine
// of Run when the commit gave it something to do; it never blocks.
func (m *Machine) HandleE2EE(_ context.Context, st e2ee.State, d *e2ee.Delta) slidingsync.Step {
	var written *e2ee.Delta // d, once the Step's Commit wrote it
	step := slidingsync.Step{After: func(context.Context) {
		m.noteCounts(d.OTKCounts.Set)
		m.committed(st, written)
	}}
	if m.needsRecord(d) {
		step.Commit = func(ctx context.Context) error {
			if err := m.record(ctx, d); err != nil {
				return err
			}
			written = d
			return nil
		}
	}
	return step
}

// record writes what d says the Machine still has to do, in the caller's transaction.
func (m *Machine) record(ctx context.Context, d *e2ee.Delta) error {
	if d.Gap || len(d.Changed) > 0 {
		m.marksStaged.Store(true) // a rolled-back commit only makes Run look once for nothing
	}
	if d.Gap {
		if err := m.markAllOutdated(ctx); err != nil {
			return fmt.Errorf("crypto: mark every tracked user outdated: %w", err)
		}
	}
	if len(d.Changed) > 0 {
		if err := m.markOutdated(ctx, d.Changed); err != nil {
			return fmt.Errorf("crypto: mark changed users outdated: %w", err)
		}
	}
	if len(d.Left) > 0 {
		if err := m.untrack(ctx, d.Left); err != nil {
			return fmt.Errorf("crypto: untrack users: %w", err)
		}
	}
	if d.FallbackKeyTypes.Set {
		if err := m.handleFallbackTypes(ctx, d); err != nil {
			return fmt.Errorf("crypto: record fallback key state: %w", err)
		}
	}
	return nil
}

// needsRecord reports whether record has something to write for d: not when d only repeats
// fallback key types whose state is known to be stored (Synapse sends them in every response).
func (m *Machine) needsRecord(d *e2ee.Delta) bool {
	if d.Gap || len(d.Changed) > 0 || len(d.Left) > 0 {
		return true
	}
	if !d.FallbackKeyTypes.Set || m.goolm == nil {
		return false
	}
	pending := d.FallbackKeyUsed(id.KeyAlgorithmSignedCurve25519)
	m.mu.Lock()
	defer m.mu.Unlock()
	return !m.fb.known || m.fb.pending != pending
}

// committed is told that a commit with the state st is durable, and the delta it wrote (nil
// when it wrote none).
func (m *Machine) committed(st e2ee.State, d *e2ee.Delta) {
	m.mu.Lock()
	// An idle response (same counts, same fallback key types, no device-list changes) wakes
	// nothing: Run would find nothing to do.
	work := m.fallbackCommittedLocked(d)
	if st.OTKCountsKnown && (!m.otkSeen || !maps.Equal(st.OTKCounts, m.otkLast)) {
		m.otkSeen, m.otkLast, m.otkPending = true, maps.Clone(st.OTKCounts), true
		m.otkSeq++
		work = true
	}
	m.mu.Unlock()
	if m.marksStaged.Swap(false) {
		m.outdatedDirty.Store(true)
		work = true
	}
	if work {
		m.wake()
	}
}

// noteCounts is told whether a committed response carried one-time key counts. The first
// response without counts after some with them wakes Run, which then times the count check.
func (m *Machine) noteCounts(carried bool) {
	if m.cfg.KeyCountCheck < 0 {
		return
	}
	m.mu.Lock()
	wake := false
	if carried {
		m.countNews, m.countQuiet = time.Now(), false
	} else if !m.countQuiet {
		m.countQuiet, wake = true, true
	}
	m.mu.Unlock()
	if wake {
		m.wake()
	}
}

// countCheckAt returns when Run should ask the server for the one-time key count; zero when
// no check is pending.
func (m *Machine) countCheckAt() time.Time {
	m.mu.Lock()
	defer m.mu.Unlock()
	if !m.countQuiet {
		return time.Time{}
	}
	return m.countNews.Add(m.cfg.KeyCountCheck)
}

// lookForWork wakes the goroutine of Run so that it looks for work (outdated device lists, keys to
// upload). It never blocks.
func (m *Machine) lookForWork() {
	m.outdatedDirty.Store(true)
	m.fallbackDirty.Store(true)
	m.wake()
}

func (m *Machine) wake() {
	select {
	case m.kick <- struct{}{}:
	default:
	}
}

// Run does the Machine's network work until ctx is done: it uploads the device keys on the
// first run of a new device, tops up one-time keys when the committed counts are low, opens a
// new Olm session with a device whose session is wedged, and fetches the device lists of
// outdated users, retrying failures with exponential backoff. It returns context.Cause(ctx)
// once its work has stopped, or slidingsync.ErrAlreadyRunning.
func (m *Machine) Run(ctx context.Context) error {
	if !m.running.CompareAndSwap(false, true) {
		return slidingsync.ErrAlreadyRunning
	}
	defer m.running.Store(false)
	log := zerolog.Ctx(ctx)
	var delay time.Duration
	for {
		again, next, err := m.work(ctx)
		if ctx.Err() != nil {
			return context.Cause(ctx)
		}
		switch {
		case err != nil:
			delay = min(max(delay*2, m.cfg.MinRetryDelay), m.cfg.MaxRetryDelay)
			log.Warn().Err(err).Dur("retry_in", delay).Msg("Crypto background work failed")
			t := time.NewTimer(delay)
			select {
			case <-ctx.Done():
				t.Stop()
				return context.Cause(ctx)
			case <-t.C:
			}
			continue
		case again:
			delay = 0
			continue
		}
		delay = 0
		var wake <-chan time.Time
		var timer *time.Timer
		if !next.IsZero() {
			timer = time.NewTimer(time.Until(next))
			wake = timer.C
		}
		select {
		case <-ctx.Done():
		case <-m.kick:
		case <-wake:
		}
		if timer != nil {
			timer.Stop()
		}
		if ctx.Err() != nil {
			return context.Cause(ctx)
		}
	}
}

// work does one round of background work. again is true when more work arrived meanwhile;
// next is when timed work (fallback key rotation and grace) is due, zero when none is.
func (m *Machine) work(ctx context.Context) (again bool, next time.Time, err error) {
	if err := m.shareKeys(ctx); err != nil {
		return false, time.Time{}, fmt.Errorf("upload keys: %w", err)
	}
	m.unwedgeDevices(ctx)
	// The fallback key row is read only when it may have changed or timed work is due, not
	// after every commit.
	if m.fallbackDirty.Swap(false) || (!m.fallbackDue.IsZero() && !time.Now().Before(m.fallbackDue)) {
		due, err := m.fallbackWork(ctx)
		if err != nil {
			m.fallbackDirty.Store(true)
			return false, time.Time{}, fmt.Errorf("fallback key: %w", err)
		}
		m.fallbackDue = due
	}
	next = m.fallbackDue
	if checkAt := m.countCheckAt(); !checkAt.IsZero() && (next.IsZero() || checkAt.Before(next)) {
		next = checkAt
	}
	if m.outdatedDirty.Swap(false) {
		again, err = m.refreshOutdated(ctx)
		if err != nil || again {
			m.outdatedDirty.Store(true)
		}
		if err != nil {
			return false, time.Time{}, fmt.Errorf("refresh device lists: %w", err)
		}
	}
	return again, next, nil
}

// shareKeys uploads the device keys if they were never uploaded, and one-time keys when the
// last committed count of signed_curve25519 keys is below half of what the account keeps.
// Counts that no response carried are never taken for 0, except on the first upload of a new
// device, which uploads whatever the server reports (nothing reported: assume none). When the
// count check is due (see Config.KeyCountCheck), it asks the server for its count first.
func (m *Machine) shareKeys(ctx context.Context) error {
	checkAt := m.countCheckAt()
	check := !checkAt.IsZero() && !time.Now().Before(checkAt)
	m.mu.Lock()
	seen, pending, seq := m.otkSeen, m.otkPending, m.otkSeq
	// A negative count from a broken server must not make ShareKeys generate more keys than
	// the account keeps.
	count := max(m.otkLast[id.KeyAlgorithmSignedCurve25519], 0)
	m.mu.Unlock()

	m.acctMu.Lock()
	defer m.acctMu.Unlock()
	acc := m.olm.GetAccount()
	unpublished, err := acc.Internal.OneTimeKeys()
	if err != nil {
		return fmt.Errorf("read unpublished one-time keys: %w", err)
	}
	half := int(acc.Internal.MaxNumberOfOneTimeKeys() / 2)
	if len(unpublished) > 0 {
		// An earlier upload failed, perhaps after the server stored it (a timeout). Send
		// exactly those keys again before anything new is generated, so the server never
		// holds keys the account does not have, nor a key ID with two different keys.
		if !acc.Shared {
			count = half // ShareKeys then generates nothing and sends the saved keys
		} else {
			if count, err = m.retryUnpublished(ctx, unpublished); err != nil {
				return err
			}
			seen, pending = true, true
		}
	}
	switch {
	case !acc.Shared:
		if !seen {
			count = 0
		}
		if m.goolm != nil {
			// First setup: upload a fallback key too, whatever the server reports.
			err := m.writeFallback(func() error { return m.setFallbackPending(ctx, true) })
			if err != nil {
				return fmt.Errorf("record pending fallback key: %w", err)
			}
			m.fallbackDirty.Store(true)
		}
		zerolog.Ctx(ctx).Debug().Int("server_count", count).Bool("count_known", seen).
			Msg("Uploading the device keys of a new device")
	case pending && count < half:
		zerolog.Ctx(ctx).Debug().Int("server_count", count).Msg("Topping up one-time keys")
	case check:
		// ShareKeys asks the server for a negative count and tops up from its answer.
		zerolog.Ctx(ctx).Debug().Int("last_count", count).Msg("Asking the server for the one-time key count that responses left out")
		count = -1
	default:
		m.donePending(seq)
		return nil
	}
	if err := m.olm.ShareKeys(ctx, count); err != nil {
		return err
	}
	m.keysUpOnce.Do(func() { close(m.keysUp) })
	m.donePending(seq)
	if check {
		m.mu.Lock()
		m.countNews, m.countQuiet = time.Now(), false
		m.mu.Unlock()
	}
	return nil
}

// KeysUploaded returns a channel that is closed once the device's identity keys are on the
// server (at once for a device set up earlier). Until then no one can encrypt for the device:
// a bot should not join rooms or answer before it, or the first messages sent to it are
// encrypted for its other devices only.
func (m *Machine) KeysUploaded() <-chan struct{} {
	return m.keysUp
}

// retryUnpublished uploads the account's unpublished one-time keys, signed as ShareKeys signs
// them (Ed25519 signatures are deterministic, so the bytes are those of the failed attempt),
// marks them published and returns the server's count after the upload.
func (m *Machine) retryUnpublished(ctx context.Context, keys map[string]id.Curve25519) (int, error) {
	acc := m.olm.GetAccount()
	req := &mautrix.ReqUploadKeys{OneTimeKeys: make(map[id.KeyID]mautrix.OneTimeKey, len(keys))}
	for keyID, key := range keys {
		otk := mautrix.OneTimeKey{Key: key, IsSigned: true}
		sig, err := acc.SignJSON(&otk)
		if err != nil {
			return 0, fmt.Errorf("sign one-time key: %w", err)
		}
		otk.Signatures = signatures.NewSingleSignature(m.cli.UserID, id.KeyAlgorithmEd25519, m.cli.DeviceID.String(), sig)
		req.OneTimeKeys[id.NewKeyID(id.KeyAlgorithmSignedCurve25519, keyID)] = otk
	}
	zerolog.Ctx(ctx).Debug().Int("count", len(keys)).Msg("Uploading the one-time keys of a failed upload again")
	resp, err := m.cli.UploadKeys(ctx, req)
	if err != nil {
		return 0, err
	}
	acc.Internal.MarkKeysAsPublished()
	if err := m.store.PutAccount(ctx, acc); err != nil {
		return 0, fmt.Errorf("save account: %w", err)
	}
	return max(resp.OneTimeKeyCounts.SignedCurve25519, 0), nil
}

// donePending clears the pending one-time key counts if they are still those of seq.
func (m *Machine) donePending(seq uint64) {
	m.mu.Lock()
	if m.otkSeq == seq {
		m.otkPending = false
	}
	m.mu.Unlock()
}

// needsUnwedge is the OlmMachine's NeedsUnwedgeCallback: mautrix found the Olm session with a
// device wedged (a message on it does not decrypt). Left to mautrix, a new session and an
// m.dummy on it would be made on a goroutine of its own, without the account lock, so that
// HandleToDevice could restore the new session's state over the m.dummy's ratchet step. Run
// does it instead.
func (m *Machine) needsUnwedge(_ context.Context, sender id.UserID, senderKey id.SenderKey) {
	m.mu.Lock()
	if m.unwedge == nil {
		m.unwedge = make(map[id.SenderKey]id.UserID)
	}
	m.unwedge[senderKey] = sender
	m.mu.Unlock()
	m.wake()
}

// unwedgeDevices opens a new Olm session with each device found wedged, under the account
// lock. mautrix logs a failure and does not try that device again for an hour.
func (m *Machine) unwedgeDevices(ctx context.Context) {
	m.mu.Lock()
	due := m.unwedge
	m.unwedge = nil
	m.mu.Unlock()
	for key, sender := range due {
		m.acctMu.Lock()
		m.olm.UnwedgeDevice(ctx, sender, key)
		m.acctMu.Unlock()
	}
}
