package sqlstore_test

import (
	"context"
	"encoding/json"
	"errors"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
	"maunium.net/go/mautrix/sqlstatestore"

	"github.com/sliding-e2ee/sdk/slidingsync"
	"github.com/sliding-e2ee/sdk/slidingsync/sqlstore"
	"github.com/sliding-e2ee/sdk/slidingsync/sqlstore/dbopen"
)

// sharedDatabase upgrades mautrix's crypto store, its state store and this store on one
// database, then commits updates whose transaction hooks write through the crypto store.
func sharedDatabase(t *testing.T, b backend) {
	ctx := context.Background()
	target := b.newTarget(t)
	db, err := dbopen.Open(target, b.cfg)
	require.NoError(t, err)
	defer db.Close()

	cs := crypto.NewSQLCryptoStore(db, nil, "@bot:example.org", "BOTDEV", []byte("pickle key"))
	require.NoError(t, cs.DB.Upgrade(ctx))
	ss := sqlstatestore.NewSQLStateStore(db, nil, false)
	require.NoError(t, ss.Upgrade(ctx))
	s := sqlstore.New(db, nil)
	require.NoError(t, s.Upgrade(ctx))
	for _, table := range []string{"crypto_version", "mx_version", "slidingsync_version"} {
		exists, err := db.TableExists(ctx, table)
		require.NoError(t, err)
		assert.True(t, exists, table)
	}

	require.NoError(t, ss.SetMembership(ctx, "!room:example.org", "@bot:example.org", event.MembershipJoin))
	key := slidingsync.ConnKey{UserID: "@bot:example.org", DeviceID: "BOTDEV", ConnID: "main"}
	device := func(devID id.DeviceID) *id.Device {
		return &id.Device{UserID: "@friend:example.org", DeviceID: devID, IdentityKey: "identity", SigningKey: "signing", Name: string(devID)}
	}
	putDevice := func(devID id.DeviceID) func(ctx context.Context) error {
		return func(ctx context.Context) error {
			// PutDevices runs its own DoTxn, which joins the commit's transaction.
			return cs.PutDevices(ctx, "@friend:example.org", map[id.DeviceID]*id.Device{devID: device(devID)})
		}
	}
	require.NoError(t, s.Commit(ctx, key, &slidingsync.Update{
		Pos:        "1",
		Extensions: map[string]json.RawMessage{"to_device": json.RawMessage(`{"since":"1"}`)},
		TxnHooks:   []func(ctx context.Context) error{putDevice("GOOD")},
	}))
	got, err := cs.GetDevice(ctx, "@friend:example.org", "GOOD")
	require.NoError(t, err)
	require.NotNil(t, got, "the hook's crypto store write was committed")

	failure := errors.New("extension failed")
	err = s.Commit(ctx, key, &slidingsync.Update{
		Pos:        "2",
		Extensions: map[string]json.RawMessage{"to_device": json.RawMessage(`{"since":"2"}`)},
		TxnHooks: []func(ctx context.Context) error{
			putDevice("ROLLEDBACK"),
			func(ctx context.Context) error { return failure },
		},
	})
	require.ErrorIs(t, err, failure)
	got, err = cs.GetDevice(ctx, "@friend:example.org", "ROLLEDBACK")
	require.NoError(t, err)
	assert.Nil(t, got, "the crypto store write of a failed commit was rolled back")
	cp, err := s.Load(ctx, key)
	require.NoError(t, err)
	assert.Equal(t, "1", cp.Pos)
	assert.JSONEq(t, `{"since":"1"}`, string(cp.Extensions["to_device"]))

	membership, err := ss.GetMembership(ctx, "!room:example.org", "@bot:example.org")
	require.NoError(t, err)
	assert.Equal(t, event.MembershipJoin, membership)
}

func TestSharedDatabaseSQLiteModernc(t *testing.T) {
	sharedDatabase(t, sqliteBackend(dbopen.DriverModernc))
}

func TestSharedDatabasePostgres(t *testing.T) {
	sharedDatabase(t, postgresBackend)
}
