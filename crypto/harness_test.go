package crypto

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"maps"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"
	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix"
	mcrypto "maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/id"

	"github.com/sliding-e2ee/sdk/internal/minihs"
	"github.com/sliding-e2ee/sdk/slidingsync/slidingsynctest"
	"github.com/sliding-e2ee/sdk/slidingsync/sqlstore/dbopen"
)

const (
	testUser   id.UserID   = "@bot:example.org"
	testDevice id.DeviceID = "BOTDEVICE"
)

// servers holds each test's homeserver: one minihs without a listener (it may run inside a
// testing/synctest bubble), shared by the test's devices.
var servers sync.Map // testing.TB → *minihs.Server

func serverOf(tb testing.TB) *minihs.Server {
	if srv, ok := servers.Load(tb); ok {
		return srv.(*minihs.Server)
	}
	srv, err := minihs.NewServer(minihs.Options{Rooms: -1, Dir: tb.TempDir(), NoListener: true})
	require.NoError(tb, err)
	servers.Store(tb, srv)
	tb.Cleanup(func() {
		servers.Delete(tb)
		srv.Close()
	})
	return srv
}

// fakeHS is one device's way to the test's homeserver: it keeps the bodies of the device's
// requests that the tests look at and injects the failures they need.
type fakeHS struct {
	srv *minihs.Server

	mu            sync.Mutex
	uploads       []json.RawMessage       // every non-empty /keys/upload body
	countChecks   int                     // empty /keys/upload requests (asking for the counts)
	queries       [][]id.UserID           // the users of every /keys/query, sorted
	sent          []json.RawMessage       // /sendToDevice bodies
	memberFetches int                     // /rooms/{id}/members requests
	failQueries   int                     // the next failQueries /keys/query answer 500
	failUploads   int                     // the next failUploads non-empty /keys/upload are stored, then answered 504 (a timeout)
	queryHook     func(users []id.UserID) // runs inside /keys/query, may block
}

func (hs *fakeHS) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	r.Body = io.NopCloser(bytes.NewReader(body))
	var req struct {
		DeviceKeys   json.RawMessage            `json:"device_keys"`
		OneTimeKeys  map[string]json.RawMessage `json:"one_time_keys"`
		FallbackKeys map[string]json.RawMessage `json:"fallback_keys"`
	}
	_ = json.Unmarshal(body, &req)
	hs.mu.Lock()
	fail := 0
	switch {
	case strings.Contains(r.URL.Path, "/sendToDevice/"):
		hs.sent = append(hs.sent, body)
	case strings.HasSuffix(r.URL.Path, "/members"):
		hs.memberFetches++
	case strings.HasSuffix(r.URL.Path, "/keys/upload") && (len(req.DeviceKeys) > 0 || len(req.OneTimeKeys) > 0 || len(req.FallbackKeys) > 0):
		hs.uploads = append(hs.uploads, body)
		if hs.failUploads > 0 {
			hs.failUploads, fail = hs.failUploads-1, http.StatusGatewayTimeout
		}
	case strings.HasSuffix(r.URL.Path, "/keys/upload"):
		hs.countChecks++
	case strings.HasSuffix(r.URL.Path, "/keys/query"):
		var q struct {
			DeviceKeys map[id.UserID][]id.DeviceID `json:"device_keys"`
		}
		_ = json.Unmarshal(body, &q)
		users := slices.Sorted(maps.Keys(q.DeviceKeys))
		hs.queries = append(hs.queries, users)
		if hook := hs.queryHook; hook != nil {
			hs.mu.Unlock()
			hook(users)
			hs.mu.Lock()
		}
		if hs.failQueries > 0 {
			hs.failQueries, fail = hs.failQueries-1, http.StatusInternalServerError
		}
	}
	hs.mu.Unlock()
	switch fail {
	case http.StatusInternalServerError:
		w.WriteHeader(fail)
		_, _ = w.Write([]byte(`{"errcode":"M_UNKNOWN","error":"try later"}`))
	case http.StatusGatewayTimeout:
		hs.srv.Handler().ServeHTTP(httptest.NewRecorder(), r)
		w.WriteHeader(fail)
	default:
		hs.srv.Handler().ServeHTTP(w, r)
	}
}

func (hs *fakeHS) snapshot() (uploads []json.RawMessage, queries [][]id.UserID) {
	hs.mu.Lock()
	defer hs.mu.Unlock()
	return slices.Clone(hs.uploads), slices.Clone(hs.queries)
}

// lastSent returns the content of the last to-device message hs's device sent to a device.
func (hs *fakeHS) lastSent(tb testing.TB, user id.UserID, dev id.DeviceID) json.RawMessage {
	tb.Helper()
	hs.mu.Lock()
	defer hs.mu.Unlock()
	require.NotEmpty(tb, hs.sent)
	var body struct {
		Messages map[id.UserID]map[id.DeviceID]json.RawMessage `json:"messages"`
	}
	require.NoError(tb, json.Unmarshal(hs.sent[len(hs.sent)-1], &body))
	return body.Messages[user][dev]
}

// claimAll claims every one-time key the server holds for the device of e, as senders do.
func (e *env) claimAll() {
	e.t.Helper()
	for {
		if n, _, _ := e.hs.srv.KeyCounts(e.cli.UserID, e.cli.DeviceID); n == 0 {
			return
		}
		_, err := e.cli.ClaimKeys(context.Background(), &mautrix.ReqClaimKeys{OneTimeKeys: mautrix.OneTimeKeysRequest{
			e.cli.UserID: {e.cli.DeviceID: id.KeyAlgorithmSignedCurve25519}}})
		require.NoError(e.t, err)
	}
}

// env is a bot device: a real goolm OlmMachine on a SQLite crypto store and a Machine.
type env struct {
	t     *testing.T
	hs    *fakeHS
	db    *dbutil.Database
	cli   *mautrix.Client
	olm   *mcrypto.OlmMachine
	store *mcrypto.SQLCryptoStore
	m     *Machine
}

func newEnv(t *testing.T, cfg Config) *env {
	t.Helper()
	return newEnvAs(t, cfg, testUser, testDevice)
}

func newEnvAs(t *testing.T, cfg Config, user id.UserID, device id.DeviceID) *env {
	t.Helper()
	return newEnvOn(t, cfg, user, device, filepath.Join(t.TempDir(), "bot.db"))
}

// newEnvOn builds a device on the database target: a SQLite path or a postgres:// URI.
func newEnvOn(t *testing.T, cfg Config, user id.UserID, device id.DeviceID, target string) *env {
	t.Helper()
	e := newDevice(t, cfg, user, device, target, dbopen.Config{RelaxedSync: true})
	e.t = t
	return e
}

// newDevice builds a device: a client whose requests go to the test's homeserver in-process,
// a goolm OlmMachine on a crypto store in the database target, and a Machine. The env's t is
// left for the caller.
func newDevice(tb testing.TB, cfg Config, user id.UserID, device id.DeviceID, target string, dbCfg dbopen.Config) *env {
	tb.Helper()
	return buildDevice(tb, cfg, user, device, target, dbCfg, "token_"+device.String(), []byte("pickle key"), zerolog.Nop())
}

// buildDevice is newDevice with the device's access token and pickle key, and the logger of
// its client and OlmMachine.
func buildDevice(tb testing.TB, cfg Config, user id.UserID, device id.DeviceID, target string, dbCfg dbopen.Config,
	token string, pickleKey []byte, log zerolog.Logger) *env {
	tb.Helper()
	ctx := log.WithContext(context.Background())
	db, err := dbopen.Open(target, dbCfg)
	require.NoError(tb, err)
	tb.Cleanup(func() { _ = db.Close() })
	hs := &fakeHS{srv: serverOf(tb)}
	hs.srv.SetToken(token, user, device)
	cli, err := mautrix.NewClient("https://hs.example.org", user, token)
	require.NoError(tb, err)
	cli.DeviceID = device
	cli.Client = &http.Client{Transport: slidingsynctest.HandlerTransport(hs)}
	cli.Log = log
	cs := mcrypto.NewSQLCryptoStore(db, nil, "", device, pickleKey)
	require.NoError(tb, cs.DB.Upgrade(ctx))
	olm := mcrypto.NewOlmMachine(cli, &log, cs, mcrypto.StateStore(mautrix.NewMemoryStateStore().(mcrypto.StateStore)))
	require.NoError(tb, olm.Load(ctx))
	m, err := New(cli, olm, cfg)
	require.NoError(tb, err)
	require.NoError(tb, m.Upgrade(ctx))
	return &env{hs: hs, db: db, cli: cli, olm: olm, store: cs, m: m}
}

// track makes mautrix track users (as if their devices had been fetched).
func (e *env) track(users ...id.UserID) {
	for _, u := range users {
		require.NoError(e.t, e.store.PutDevices(context.Background(), u, map[id.DeviceID]*id.Device{}))
	}
}

func (e *env) outdated() []id.UserID {
	users, err := e.store.GetOutdatedTrackedUsers(context.Background())
	require.NoError(e.t, err)
	slices.Sort(users)
	return users
}
