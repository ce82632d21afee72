package slidingsync_test

import (
	"context"
	"crypto/tls"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"maunium.net/go/mautrix"

	"github.com/sliding-e2ee/sdk/slidingsync"
	"github.com/sliding-e2ee/sdk/slidingsync/slidingsynctest"
)

// TestSelfSignedHomeserverIsRefused checks that TLS verification stays on by default: against
// an HTTPS homeserver whose self-signed certificate the client was not given, no request
// reaches the server (so no access token leaves), and the loop reports a certificate error.
func TestSelfSignedHomeserverIsRefused(t *testing.T) {
	for _, proto := range []slidingsync.Protocol{slidingsync.ProtocolMSC4186, slidingsync.ProtocolAuto} {
		t.Run(proto.String(), func(t *testing.T) {
			srv := slidingsynctest.NewServer(slidingsynctest.Options{})
			var served, handshakes atomic.Int32
			hs := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				served.Add(1)
				srv.ServeHTTP(w, r)
			}))
			hs.Config.ErrorLog = newDiscardLog()
			hs.TLS = &tls.Config{GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
				handshakes.Add(1)
				return nil, nil
			}}
			hs.StartTLS()
			defer hs.Close()
			require.True(t, strings.HasPrefix(hs.URL, "https://127.0.0.1:"))

			cli, err := mautrix.NewClient(hs.URL, srv.Options().UserID, srv.Options().AccessToken)
			require.NoError(t, err)
			cli.DeviceID = srv.Options().DeviceID
			var logs strings.Builder
			var mu sync.Mutex
			cli.Log = zerolog.New(&lockedWriter{w: &logs, mu: &mu}).Level(zerolog.WarnLevel)
			conn, err := slidingsync.New(cli, slidingsync.Config{
				Protocol:   proto,
				MinBackoff: 10 * time.Millisecond,
				MaxBackoff: 20 * time.Millisecond,
			})
			require.NoError(t, err)
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			done := make(chan error, 1)
			go func() { done <- conn.Run(ctx) }()
			for handshakes.Load() < 3 && ctx.Err() == nil {
				time.Sleep(5 * time.Millisecond)
			}
			cancel()
			require.ErrorIs(t, <-done, context.Canceled)

			assert.GreaterOrEqual(t, handshakes.Load(), int32(3), "the client tried, and retried")
			assert.Zero(t, served.Load(), "no request got past the handshake")
			assert.Empty(t, conn.Pos())
			mu.Lock()
			defer mu.Unlock()
			assert.Contains(t, logs.String(), "certificate", "the failure names the certificate")
		})
	}
}
