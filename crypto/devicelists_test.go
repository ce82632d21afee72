package crypto

import (
	"context"
	"fmt"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"maunium.net/go/mautrix/id"

	"github.com/sliding-e2ee/sdk/e2ee"
)

const (
	alice id.UserID = "@alice:example.org"
	bob   id.UserID = "@bob:example.org"
	carol id.UserID = "@carol:example.org"
)

func TestChangedUserIsQueried(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, Config{})
	e.track(alice, bob)

	require.NoError(t, e.m.record(ctx, &e2ee.Delta{Changed: []id.UserID{alice, carol}}))
	assert.Equal(t, []id.UserID{alice}, e.outdated(), "only tracked users are marked")

	again, err := e.m.refreshOutdated(ctx)
	require.NoError(t, err)
	assert.False(t, again)
	_, queries := e.hs.snapshot()
	assert.Equal(t, [][]id.UserID{{alice}}, queries)
	assert.Empty(t, e.outdated())

	// Nothing left: no further query.
	again, err = e.m.refreshOutdated(ctx)
	require.NoError(t, err)
	assert.False(t, again)
	_, queries = e.hs.snapshot()
	assert.Len(t, queries, 1)
}

func TestGapMarksEveryTrackedUser(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, Config{})
	e.track(alice, bob)
	require.NoError(t, e.m.record(ctx, &e2ee.Delta{Gap: true}))
	assert.Equal(t, []id.UserID{alice, bob}, e.outdated())
	_, err := e.m.refreshOutdated(ctx)
	require.NoError(t, err)
	_, queries := e.hs.snapshot()
	assert.Equal(t, [][]id.UserID{{alice, bob}}, queries)
	assert.Empty(t, e.outdated())
}

func TestLeftUserIsUntracked(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, Config{})
	e.track(alice, bob)
	require.NoError(t, e.m.record(ctx, &e2ee.Delta{Changed: []id.UserID{bob}}))
	require.NoError(t, e.m.record(ctx, &e2ee.Delta{Left: []id.UserID{bob}}))
	tracked, err := e.store.FilterTrackedUsers(ctx, []id.UserID{alice, bob})
	require.NoError(t, err)
	assert.Equal(t, []id.UserID{alice}, tracked)
	devices, err := e.store.GetDevices(ctx, bob)
	require.NoError(t, err)
	assert.Nil(t, devices, "an untracked user's devices are fetched again by the next share")

	_, err = e.m.refreshOutdated(ctx)
	require.NoError(t, err)
	_, queries := e.hs.snapshot()
	assert.Empty(t, queries)
}

// A change that arrives while the user's query is in flight causes a second query, although
// storing the first answer clears mautrix's outdated flag.
func TestChangeDuringQueryQueriesAgain(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, Config{})
	e.track(alice)
	require.NoError(t, e.m.record(ctx, &e2ee.Delta{Changed: []id.UserID{alice}}))

	first := true
	e.hs.queryHook = func([]id.UserID) {
		if first {
			first = false
			// The server answers with the old device list; the change arrives meanwhile.
			require.NoError(t, e.m.record(ctx, &e2ee.Delta{Changed: []id.UserID{alice}}))
		}
	}
	again, err := e.m.refreshOutdated(ctx)
	require.NoError(t, err)
	assert.True(t, again)
	assert.Equal(t, []id.UserID{alice}, e.outdated(), "the newer mark survives the first answer")

	again, err = e.m.refreshOutdated(ctx)
	require.NoError(t, err)
	assert.False(t, again)
	_, queries := e.hs.snapshot()
	assert.Equal(t, [][]id.UserID{{alice}, {alice}}, queries)
	assert.Empty(t, e.outdated())
}

// A mark that is still in the generation table after a crash (the query's answer was stored,
// the generations were not settled) is queried again after the restart.
func TestUnsettledGenerationIsQueried(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, Config{})
	e.track(alice)
	require.NoError(t, e.m.record(ctx, &e2ee.Delta{Changed: []id.UserID{alice}}))
	// The answer is stored (the flag is cleared), then the process dies.
	e.track(alice)
	assert.Empty(t, e.outdated())

	again, err := e.m.refreshOutdated(ctx)
	require.NoError(t, err)
	assert.False(t, again)
	_, queries := e.hs.snapshot()
	assert.Equal(t, [][]id.UserID{{alice}}, queries)
}

// HandleE2EE writes with the commit's transaction: a rollback undoes its marks.
func TestHandleE2EEInsideCommitTransaction(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, Config{})
	e.track(alice)
	errAbort := assert.AnError
	err := e.db.DoTxn(ctx, nil, func(ctx context.Context) error {
		require.NoError(t, e.m.record(ctx, &e2ee.Delta{Changed: []id.UserID{alice}}))
		return errAbort
	})
	require.ErrorIs(t, err, errAbort)
	assert.Empty(t, e.outdated())
	_, err = e.m.refreshOutdated(ctx)
	require.NoError(t, err)
	_, queries := e.hs.snapshot()
	assert.Empty(t, queries)

	require.NoError(t, e.db.DoTxn(ctx, nil, func(ctx context.Context) error {
		return e.m.record(ctx, &e2ee.Delta{Changed: []id.UserID{alice}})
	}))
	assert.Equal(t, []id.UserID{alice}, e.outdated())
}

// Many outdated users are queried in chunks.
func TestOutdatedUsersQueriedInChunks(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, Config{})
	defer func(n int) { queryChunkSize = n }(queryChunkSize)
	queryChunkSize = 20
	users := make([]id.UserID, queryChunkSize+10)
	require.NoError(t, e.db.DoTxn(ctx, nil, func(ctx context.Context) error {
		for i := range users {
			users[i] = id.NewUserID(fmt.Sprintf("u%05d", i), "example.org")
			if err := e.store.PutDevices(ctx, users[i], map[id.DeviceID]*id.Device{}); err != nil {
				return err
			}
		}
		return nil
	}))
	require.NoError(t, e.m.record(ctx, &e2ee.Delta{Gap: true}))
	assert.Len(t, e.outdated(), len(users))
	again, err := e.m.refreshOutdated(ctx)
	require.NoError(t, err)
	assert.False(t, again)
	_, queries := e.hs.snapshot()
	require.Len(t, queries, 2)
	assert.Len(t, queries[0], queryChunkSize)
	assert.Len(t, queries[1], 10)
	assert.Empty(t, e.outdated())
}
