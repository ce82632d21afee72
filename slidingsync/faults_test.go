package slidingsync_test

import (
	"context"
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"maunium.net/go/mautrix"

	"github.com/sliding-e2ee/sdk/slidingsync"
	"github.com/sliding-e2ee/sdk/slidingsync/slidingsynctest"
)

// TestTransportFaultsOverRealSockets breaks connections the way networks do (a reset before
// any answer, a body cut off mid-way, a body that trickles in past the HTTP timeout) and checks
// that the loop retries each and converges on the scripted answer, applying nothing broken.
func TestTransportFaultsOverRealSockets(t *testing.T) {
	srv := slidingsynctest.NewServer(slidingsynctest.Options{})
	var calls atomic.Int32
	hs := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != slidingsync.ProtocolMSC4186.Path() {
			srv.ServeHTTP(w, r)
			return
		}
		switch calls.Add(1) {
		case 1: // reset before answering
			conn, _, err := w.(http.Hijacker).Hijack()
			if err == nil {
				_ = conn.Close()
			}
		case 2: // a body cut off mid-way
			w.Header().Set("Content-Length", "4096")
			w.WriteHeader(http.StatusOK)
			_, _ = w.Write([]byte(`{"pos":"cut","rooms":{"!x:x":`))
			conn, _, err := w.(http.Hijacker).Hijack()
			if err == nil {
				_ = conn.Close()
			}
		case 3: // a body that trickles in slower than the HTTP timeout allows
			w.WriteHeader(http.StatusOK)
			_, _ = w.Write([]byte(`{"pos":"slow",`))
			w.(http.Flusher).Flush()
			select {
			case <-r.Context().Done():
			case <-time.After(10 * time.Second):
			}
		default:
			srv.ServeHTTP(w, r)
		}
	}))
	defer hs.Close()
	srv.Push(roomResp("good", "!good:x"))

	cli, err := mautrix.NewClient(hs.URL, srv.Options().UserID, srv.Options().AccessToken)
	require.NoError(t, err)
	cli.DeviceID = srv.Options().DeviceID
	conn, err := slidingsync.New(cli, slidingsync.Config{
		Protocol:      slidingsync.ProtocolMSC4186,
		MinBackoff:    10 * time.Millisecond,
		MaxBackoff:    40 * time.Millisecond,
		TimeoutMargin: 300 * time.Millisecond,
		NoPollTimeout: 300 * time.Millisecond,
	})
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- conn.Run(ctx) }()
	for conn.Pos() != "good" && ctx.Err() == nil {
		time.Sleep(10 * time.Millisecond)
	}
	cancel()
	require.ErrorIs(t, <-done, context.Canceled)
	assert.Equal(t, "good", conn.Pos(), "converged after the faults")
	assert.GreaterOrEqual(t, calls.Load(), int32(4))
	_, ok := conn.Room("!x:x")
	assert.False(t, ok, "nothing of a cut-off body was applied")
	_, ok = conn.Room("!good:x")
	assert.True(t, ok)
}
