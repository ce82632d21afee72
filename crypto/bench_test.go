package crypto

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"path/filepath"
	"sync/atomic"
	"testing"

	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"
	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix"
	mcrypto "maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/id"

	"github.com/sliding-e2ee/sdk/e2ee"
	"github.com/sliding-e2ee/sdk/slidingsync/sqlstore/dbopen"
)

const benchChangedUsers = 1000

// emptyKeysHS answers every /keys/query at once, with no devices for each user asked about,
// and counts the users asked about.
type emptyKeysHS struct{ asked atomic.Int64 }

func (hs *emptyKeysHS) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	var req struct {
		DeviceKeys map[id.UserID][]id.DeviceID `json:"device_keys"`
	}
	body, _ := io.ReadAll(r.Body)
	_ = json.Unmarshal(body, &req)
	resp := make(map[id.UserID]struct{}, len(req.DeviceKeys))
	for u := range req.DeviceKeys {
		resp[u] = struct{}{}
	}
	hs.asked.Add(int64(len(req.DeviceKeys)))
	writeJSON(w, map[string]any{"device_keys": resp, "failures": map[string]any{}})
}

// benchMachine returns a Machine on a fresh SQLite database (the default, durable dbopen
// settings) whose OlmMachine tracks users, the database and its homeserver.
func benchMachine(b *testing.B, users []id.UserID) (*dbutil.Database, *Machine, *emptyKeysHS) {
	b.Helper()
	ctx := context.Background()
	db, err := dbopen.Open(filepath.Join(b.TempDir(), "bench.db"), dbopen.Config{})
	require.NoError(b, err)
	b.Cleanup(func() { _ = db.Close() })
	cli, err := mautrix.NewClient("https://hs.example.org", testUser, "token")
	require.NoError(b, err)
	cli.DeviceID = testDevice
	hs := &emptyKeysHS{}
	cli.Client = &http.Client{Transport: handlerTransport{hs}}
	log := zerolog.Nop()
	cli.Log = log
	cs := mcrypto.NewSQLCryptoStore(db, nil, "", testDevice, []byte("pickle key"))
	require.NoError(b, cs.DB.Upgrade(ctx))
	olm := mcrypto.NewOlmMachine(cli, &log, cs, mcrypto.StateStore(mautrix.NewMemoryStateStore().(mcrypto.StateStore)))
	require.NoError(b, olm.Load(ctx))
	m, err := New(cli, olm, Config{})
	require.NoError(b, err)
	require.NoError(b, m.Upgrade(ctx))
	require.NoError(b, db.DoTxn(ctx, nil, func(ctx context.Context) error {
		for _, u := range users {
			if err := cs.PutDevices(ctx, u, map[id.DeviceID]*id.Device{}); err != nil {
				return err
			}
		}
		return nil
	}))
	return db, m, hs
}

// BenchmarkDeviceListsChanged handles one response whose device_lists.changed lists 1 000
// users, all tracked:
//
//   - sdk: the e2ee Delta through Machine.HandleE2EE inside one commit transaction, as the
//     sliding sync store runs it; no network (Run queries later).
//   - sdk+query: the same, then what Run does next: one /keys/query for the 1 000 users and
//     the settle of their generations.
//   - mautrix: OlmMachine.HandleDeviceLists, which queries at once (FetchKeys) and stores each
//     user's device list in its own transaction.
//
// /keys/query is answered in-process at once, with no devices for each user.
func BenchmarkDeviceListsChanged(b *testing.B) {
	ctx := zerolog.Nop().WithContext(context.Background())
	users := make([]id.UserID, benchChangedUsers)
	for i := range users {
		users[i] = id.UserID(fmt.Sprintf("@user%04d:example.org", i))
	}
	commit := func(b *testing.B, db *dbutil.Database, m *Machine) {
		err := db.DoTxn(ctx, nil, func(ctx context.Context) error {
			return m.HandleE2EE(ctx, &e2ee.Delta{Changed: users})
		})
		if err != nil {
			b.Fatal(err)
		}
	}
	b.Run("sdk", func(b *testing.B) {
		db, m, hs := benchMachine(b, users)
		b.ReportAllocs()
		for b.Loop() {
			commit(b, db, m)
		}
		b.StopTimer()
		require.Len(b, outdatedOf(b, m), benchChangedUsers)
		require.Zero(b, hs.asked.Load())
	})
	b.Run("sdk+query", func(b *testing.B) {
		db, m, hs := benchMachine(b, users)
		b.ReportAllocs()
		n := 0
		for b.Loop() {
			n++
			commit(b, db, m)
			if _, err := m.refreshOutdated(ctx); err != nil {
				b.Fatal(err)
			}
		}
		b.StopTimer()
		require.Empty(b, outdatedOf(b, m))
		require.Equal(b, int64(n*benchChangedUsers), hs.asked.Load())
	})
	b.Run("mautrix", func(b *testing.B) {
		_, m, hs := benchMachine(b, users)
		dl := &mautrix.DeviceLists{Changed: users}
		b.ReportAllocs()
		n := 0
		for b.Loop() {
			n++
			m.olm.HandleDeviceLists(ctx, dl, "")
		}
		b.StopTimer()
		require.Equal(b, int64(n*benchChangedUsers), hs.asked.Load())
		tracked, err := m.store.FilterTrackedUsers(ctx, users)
		require.NoError(b, err)
		require.Len(b, tracked, benchChangedUsers)
	})
}

func outdatedOf(b *testing.B, m *Machine) []id.UserID {
	b.Helper()
	users, err := m.store.GetOutdatedTrackedUsers(context.Background())
	require.NoError(b, err)
	return users
}
