package e2ee_test

import (
	"context"
	"encoding/json"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"
	"go.mau.fi/util/dbutil"

	"github.com/sliding-e2ee/sdk/e2ee"
	"github.com/sliding-e2ee/sdk/slidingsync"
	"github.com/sliding-e2ee/sdk/slidingsync/sqlstore"
	"github.com/sliding-e2ee/sdk/slidingsync/sqlstore/dbopen"
)

// benchConsumer marks changed users outdated in a table of the store's database, inside the
// commit transaction, as a crypto store would.
type benchConsumer struct{ db *dbutil.Database }

func (c *benchConsumer) HandleE2EE(ctx context.Context, d *e2ee.Delta) error {
	for _, u := range d.Changed {
		if _, err := c.db.Exec(ctx, `INSERT INTO bench_outdated (user_id, n) VALUES ($1, 1) ON CONFLICT (user_id) DO UPDATE SET n=bench_outdated.n+1`, u); err != nil {
			return err
		}
	}
	return nil
}

func (c *benchConsumer) E2EECommitted(context.Context, e2ee.State) {}

func openBenchStore(b *testing.B) *sqlstore.Store {
	b.Helper()
	db, err := dbopen.Open(filepath.Join(b.TempDir(), "bench.db"), dbopen.Config{})
	require.NoError(b, err)
	b.Cleanup(func() { _ = db.Close() })
	store := sqlstore.New(db, nil)
	require.NoError(b, store.Upgrade(context.Background()))
	_, err = store.DB.Exec(context.Background(), `CREATE TABLE bench_outdated (user_id TEXT PRIMARY KEY, n BIGINT NOT NULL)`)
	require.NoError(b, err)
	return store
}

// BenchmarkIncrementalCommit measures one incremental response through the e2ee extension's
// whole cycle as the connection runs it (Process, Checkpoint, Commit with the consumer's
// transaction hook, AfterCommit) on SQLite (modernc), next to the same commit of a response
// without e2ee data.
func BenchmarkIncrementalCommit(b *testing.B) {
	ctx := zerolog.Nop().WithContext(context.Background())
	key := slidingsync.ConnKey{UserID: "@bench:x", DeviceID: "BENCH"}
	sections := map[string]string{
		// What Synapse sends on an idle incremental response.
		"e2ee-synapse-idle": `{"device_lists":{"changed":[],"left":[]},"device_one_time_keys_count":{"signed_curve25519":50},"device_unused_fallback_key_types":["signed_curve25519"]}`,
		// One device-list change, marked outdated in the same transaction.
		"e2ee-one-changed": `{"device_lists":{"changed":["@alice:x"],"left":[]},"device_one_time_keys_count":{"signed_curve25519":50},"device_unused_fallback_key_types":["signed_curve25519"]}`,
	}
	b.Run("no-e2ee", func(b *testing.B) {
		store := openBenchStore(b)
		i := 0
		for b.Loop() {
			i++
			require.NoError(b, store.Commit(ctx, key, &slidingsync.Update{Pos: strconv.Itoa(i)}))
		}
	})
	for _, name := range []string{"e2ee-synapse-idle", "e2ee-one-changed"} {
		raw := json.RawMessage(sections[name])
		b.Run(name, func(b *testing.B) {
			store := openBenchStore(b)
			ext, err := e2ee.NewE2EE(key.UserID, key.DeviceID, e2ee.Config{Consumer: &benchConsumer{db: store.DB}})
			require.NoError(b, err)
			b.Cleanup(func() { _ = ext.Close() })
			require.NoError(b, ext.Restore(ctx, nil))
			i := 0
			for b.Loop() {
				i++
				pos := strconv.Itoa(i)
				info := slidingsync.RequestInfo{Protocol: slidingsync.ProtocolMSC4186, Pos: strconv.Itoa(i - 1)}
				require.NoError(b, ext.Process(ctx, info, raw))
				cp, err := ext.Checkpoint(ctx)
				require.NoError(b, err)
				require.NoError(b, store.Commit(ctx, key, &slidingsync.Update{
					Pos:        pos,
					Extensions: map[string]json.RawMessage{e2ee.E2EEName: cp},
					TxnHooks:   []func(context.Context) error{ext.CommitTxn},
				}))
				ext.AfterCommit(ctx)
			}
		})
	}
	b.Run("e2ee-one-changed-process-only", func(b *testing.B) {
		ext, err := e2ee.NewE2EE("@bench2:x", key.DeviceID, e2ee.Config{Consumer: &benchConsumer{}})
		require.NoError(b, err)
		b.Cleanup(func() { _ = ext.Close() })
		require.NoError(b, ext.Restore(ctx, nil))
		raw := json.RawMessage(sections["e2ee-one-changed"])
		info := slidingsync.RequestInfo{Protocol: slidingsync.ProtocolMSC4186, Pos: "1"}
		for b.Loop() {
			require.NoError(b, ext.Process(ctx, info, raw))
			_, err := ext.Checkpoint(ctx)
			require.NoError(b, err)
		}
	})
}
