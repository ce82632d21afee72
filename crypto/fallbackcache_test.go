package crypto

import (
	"context"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"maunium.net/go/mautrix/id"

	"github.com/sliding-e2ee/sdk/e2ee"
)

// commit delivers d as the e2ee extension does: the Step of HandleE2EE, its Commit in a
// transaction, then, once it committed, its After.
func (e *env) commit(ctx context.Context, d *e2ee.Delta) {
	e.t.Helper()
	if d == nil {
		d = &e2ee.Delta{}
	}
	step := e.m.HandleE2EE(ctx, e2ee.State{Active: true}, d)
	require.NoError(e.t, e.db.DoTxn(ctx, nil, func(ctx context.Context) error {
		if step.Commit == nil {
			return nil
		}
		return step.Commit(ctx)
	}))
	step.After(ctx)
}

// setPending changes the row behind the Machine's back, so that a test sees whether the
// Machine writes it.
func (e *env) setPending(ctx context.Context, pending bool) {
	e.t.Helper()
	_, err := e.db.Exec(ctx, `UPDATE sdkcrypto_fallback_key SET upload_pending=$1`, pending)
	require.NoError(e.t, err)
}

func (e *env) pending(ctx context.Context) bool {
	e.t.Helper()
	row, err := e.m.loadFallback(ctx)
	require.NoError(e.t, err)
	return row.pending
}

var unused = []id.KeyAlgorithm{id.KeyAlgorithmSignedCurve25519}

// Synapse repeats the fallback key types in every response: a commit that says what the row
// holds already writes nothing, wakes nothing, and Run does not read the row again. A change
// is written.
func TestFallbackStateNotRewrittenWhenUnchanged(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, Config{})
	e.setUp(ctx)
	e.commit(ctx, fallbackTypes(unused...)) // written once: Run's writes leave the row unknown
	_, _, err := e.m.work(ctx)
	require.NoError(t, err)
	select {
	case <-e.m.kick:
	default:
	}

	e.setPending(ctx, true)
	e.commit(ctx, fallbackTypes(unused...))
	assert.True(t, e.pending(ctx), "the same report is not written again")
	assert.Empty(t, e.m.kick, "an idle commit does not wake Run")
	_, _, err = e.m.work(ctx)
	require.NoError(t, err)
	assert.Len(t, e.fallbackUploads(), 1, "Run did not read the row again")

	e.setPending(ctx, false)
	e.commit(ctx, fallbackTypes())
	assert.True(t, e.pending(ctx), "a changed report is written")
	assert.Len(t, e.m.kick, 1, "and wakes Run")
}

// A commit that rolls back must not leave the Machine believing that what it wrote is stored:
// the next report of the same value is written, even after a commit without a delta or with
// another one.
func TestFallbackStateWrittenAfterRolledBackCommit(t *testing.T) {
	for name, between := range map[string]*e2ee.Delta{
		"no delta":      nil,
		"another delta": {Changed: []id.UserID{alice}},
	} {
		t.Run(name, func(t *testing.T) {
			ctx := context.Background()
			e := newEnv(t, Config{})
			e.setUp(ctx)
			e.commit(ctx, fallbackTypes(unused...))
			require.False(t, e.pending(ctx))

			err := e.db.DoTxn(ctx, nil, func(ctx context.Context) error {
				require.NoError(t, e.m.record(ctx, fallbackTypes()))
				return assert.AnError
			})
			require.ErrorIs(t, err, assert.AnError)
			require.False(t, e.pending(ctx))
			e.commit(ctx, between)

			e.commit(ctx, fallbackTypes())
			assert.True(t, e.pending(ctx))
		})
	}
}

// Run's own writes of the row (the upload clears upload_pending) make the next report be
// written, also when it repeats the last one.
func TestFallbackStateWrittenAfterRunsWrite(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, Config{})
	e.setUp(ctx)
	e.commit(ctx, fallbackTypes())
	require.True(t, e.pending(ctx))
	require.NoError(t, e.m.uploadFallbackKey(ctx))
	require.False(t, e.pending(ctx))

	e.commit(ctx, fallbackTypes())
	assert.True(t, e.pending(ctx))
}

// A write of Run that lands between a commit and its report leaves the row's value unknown:
// the commit's value is not taken for the stored one.
func TestFallbackCommitOverlappingRunsWriteConfirmsNothing(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, Config{})
	e.setUp(ctx)
	e.commit(ctx, fallbackTypes(unused...))

	d := fallbackTypes()
	require.NoError(t, e.db.DoTxn(ctx, nil, func(ctx context.Context) error { return e.m.record(ctx, d) }))
	require.NoError(t, e.m.uploadFallbackKey(ctx)) // after the commit, before its report
	e.m.committed(e2ee.State{Active: true}, d)
	require.False(t, e.pending(ctx))

	e.commit(ctx, fallbackTypes())
	assert.True(t, e.pending(ctx))
}

// A commit reported without its delta (a Step that wrote nothing) confirms nothing: what it wrote is
// unknown, and the next report is written even if it matches what the Machine knew before.
func TestFallbackCommitWithoutItsDeltaConfirmsNothing(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, Config{})
	e.setUp(ctx)
	e.commit(ctx, fallbackTypes(unused...))

	require.NoError(t, e.db.DoTxn(ctx, nil, func(ctx context.Context) error { return e.m.record(ctx, fallbackTypes()) }))
	e.m.committed(e2ee.State{Active: true}, nil)
	require.True(t, e.pending(ctx))

	e.commit(ctx, fallbackTypes(unused...))
	assert.False(t, e.pending(ctx))
}

// needsRecord answers as record decides: device-list news always needs the transaction;
// fallback key types only while what they say is not known to be stored.
func TestNeedsRecord(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, Config{})
	e.setUp(ctx)
	assert.True(t, e.m.needsRecord(fallbackTypes(unused...)), "stored state unknown after Run's writes")
	e.commit(ctx, fallbackTypes(unused...))
	for _, tc := range []struct {
		name string
		d    *e2ee.Delta
		want bool
	}{
		{"same fallback key types", fallbackTypes(unused...), false},
		{"fallback key used", fallbackTypes(), true},
		{"no fallback key types", &e2ee.Delta{}, false},
		{"changed user", &e2ee.Delta{Changed: []id.UserID{alice}}, true},
		{"left user", &e2ee.Delta{Left: []id.UserID{alice}}, true},
		{"gap", &e2ee.Delta{Gap: true}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			assert.Equal(t, tc.want, e.m.needsRecord(tc.d))
		})
	}
}
