package crypto

import (
	"context"
	"os"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"maunium.net/go/mautrix/id"

	"github.com/sliding-e2ee/sdk/e2ee"
	"github.com/sliding-e2ee/sdk/internal/pgtest"
)

func TestMain(m *testing.M) {
	os.Exit(pgtest.Main(m))
}

// The Machine's SQL on PostgreSQL: device-list marks, generations, untracking, and the
// fallback key record.
func TestPostgres(t *testing.T) {
	ctx := context.Background()
	e := newEnvOn(t, Config{}, testUser, testDevice, pgtest.NewDatabase(t))
	e.track(alice, bob, carol)

	require.NoError(t, e.m.record(ctx, &e2ee.Delta{Gap: true}))
	assert.Equal(t, []id.UserID{alice, bob, carol}, e.outdated())
	_, err := e.m.refreshOutdated(ctx)
	require.NoError(t, err)
	assert.Empty(t, e.outdated())

	require.NoError(t, e.m.record(ctx, &e2ee.Delta{Changed: []id.UserID{alice}, Left: []id.UserID{carol}}))
	first := true
	e.hs.queryHook = func([]id.UserID) {
		if first {
			first = false
			require.NoError(t, e.m.record(ctx, &e2ee.Delta{Changed: []id.UserID{alice}}))
		}
	}
	again, err := e.m.refreshOutdated(ctx)
	require.NoError(t, err)
	assert.True(t, again)
	again, err = e.m.refreshOutdated(ctx)
	require.NoError(t, err)
	assert.False(t, again)
	_, queries := e.hs.snapshot()
	assert.Equal(t, [][]id.UserID{{alice, bob, carol}, {alice}, {alice}}, queries)
	tracked, err := e.store.FilterTrackedUsers(ctx, []id.UserID{alice, bob, carol})
	require.NoError(t, err)
	assert.ElementsMatch(t, []id.UserID{alice, bob}, tracked)

	err = e.db.DoTxn(ctx, nil, func(ctx context.Context) error {
		require.NoError(t, e.m.record(ctx, &e2ee.Delta{Changed: []id.UserID{bob}}))
		return assert.AnError
	})
	require.ErrorIs(t, err, assert.AnError)
	assert.Empty(t, e.outdated())

	e.setUp(ctx)
	require.NoError(t, e.m.record(ctx, fallbackTypes()))
	row, err := e.m.loadFallback(ctx)
	require.NoError(t, err)
	assert.True(t, row.pending)
	assert.True(t, row.uploaded)
	assert.NotZero(t, row.rotatedAt)
	require.NoError(t, e.m.record(ctx, fallbackTypes(id.KeyAlgorithmSignedCurve25519)))
	row, err = e.m.loadFallback(ctx)
	require.NoError(t, err)
	assert.False(t, row.pending)
}
