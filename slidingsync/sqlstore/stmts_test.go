package sqlstore_test

import (
	"context"
	"encoding/json"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/sliding-e2ee/sdk/slidingsync"
	"github.com/sliding-e2ee/sdk/slidingsync/sqlstore"
	"github.com/sliding-e2ee/sdk/slidingsync/sqlstore/dbopen"
)

// Commits through the lease's guard with the statements every commit runs (pos, a checkpoint,
// the lease check) prepared, from several goroutines so that the pool uses several
// connections, and with a pool of one connection, where nothing is prepared (preparing would
// wait for the connection the transaction holds).
func TestGuardedCommitsOnSQLitePools(t *testing.T) {
	for name, cfg := range map[string]dbopen.Config{
		"default pool":   {},
		"one connection": {MaxOpenConns: 1},
	} {
		t.Run(name, func(t *testing.T) {
			b := sqliteBackend(dbopen.DriverModernc)
			b.cfg = cfg
			db, s := open(t, b, b.newTarget(t))
			defer db.Close()
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			lease, err := s.AcquireLease(ctx, leaseUser, leaseDevice, shortLease("A"))
			require.NoError(t, err)
			defer lease.Release(context.Background())
			guarded := lease.Guard(s)

			var wg sync.WaitGroup
			for conn := range 3 {
				wg.Go(func() {
					key := slidingsync.ConnKey{UserID: leaseUser, DeviceID: leaseDevice, ConnID: strconv.Itoa(conn)}
					for i := range 20 {
						upd := &slidingsync.Update{
							Pos:        strconv.Itoa(i),
							Extensions: map[string]json.RawMessage{"e2ee": json.RawMessage(`{"n":` + strconv.Itoa(i) + `}`)},
						}
						if !assert.NoError(t, guarded.Commit(ctx, key, upd)) {
							return
						}
					}
				})
			}
			wg.Wait()
			for conn := range 3 {
				cp, err := s.Load(ctx, slidingsync.ConnKey{UserID: leaseUser, DeviceID: leaseDevice, ConnID: strconv.Itoa(conn)})
				require.NoError(t, err)
				assert.Equal(t, "19", cp.Pos)
				assert.JSONEq(t, `{"n":19}`, string(cp.Extensions["e2ee"]))
			}

			// A lost lease still fences the prepared check.
			_, err = db.Exec(ctx, `UPDATE slidingsync_lease SET holder='B'`)
			require.NoError(t, err)
			key := slidingsync.ConnKey{UserID: leaseUser, DeviceID: leaseDevice, ConnID: "0"}
			err = guarded.Commit(ctx, key, &slidingsync.Update{Pos: "lost"})
			require.Error(t, err)
			cp, err := s.Load(ctx, key)
			require.NoError(t, err)
			assert.Equal(t, "19", cp.Pos)
		})
	}
}

// On SQLite a commit that has begun runs to its end when its context is cancelled half-way
// (it is local and short, and an uncancellable context spares watcher goroutines per
// statement); it is all or nothing either way.
func TestSQLiteCommitFinishesAfterCancel(t *testing.T) {
	b := sqliteBackend(dbopen.DriverModernc)
	db, s := open(t, b, b.newTarget(t))
	defer db.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	key := slidingsync.ConnKey{UserID: leaseUser, DeviceID: leaseDevice}
	err := s.Commit(ctx, key, &slidingsync.Update{
		Pos: "after-cancel",
		TxnHooks: []func(ctx context.Context) error{func(context.Context) error {
			cancel()
			return nil
		}},
		Extensions: map[string]json.RawMessage{"e2ee": json.RawMessage(`{"n":1}`)},
	})
	require.NoError(t, err)
	cp, err := s.Load(context.Background(), key)
	require.NoError(t, err)
	assert.Equal(t, "after-cancel", cp.Pos)
	assert.JSONEq(t, `{"n":1}`, string(cp.Extensions["e2ee"]))
}

// A guarded update that writes nothing but pos is one statement on SQLite, fenced by the
// lease: the first one (no row yet) goes the full way, later ones stop writing once the lease
// is gone.
func TestGuardedPosOnlyCommit(t *testing.T) {
	b := sqliteBackend(dbopen.DriverModernc)
	db, s := open(t, b, b.newTarget(t))
	defer db.Close()
	ctx := context.Background()
	lease, err := s.AcquireLease(ctx, leaseUser, leaseDevice, shortLease("A"))
	require.NoError(t, err)
	defer lease.Release(ctx)
	guarded := lease.Guard(s)
	key := slidingsync.ConnKey{UserID: leaseUser, DeviceID: leaseDevice, ConnID: "idle"}
	for _, pos := range []string{"1", "2", "3"} {
		require.NoError(t, guarded.Commit(ctx, key, &slidingsync.Update{Pos: pos}))
		cp, err := s.Load(ctx, key)
		require.NoError(t, err)
		assert.Equal(t, pos, cp.Pos)
	}
	_, err = s.DB.Exec(ctx, `UPDATE slidingsync_lease SET holder='thief'`)
	require.NoError(t, err)
	assert.ErrorIs(t, guarded.Commit(ctx, key, &slidingsync.Update{Pos: "4"}), sqlstore.ErrLeaseLost)
	cp, err := s.Load(ctx, key)
	require.NoError(t, err)
	assert.Equal(t, "3", cp.Pos, "no pos written without the lease")
}
