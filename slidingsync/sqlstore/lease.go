package sqlstore

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/rs/zerolog"
	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix/id"

	"github.com/sliding-e2ee/sdk/slidingsync"
)

// ErrLeaseLost is returned (and is the cause of the context RunWithLease passes) when a lease
// is no longer held: another process took it after it expired, or it could not be renewed in
// time.
var ErrLeaseLost = errors.New("sqlstore: lease lost")

// defaultLeaseDuration is LeaseConfig.Duration when it is zero.
const defaultLeaseDuration = 30 * time.Second

// defaultLeaseName is LeaseConfig.Name when it is empty: the lease for the connection that
// carries a device's e2ee and to_device extensions.
const defaultLeaseName = "e2ee"

// LeaseConfig configures a lease. The zero value is usable.
type LeaseConfig struct {
	// Name tells apart several leases of one device. Empty means "e2ee": the lease for the
	// connection that carries the device's e2ee and to_device extensions.
	Name string
	// Holder identifies this process in the lease row. Empty means hostname, pid, a random
	// suffix and the PID namespace: a process on the same host (and PID namespace) then takes
	// the lease at once when its holder no longer runs (it crashed), without waiting for it to
	// expire. A process that restarts with the same holder also takes its lease back at once;
	// only give one when a supervisor guarantees a single process at a time.
	Holder string
	// Duration is how long the lease lasts without renewal: after the holder dies, a standby
	// process takes over within Duration plus PollInterval. Zero means 30 s.
	Duration time.Duration
	// RenewInterval is how often the holder renews. Zero means Duration/3; it is cut to
	// Duration/2.
	RenewInterval time.Duration
	// PollInterval is how often a standby process tries to take the lease. Zero means
	// Duration/10.
	PollInterval time.Duration
}

func (cfg LeaseConfig) withDefaults() LeaseConfig {
	if cfg.Name == "" {
		cfg.Name = defaultLeaseName
	}
	if cfg.Holder == "" {
		cfg.Holder = defaultHolder()
	}
	if cfg.Duration <= 0 {
		cfg.Duration = defaultLeaseDuration
	}
	if cfg.RenewInterval <= 0 {
		cfg.RenewInterval = cfg.Duration / 3
	}
	cfg.RenewInterval = min(cfg.RenewInterval, cfg.Duration/2)
	if cfg.PollInterval <= 0 {
		cfg.PollInterval = cfg.Duration / 10
	}
	return cfg
}

// nowMillis is the database's clock in milliseconds since the Unix epoch. Leases use the
// database's clock, not the processes': with PostgreSQL the contenders may run on hosts whose
// clocks disagree, and one clock (the server's) makes expiry mean the same thing to all.
func nowMillis(dialect dbutil.Dialect) string {
	if dialect == dbutil.Postgres {
		return `(EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT`
	}
	return `CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)`
}

type leaseQueries struct {
	acquire, renew, fence, release string
	holder, takeOver               string // read the holder; take the lease from a gone one
	fencedPos                      string // SQLite: pos written only while the lease is held
}

func newLeaseQueries(dialect dbutil.Dialect) leaseQueries {
	now := nowMillis(dialect)
	return leaseQueries{
		acquire: `
			INSERT INTO slidingsync_lease (user_id, device_id, name, holder, expires_at)
			VALUES ($1, $2, $3, $4, ` + now + ` + $5)
			ON CONFLICT (user_id, device_id, name) DO UPDATE
				SET holder=excluded.holder, expires_at=excluded.expires_at
				WHERE slidingsync_lease.holder=excluded.holder OR slidingsync_lease.expires_at <= ` + now,
		renew: `
			UPDATE slidingsync_lease SET expires_at=` + now + ` + $5
			WHERE user_id=$1 AND device_id=$2 AND name=$3 AND holder=$4 AND expires_at > ` + now,
		// The no-op update takes the row lock on PostgreSQL, so a takeover waits for the
		// fenced transaction to end.
		fence: `
			UPDATE slidingsync_lease SET expires_at=expires_at
			WHERE user_id=$1 AND device_id=$2 AND name=$3 AND holder=$4 AND expires_at > ` + now,
		holder:   `SELECT holder FROM slidingsync_lease WHERE user_id=$1 AND device_id=$2 AND name=$3`,
		takeOver: `UPDATE slidingsync_lease SET holder=$4, expires_at=` + now + ` + $5 WHERE user_id=$1 AND device_id=$2 AND name=$3 AND holder=$6`,
		release:  `DELETE FROM slidingsync_lease WHERE user_id=$1 AND device_id=$2 AND name=$3 AND holder=$4`,
		fencedPos: `
			UPDATE slidingsync_conn SET pos=$8
			WHERE user_id=$5 AND device_id=$6 AND conn_id=$7 AND EXISTS (
				SELECT 1 FROM slidingsync_lease
				WHERE user_id=$1 AND device_id=$2 AND name=$3 AND holder=$4 AND expires_at > ` + now + `)`,
	}
}

// Lease is a held lease: while it is held, no other process holds the lease of the same name
// for the same device. A goroutine renews it until Release is called or the context given to
// AcquireLease is done.
type Lease struct {
	db       *dbutil.Database
	stmts    *stmtCache
	q        leaseQueries
	userID   id.UserID
	deviceID id.DeviceID
	cfg      LeaseConfig

	lost     chan struct{}
	lostOnce sync.Once
	stop     context.CancelFunc
	wg       sync.WaitGroup
}

// AcquireLease takes the lease of the given name for the device, waiting in standby (trying
// every PollInterval) while another process holds it, until it is free, expires, or ctx is
// done. The returned lease is renewed in the background until Release or until ctx is done;
// when it can no longer be held, Lost is closed.
func (s *Store) AcquireLease(ctx context.Context, userID id.UserID, deviceID id.DeviceID, cfg LeaseConfig) (*Lease, error) {
	cfg = cfg.withDefaults()
	l := &Lease{
		db:       s.DB,
		stmts:    &s.stmts,
		q:        newLeaseQueries(s.DB.Dialect),
		userID:   userID,
		deviceID: deviceID,
		cfg:      cfg,
		lost:     make(chan struct{}),
	}
	log := zerolog.Ctx(ctx).With().
		Str("lease", cfg.Name).
		Str("lease_holder", cfg.Holder).
		Stringer("user_id", userID).
		Stringer("device_id", deviceID).
		Logger()
	waiting := false
	for {
		start := time.Now()
		res, err := s.DB.Exec(ctx, l.q.acquire, userID, deviceID, cfg.Name, cfg.Holder, cfg.Duration.Milliseconds())
		var n int64
		if err == nil {
			n, err = res.RowsAffected()
		}
		if err != nil {
			if ctx.Err() != nil {
				return nil, ctx.Err()
			}
			log.Warn().Err(err).Msg("Failed to try to acquire lease")
		} else if n == 1 {
			log.Info().Msg("Acquired lease")
			renewCtx, cancel := context.WithCancel(ctx)
			l.stop = cancel
			l.wg.Go(func() { l.renewLoop(renewCtx, log, start) })
			return l, nil
		} else if gone, ok := l.takeOverGone(ctx); ok {
			log.Info().Str("previous_holder", gone).Msg("Took over the lease of a process that no longer runs")
			renewCtx, cancel := context.WithCancel(ctx)
			l.stop = cancel
			l.wg.Go(func() { l.renewLoop(renewCtx, log, start) })
			return l, nil
		} else if !waiting {
			waiting = true
			log.Info().Msg("Lease held by another process, waiting in standby")
		}
		timer := time.NewTimer(cfg.PollInterval)
		select {
		case <-ctx.Done():
			timer.Stop()
			return nil, ctx.Err()
		case <-timer.C:
		}
	}
}

// takeOverGone takes the lease when its holder is provably gone (holderGone), and returns
// the holder it replaced. The update names that holder, so that a holder that renewed or
// changed meanwhile keeps the lease; on PostgreSQL it also waits for a fenced commit of the
// gone holder's session to end (the row lock).
func (l *Lease) takeOverGone(ctx context.Context) (string, bool) {
	var holder string
	if err := l.db.QueryRow(ctx, l.q.holder, l.userID, l.deviceID, l.cfg.Name).Scan(&holder); err != nil || !holderGone(holder) {
		return "", false
	}
	res, err := l.db.Exec(ctx, l.q.takeOver, l.userID, l.deviceID, l.cfg.Name, l.cfg.Holder, l.cfg.Duration.Milliseconds(), holder)
	if err != nil {
		return "", false
	}
	n, err := res.RowsAffected()
	return holder, err == nil && n == 1
}

// renewLoop renews the lease every RenewInterval. acquiredAt is when the statement that took
// or last renewed the lease was sent: the lease runs out no earlier than Duration after it,
// so the holder stops trusting it then at the latest.
func (l *Lease) renewLoop(ctx context.Context, log zerolog.Logger, acquiredAt time.Time) {
	defer l.markLost()
	deadline := acquiredAt.Add(l.cfg.Duration)
	ticker := time.NewTicker(l.cfg.RenewInterval)
	defer ticker.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-ticker.C:
		}
		if !time.Now().Before(deadline) {
			log.Warn().Msg("Lease expired before it could be renewed")
			return
		}
		start := time.Now()
		renewCtx, cancel := context.WithDeadline(ctx, deadline)
		res, err := l.db.Exec(renewCtx, l.q.renew, l.userID, l.deviceID, l.cfg.Name, l.cfg.Holder, l.cfg.Duration.Milliseconds())
		cancel()
		var n int64
		if err == nil {
			n, err = res.RowsAffected()
		}
		switch {
		case ctx.Err() != nil:
			return
		case err != nil:
			// Retry at the next tick, as long as the lease has not run out.
			log.Warn().Err(err).Msg("Failed to renew lease")
		case n != 1:
			log.Warn().Msg("Lease was lost: it expired or another process took it")
			return
		default:
			deadline = start.Add(l.cfg.Duration)
		}
	}
}

func (l *Lease) markLost() {
	l.lostOnce.Do(func() { close(l.lost) })
}

// Holder returns the holder name the lease was acquired with.
func (l *Lease) Holder() string {
	return l.cfg.Holder
}

// Lost returns a channel that is closed when the lease is no longer held: it could not be
// renewed in time, another process took it, Release was called, or the context given to
// AcquireLease is done.
func (l *Lease) Lost() <-chan struct{} {
	return l.lost
}

// Release stops renewing, waits until the renewing goroutine has stopped, and deletes the
// lease row if this process still holds it, so that a standby process takes over at its next
// poll instead of after expiry.
func (l *Lease) Release(ctx context.Context) error {
	l.stop()
	l.wg.Wait()
	l.markLost()
	_, err := l.db.Exec(ctx, l.q.release, l.userID, l.deviceID, l.cfg.Name, l.cfg.Holder)
	if err != nil {
		return fmt.Errorf("sqlstore: release lease: %w", err)
	}
	return nil
}

// Check returns ErrLeaseLost unless the lease is held and unexpired by the database's clock.
// Inside a transaction (ctx from DoTxn or a transaction hook) it also makes the transaction
// conflict with a takeover: on PostgreSQL it locks the lease row until the transaction ends,
// and SQLite runs one write transaction at a time.
func (l *Lease) Check(ctx context.Context) error {
	select {
	case <-l.lost:
		return ErrLeaseLost
	default:
	}
	res, err := l.stmts.exec(ctx, l.db, l.q.fence, l.userID, l.deviceID, l.cfg.Name, l.cfg.Holder)
	if err != nil {
		return fmt.Errorf("sqlstore: check lease: %w", err)
	}
	if n, err := res.RowsAffected(); err != nil {
		return fmt.Errorf("sqlstore: check lease: %w", err)
	} else if n != 1 {
		return ErrLeaseLost
	}
	return nil
}

// Guard returns a store that commits through next only while the lease is held: every
// Commit checks the lease (see Check) inside its transaction, so a process that lost its lease
// cannot commit after another one took over. next must run transaction hooks in a transaction
// of the lease's database (a Store of this package on the same database does). The returned
// store is a [slidingsync.RoomLoader] when next is one.
func (l *Lease) Guard(next slidingsync.Store) slidingsync.Store {
	g := &guardedStore{lease: l, next: next}
	if rl, ok := next.(slidingsync.RoomLoader); ok {
		return &guardedRoomLoader{guardedStore: g, loader: rl}
	}
	return g
}

type guardedRoomLoader struct {
	*guardedStore
	loader slidingsync.RoomLoader
}

func (g *guardedRoomLoader) LoadHead(ctx context.Context, key slidingsync.ConnKey) (*slidingsync.Checkpoint, error) {
	return g.loader.LoadHead(ctx, key)
}

func (g *guardedRoomLoader) LoadRooms(ctx context.Context, key slidingsync.ConnKey, roomIDs []id.RoomID) (map[id.RoomID]*slidingsync.RoomState, error) {
	return g.loader.LoadRooms(ctx, key, roomIDs)
}

type guardedStore struct {
	lease *Lease
	next  slidingsync.Store
}

func (g *guardedStore) Load(ctx context.Context, key slidingsync.ConnKey) (*slidingsync.Checkpoint, error) {
	return g.next.Load(ctx, key)
}

func (g *guardedStore) Commit(ctx context.Context, key slidingsync.ConnKey, upd *slidingsync.Update) error {
	if done, err := g.commitPos(ctx, key, upd); done || err != nil {
		return err
	}
	guarded := *upd
	guarded.TxnHooks = append([]func(ctx context.Context) error{g.lease.Check}, upd.TxnHooks...)
	return g.next.Commit(ctx, key, &guarded)
}

// commitPos commits an update that writes nothing but pos (an idle long-poll) with one
// statement that checks the lease, on SQLite where one statement holds the write lock for
// both. done is false when it did not apply: another dialect or store, or no row changed
// (lease lost, or no row for the connection yet), which the full commit then sorts out.
func (g *guardedStore) commitPos(ctx context.Context, key slidingsync.ConnKey, upd *slidingsync.Update) (done bool, err error) {
	l := g.lease
	s, ok := g.next.(*Store)
	if !ok || !posOnly(upd) || l.db.Dialect != dbutil.SQLite || s.DB.RawDB != l.db.RawDB {
		return false, nil
	}
	select {
	case <-l.lost:
		return false, ErrLeaseLost
	default:
	}
	res, err := l.stmts.exec(context.WithoutCancel(ctx), l.db, l.q.fencedPos, l.userID, l.deviceID, l.cfg.Name, l.cfg.Holder, key.UserID, key.DeviceID, key.ConnID, upd.Pos)
	if err != nil {
		return false, fmt.Errorf("sqlstore: store pos: %w", err)
	}
	n, err := res.RowsAffected()
	if err != nil {
		return false, fmt.Errorf("sqlstore: store pos: %w", err)
	}
	return n == 1, nil
}

// RunWithLease acquires the lease (waiting in standby as AcquireLease does), runs fn with a
// context that is cancelled with cause ErrLeaseLost if the lease is lost, and releases the
// lease when fn returns. It returns fn's error, or ErrLeaseLost when fn returned because the
// lease was lost.
func (s *Store) RunWithLease(ctx context.Context, userID id.UserID, deviceID id.DeviceID, cfg LeaseConfig, fn func(ctx context.Context, l *Lease) error) error {
	l, err := s.AcquireLease(ctx, userID, deviceID, cfg)
	if err != nil {
		return err
	}
	runCtx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	var watch sync.WaitGroup
	watch.Go(func() {
		select {
		case <-l.Lost():
			cancel(ErrLeaseLost)
		case <-runCtx.Done():
		}
	})
	fnErr := fn(runCtx, l)
	lost := context.Cause(runCtx) == ErrLeaseLost
	cancel(nil)
	watch.Wait()
	releaseErr := l.Release(context.WithoutCancel(ctx))
	if lost && (fnErr == nil || errors.Is(fnErr, context.Canceled)) {
		fnErr = ErrLeaseLost
	}
	return errors.Join(fnErr, releaseErr)
}
