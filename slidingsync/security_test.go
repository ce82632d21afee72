package slidingsync_test

import (
	"context"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"testing"
	"testing/synctest"

	"github.com/rs/zerolog"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/event"

	"github.com/sliding-e2ee/sdk/slidingsync"
	"github.com/sliding-e2ee/sdk/slidingsync/slidingsynctest"
)

// countingTransport counts the requests that would leave the process.
type countingTransport struct {
	mu   sync.Mutex
	hits []string
}

func (c *countingTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	c.mu.Lock()
	c.hits = append(c.hits, req.URL.String())
	c.mu.Unlock()
	return jsonResponse(http.StatusOK, `{}`, nil), nil
}

func TestPasswordLoginToPlainHTTPRemoteHostSendsNothing(t *testing.T) {
	inner := &countingTransport{}
	cli, err := mautrix.NewClient("http://matrix.example.org", "", "")
	require.NoError(t, err)
	cli.Client = &http.Client{Transport: slidingsync.RefuseInsecureHTTP(inner)}
	cli.DefaultHTTPRetries = 0
	_, err = cli.Login(context.Background(), &mautrix.ReqLogin{
		Type:       mautrix.AuthTypePassword,
		Identifier: mautrix.UserIdentifier{Type: mautrix.IdentifierTypeUser, User: "bot"},
		Password:   "hunter2",
	})
	require.ErrorIs(t, err, slidingsync.ErrInsecureHTTP)
	assert.Empty(t, inner.hits, "no request left")

	for _, ok := range []string{"https://matrix.example.org", "http://127.0.0.1:8008", "http://localhost:8008", "http://[::1]:8008"} {
		cli.HomeserverURL = mustURL(t, ok)
		_, err = cli.Versions(context.Background())
		require.NoError(t, err, ok)
	}
	assert.Len(t, inner.hits, 4)
}

func TestNewRefusesPlainHTTPToRemoteHomeserver(t *testing.T) {
	cli, err := mautrix.NewClient("http://matrix.example.org", "@bot:example.org", "token")
	require.NoError(t, err)
	cli.DeviceID = "DEV"
	_, err = slidingsync.New(cli, slidingsync.Config{})
	require.ErrorIs(t, err, slidingsync.ErrInsecureHTTP)
	_, err = slidingsync.New(cli, slidingsync.Config{AllowInsecureHTTP: true})
	require.NoError(t, err)
}

func TestRedactRequestBodiesKeepsMessagesOutOfMautrixLogs(t *testing.T) {
	const secret = "echo: the plaintext of an unencrypted room"
	hs := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusInternalServerError)
		_, _ = w.Write([]byte(`{"errcode":"M_UNKNOWN","error":"boom"}`))
	}))
	defer hs.Close()
	for _, redact := range []bool{true, false} {
		var logs strings.Builder
		var mu sync.Mutex
		var w = zerolog.SyncWriter(&lockedWriter{w: &logs, mu: &mu})
		if redact {
			w = slidingsync.RedactRequestBodies(w)
		}
		cli, err := mautrix.NewClient(hs.URL, "@bot:example.org", "token")
		require.NoError(t, err)
		cli.DefaultHTTPRetries = 0
		cli.Log = zerolog.New(w).Level(zerolog.TraceLevel)
		_, err = cli.SendMessageEvent(context.Background(), "!room:example.org", event.EventMessage, map[string]any{"msgtype": "m.text", "body": secret})
		require.Error(t, err)
		mu.Lock()
		out := logs.String()
		mu.Unlock()
		assert.Contains(t, out, "/send/m.room.message/", "the request was logged")
		if redact {
			assert.NotContains(t, out, secret)
			assert.Contains(t, out, `"status_code":500`, "the rest of the line is kept")
		} else {
			assert.Contains(t, out, secret, "mautrix logs request bodies: the test would catch a leak")
		}
	}
}

func mustURL(t *testing.T, raw string) *url.URL {
	t.Helper()
	u, err := url.Parse(raw)
	require.NoError(t, err)
	return u
}

func TestDiscoveryOfAnUnreachableHomeserverSaysSo(t *testing.T) {
	hs := httptest.NewServer(http.NotFoundHandler())
	addr := hs.URL
	hs.Close() // nothing listens there any more
	cli, err := mautrix.NewClient(addr, "@bot:example.org", "token")
	require.NoError(t, err)
	cli.DefaultHTTPRetries = 0
	_, err = slidingsync.Discover(context.Background(), cli, slidingsync.ProtocolAuto)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "cannot reach the homeserver")
	assert.NotErrorIs(t, err, slidingsync.ErrNotAdvertised, "nothing is known about sliding sync")
}

func TestForcedDialectTheServerLacksNamesItselfAndItsURL(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		srv := slidingsynctest.NewServer(slidingsynctest.Options{Protocol: slidingsync.ProtocolMSC3575})
		h := startWith(t, srv, srv.NewClient(), slidingsync.ProtocolMSC4186, slidingsync.Config{})
		h.run()
		err := <-h.done
		h.cancel()
		require.ErrorIs(t, err, mautrix.MUnrecognized)
		assert.Contains(t, err.Error(), "msc4186")
		assert.Contains(t, err.Error(), srv.Options().HomeserverURL)
	})
}
