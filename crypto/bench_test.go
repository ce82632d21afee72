package crypto

import (
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"testing"

	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"
	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix"
	mcrypto "maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/sliding-e2ee/sdk/e2ee"
	"github.com/sliding-e2ee/sdk/slidingsync/sqlstore/dbopen"
)

const benchChangedUsers = 1000

// asked returns how many users the device's key queries asked about.
func (hs *fakeHS) asked() int {
	_, queries := hs.snapshot()
	n := 0
	for _, q := range queries {
		n += len(q)
	}
	return n
}

// benchMachine returns a Machine on a fresh SQLite database (the default, durable dbopen
// settings) whose OlmMachine tracks users, the database and its homeserver, which knows no
// device of them.
func benchMachine(b *testing.B, users []id.UserID) (*dbutil.Database, *Machine, *fakeHS) {
	b.Helper()
	ctx := context.Background()
	e := newDevice(b, Config{}, testUser, testDevice, filepath.Join(b.TempDir(), "bench.db"), dbopen.Config{})
	db, m, cs, hs := e.db, e.m, e.store, e.hs
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
			return m.record(ctx, &e2ee.Delta{Changed: users})
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
		require.Zero(b, hs.asked())
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
		require.Equal(b, n*benchChangedUsers, hs.asked())
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
		require.Equal(b, n*benchChangedUsers, hs.asked())
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

// benchDevice is newEnvAs for benchmarks: a device with uploaded keys on a fresh SQLite
// database (the default, durable dbopen settings).
func benchDevice(b *testing.B, user id.UserID, device id.DeviceID) *env {
	b.Helper()
	return newDevice(b, Config{}, user, device, filepath.Join(b.TempDir(), "bench.db"), dbopen.Config{})
}

// BenchmarkHandleRoomKey handles one Olm-encrypted m.room_key from a device the bot already
// has an Olm session with: through HandleToDevice (two decryptions, one transaction, the
// check that the key was stored), and through mautrix's OlmMachine.HandleToDeviceEvent alone
// (one decryption, autocommitted writes, a store failure only logged).
func BenchmarkHandleRoomKey(b *testing.B) {
	ctx := zerolog.Nop().WithContext(context.Background())
	for _, name := range []string{"sdk", "mautrix"} {
		b.Run(name, func(b *testing.B) {
			bot := benchDevice(b, testUser, testDevice)
			sender := benchDevice(b, "@sender:example.org", "SENDERDEV")
			require.NoError(b, bot.m.shareKeys(ctx))
			require.NoError(b, sender.m.shareKeys(ctx))
			device, err := sender.olm.GetOrFetchDevice(ctx, testUser, testDevice)
			require.NoError(b, err)
			const room id.RoomID = "!room:example.org"
			// One room key per iteration, made before the clock runs; the Olm session exists
			// after the first.
			message := func() (*event.Event, id.SessionID) {
				ogs, err := mcrypto.NewOutboundGroupSession(room, nil, nil)
				require.NoError(b, err)
				require.NoError(b, sender.olm.SendEncryptedToDevice(ctx, device, event.ToDeviceRoomKey, ogs.ShareContent()))
				evt := &event.Event{Sender: sender.cli.UserID, Type: event.ToDeviceEncrypted}
				evt.Type.Class = event.ToDeviceEventType
				require.NoError(b, json.Unmarshal(sender.hs.lastSent(b, testUser, testDevice), &evt.Content))
				require.NoError(b, evt.Content.ParseRaw(evt.Type))
				return evt, ogs.ID()
			}
			first, _ := message()
			require.NoError(b, bot.m.HandleToDevice(ctx, []*event.Event{first}))
			evts := make([]*event.Event, b.N)
			ids := make([]id.SessionID, b.N)
			for i := range evts {
				evts[i], ids[i] = message()
			}
			b.ReportAllocs()
			b.ResetTimer()
			for i := range b.N {
				if name == "sdk" {
					if err := bot.m.HandleToDevice(ctx, evts[i:i+1]); err != nil {
						b.Fatal(err)
					}
				} else {
					bot.olm.HandleToDeviceEvent(ctx, evts[i])
				}
			}
			b.StopTimer()
			for _, s := range ids {
				igs, err := bot.store.GetGroupSession(ctx, room, s)
				require.NoError(b, err)
				require.NotNil(b, igs)
			}
		})
	}
}
