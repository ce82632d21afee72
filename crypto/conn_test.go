package crypto

import (
	"context"
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"github.com/rs/zerolog"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"maunium.net/go/mautrix/id"

	"github.com/sliding-e2ee/sdk/e2ee"
	"github.com/sliding-e2ee/sdk/slidingsync"
	"github.com/sliding-e2ee/sdk/slidingsync/slidingsynctest"
	"github.com/sliding-e2ee/sdk/slidingsync/sqlstore"
)

// routeTransport sends the key API to the fake homeserver and the rest to the fake sliding
// sync server.
type routeTransport struct {
	keys http.RoundTripper
	rest http.RoundTripper
}

func (t routeTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	if strings.Contains(req.URL.Path, "/keys/") {
		return t.keys.RoundTrip(req)
	}
	return t.rest.RoundTrip(req)
}

// The Machine on a real connection: the e2ee extension's device-list changes are recorded in
// the commit and queried by Run, the device's keys (one-time and fallback) are uploaded on
// first setup, and empty counts of a later response top one-time keys up.
func TestMachineOnConnection(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		e := newEnv(t, Config{})
		defer e.db.Close()
		srv := slidingsynctest.NewServer(slidingsynctest.Options{UserID: testUser, DeviceID: testDevice, AccessToken: e.cli.AccessToken})
		e.cli.Client.Transport = routeTransport{keys: slidingsynctest.HandlerTransport(e.hs), rest: slidingsynctest.HandlerTransport(srv)}
		e.cli.Log = zerolog.New(zerolog.NewTestWriter(t))
		e.track(alice, bob)

		store := sqlstore.New(e.db, nil)
		require.NoError(t, store.Upgrade(context.Background()))
		exts, release, err := e2ee.New(testUser, testDevice, e2ee.Config{Consumer: e.m, ToDevice: e.m.HandleToDevice})
		require.NoError(t, err)
		defer release()
		conn, err := slidingsync.New(e.cli, slidingsync.Config{Store: store, Extensions: exts})
		require.NoError(t, err)

		// settle lets every goroutine finish its work. A goroutine whose SQLite write met
		// another one's lock waits in the driver's busy handler on a (fake) timer, so fake
		// time has to move for it to go on.
		settle := func() {
			for range 5 {
				synctest.Wait()
				time.Sleep(100 * time.Millisecond)
			}
			synctest.Wait()
		}
		push := func(e2eeBody string) {
			srv.Push(&slidingsync.Response{Extensions: map[string]json.RawMessage{
				"e2ee":      json.RawMessage(e2eeBody),
				"to_device": json.RawMessage(`{"next_batch": "t1", "events": []}`),
			}})
		}
		// The first response is a gap: every tracked user is outdated.
		push(`{"device_one_time_keys_count": {"signed_curve25519": 0}, "device_unused_fallback_key_types": []}`)

		ctx, cancel := context.WithCancel(zerolog.New(zerolog.NewTestWriter(t)).WithContext(context.Background()))
		connDone, machDone := make(chan error, 1), make(chan error, 1)
		go func() { connDone <- conn.Run(ctx) }()
		go func() { machDone <- e.m.Run(ctx) }()
		settle()

		uploads, queries := e.hs.snapshot()
		assert.Equal(t, [][]id.UserID{{alice, bob}}, queries)
		require.Equal(t, 2, len(uploads), "device and one-time keys, then the fallback key")
		first := decodeUpload(t, uploads[0])
		assert.NotEmpty(t, first.DeviceKeys)
		assert.Len(t, first.OneTimeKeys, 50)
		assert.Len(t, decodeUpload(t, uploads[1]).FallbackKeys, 1)
		assert.Empty(t, e.outdated())

		// A change of one user; the counts are now what the server holds.
		push(`{"device_lists": {"changed": ["@bob:example.org"], "left": ["@alice:example.org"]}, "device_one_time_keys_count": {"signed_curve25519": 50}, "device_unused_fallback_key_types": ["signed_curve25519"]}`)
		settle()
		uploads, queries = e.hs.snapshot()
		assert.Equal(t, [][]id.UserID{{alice, bob}, {bob}}, queries)
		assert.Equal(t, 2, len(uploads))
		tracked, err := e.store.FilterTrackedUsers(context.Background(), []id.UserID{alice, bob})
		require.NoError(t, err)
		assert.Equal(t, []id.UserID{bob}, tracked)

		cancel()
		assert.ErrorIs(t, <-connDone, context.Canceled)
		assert.ErrorIs(t, <-machDone, context.Canceled)
		srv.Close()
	})
}
