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

func (c *benchConsumer) HandleE2EE(_ context.Context, _ e2ee.State, d *e2ee.Delta) slidingsync.Step {
	if len(d.Changed) == 0 {
		return slidingsync.Step{}
	}
	return slidingsync.Step{Commit: func(ctx context.Context) error {
		for _, u := range d.Changed {
			if _, err := c.db.Exec(ctx, `INSERT INTO bench_outdated (user_id, n) VALUES ($1, 1) ON CONFLICT (user_id) DO UPDATE SET n=bench_outdated.n+1`, u); err != nil {
				return err
			}
		}
		return nil
	}}
}

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
// whole cycle as the connection runs it (Process, Commit with the Step's checkpoint and the
// consumer's transaction hook, After) on SQLite (modernc), next to the same commit of a
// response without e2ee data.
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
			exts, release, err := e2ee.New(key.UserID, key.DeviceID, e2ee.Config{Consumer: &benchConsumer{db: store.DB}})
			require.NoError(b, err)
			b.Cleanup(release)
			var cp json.RawMessage
			i := 0
			for b.Loop() {
				i++
				pos := strconv.Itoa(i)
				info := slidingsync.RequestInfo{Protocol: slidingsync.ProtocolMSC4186, Pos: strconv.Itoa(i - 1), Checkpoint: cp}
				step, err := exts[0].Process(ctx, info, raw)
				require.NoError(b, err)
				upd := &slidingsync.Update{Pos: pos, Extensions: map[string]json.RawMessage{"e2ee": step.Checkpoint}}
				if step.Commit != nil {
					upd.TxnHooks = []func(context.Context) error{step.Commit}
				}
				require.NoError(b, store.Commit(ctx, key, upd))
				cp = step.Checkpoint
			}
		})
	}
	b.Run("e2ee-one-changed-process-only", func(b *testing.B) {
		exts, release, err := e2ee.New("@bench2:x", key.DeviceID, e2ee.Config{Consumer: &benchConsumer{}})
		require.NoError(b, err)
		b.Cleanup(release)
		raw := json.RawMessage(sections["e2ee-one-changed"])
		info := slidingsync.RequestInfo{Protocol: slidingsync.ProtocolMSC4186, Pos: "1"}
		for b.Loop() {
			_, err := exts[0].Process(ctx, info, raw)
			require.NoError(b, err)
		}
	})
}
