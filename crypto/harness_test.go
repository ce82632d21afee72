package crypto

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
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

	"github.com/sliding-e2ee/sdk/slidingsync/slidingsynctest"
	"github.com/sliding-e2ee/sdk/slidingsync/sqlstore/dbopen"
)

const (
	testUser   id.UserID   = "@bot:example.org"
	testDevice id.DeviceID = "BOTDEVICE"
)

// fakeHS is the key API of a homeserver: /keys/upload, /keys/query and /keys/claim. It keeps
// the uploaded keys and counts the one-time keys it holds, as a server does.
type fakeHS struct {
	t *testing.T

	mu           sync.Mutex
	uploads      []json.RawMessage // every non-empty /keys/upload body
	emptyUploads int               // /keys/upload with nothing to upload (count checks)
	deviceKeys   json.RawMessage
	otks         map[string]json.RawMessage
	fallback     map[string]json.RawMessage
	queries      [][]id.UserID
	failQueries  int                           // the next failQueries /keys/query answer 500
	failUploads  int                           // the next failUploads non-empty /keys/upload are stored, then answered 504 (a timeout)
	otkConflicts int                           // one-time key IDs uploaded again with another key (a server rejects them)
	queryHook    func(users []id.UserID)       // runs inside /keys/query, may block
	userDevices  map[id.UserID]json.RawMessage // device_keys answered per user; default {}

	// self is the device whose keys are uploaded here; peers are other devices' servers,
	// whose device keys /keys/query and whose one-time keys (then fallback keys) /keys/claim
	// answer.
	self       id.UserID
	selfDevice id.DeviceID
	peers      []*fakeHS
	sent       []json.RawMessage // /sendToDevice bodies

	members       map[id.RoomID][]id.UserID // joined members answered by /rooms/{id}/members
	memberFetches int
}

func newFakeHS(t *testing.T) *fakeHS {
	return &fakeHS{t: t, otks: map[string]json.RawMessage{}, fallback: map[string]json.RawMessage{}}
}

func (hs *fakeHS) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	switch {
	case strings.Contains(r.URL.Path, "/sendToDevice/"):
		hs.mu.Lock()
		hs.sent = append(hs.sent, json.RawMessage(body))
		hs.mu.Unlock()
		writeJSON(w, map[string]any{})
	case strings.HasSuffix(r.URL.Path, "/members"):
		roomID := id.RoomID(strings.TrimSuffix(strings.TrimPrefix(r.URL.Path, "/_matrix/client/v3/rooms/"), "/members"))
		hs.mu.Lock()
		hs.memberFetches++
		var chunk []map[string]any
		for _, u := range hs.members[roomID] {
			chunk = append(chunk, map[string]any{"type": "m.room.member", "state_key": u, "sender": u, "room_id": roomID,
				"event_id": "$" + string(u), "content": map[string]any{"membership": "join"}})
		}
		hs.mu.Unlock()
		writeJSON(w, map[string]any{"chunk": chunk})
	case strings.HasSuffix(r.URL.Path, "/keys/claim"):
		var req struct {
			OneTimeKeys map[id.UserID]map[id.DeviceID]string `json:"one_time_keys"`
		}
		_ = json.Unmarshal(body, &req)
		out := map[id.UserID]map[id.DeviceID]map[string]json.RawMessage{}
		for _, p := range hs.peers {
			if _, ok := req.OneTimeKeys[p.self][p.selfDevice]; !ok {
				continue
			}
			p.mu.Lock()
			for k, v := range p.otks {
				out[p.self] = map[id.DeviceID]map[string]json.RawMessage{p.selfDevice: {k: v}}
				delete(p.otks, k)
				break
			}
			if out[p.self] == nil {
				for k, v := range p.fallback {
					out[p.self] = map[id.DeviceID]map[string]json.RawMessage{p.selfDevice: {k: v}}
				}
			}
			p.mu.Unlock()
		}
		writeJSON(w, map[string]any{"one_time_keys": out, "failures": map[string]any{}})
	case strings.HasSuffix(r.URL.Path, "/keys/upload"):
		var req struct {
			DeviceKeys   json.RawMessage            `json:"device_keys"`
			OneTimeKeys  map[string]json.RawMessage `json:"one_time_keys"`
			FallbackKeys map[string]json.RawMessage `json:"fallback_keys"`
		}
		if err := json.Unmarshal(body, &req); err != nil {
			w.WriteHeader(http.StatusBadRequest)
			return
		}
		hs.mu.Lock()
		if len(req.DeviceKeys) == 0 && len(req.OneTimeKeys) == 0 && len(req.FallbackKeys) == 0 {
			hs.emptyUploads++
		} else {
			hs.uploads = append(hs.uploads, json.RawMessage(body))
		}
		if len(req.DeviceKeys) > 0 {
			hs.deviceKeys = req.DeviceKeys
		}
		for k, v := range req.OneTimeKeys {
			if old, ok := hs.otks[k]; ok && !bytes.Equal(old, v) {
				hs.otkConflicts++
			}
			hs.otks[k] = v
		}
		if len(req.FallbackKeys) > 0 {
			hs.fallback = req.FallbackKeys
		}
		n := 0
		for k := range hs.otks {
			if strings.HasPrefix(k, "signed_curve25519:") {
				n++
			}
		}
		fail := hs.failUploads > 0 && (len(req.DeviceKeys) > 0 || len(req.OneTimeKeys) > 0 || len(req.FallbackKeys) > 0)
		if fail {
			hs.failUploads--
		}
		hs.mu.Unlock()
		if fail {
			w.WriteHeader(http.StatusGatewayTimeout)
			return
		}
		writeJSON(w, map[string]any{"one_time_key_counts": map[string]int{"signed_curve25519": n}})
	case strings.HasSuffix(r.URL.Path, "/keys/query"):
		var req struct {
			DeviceKeys map[id.UserID][]id.DeviceID `json:"device_keys"`
		}
		_ = json.Unmarshal(body, &req)
		users := make([]id.UserID, 0, len(req.DeviceKeys))
		for u := range req.DeviceKeys {
			users = append(users, u)
		}
		slices.Sort(users)
		hs.mu.Lock()
		hs.queries = append(hs.queries, users)
		hook := hs.queryHook
		fail := hs.failQueries > 0
		if fail {
			hs.failQueries--
		}
		hs.mu.Unlock()
		if hook != nil {
			hook(users)
		}
		if fail {
			w.WriteHeader(http.StatusInternalServerError)
			writeJSON(w, map[string]string{"errcode": "M_UNKNOWN", "error": "try later"})
			return
		}
		resp := map[id.UserID]json.RawMessage{}
		hs.mu.Lock()
		for _, u := range users {
			if dk, ok := hs.userDevices[u]; ok {
				resp[u] = dk
			} else if p := hs.peerOf(u); p != nil {
				p.mu.Lock()
				resp[u] = json.RawMessage(`{"` + string(p.selfDevice) + `":` + string(p.deviceKeys) + `}`)
				p.mu.Unlock()
			} else {
				resp[u] = json.RawMessage(`{}`)
			}
		}
		hs.mu.Unlock()
		writeJSON(w, map[string]any{"device_keys": resp, "failures": map[string]any{}})
	default:
		w.WriteHeader(http.StatusNotFound)
		writeJSON(w, map[string]string{"errcode": "M_UNRECOGNIZED", "error": "not here"})
	}
}

func (hs *fakeHS) peerOf(u id.UserID) *fakeHS {
	for _, p := range hs.peers {
		if p.self == u {
			return p
		}
	}
	return nil
}

// link makes every server answer for the devices of the others.
func link(envs ...*env) {
	for _, e := range envs {
		for _, o := range envs {
			if o != e {
				e.hs.peers = append(e.hs.peers, o.hs)
			}
		}
	}
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(v)
}

func (hs *fakeHS) snapshot() (uploads []json.RawMessage, queries [][]id.UserID) {
	hs.mu.Lock()
	defer hs.mu.Unlock()
	return slices.Clone(hs.uploads), slices.Clone(hs.queries)
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
	hs := newFakeHS(t)
	hs.self, hs.selfDevice = user, device
	e := newDevice(t, cfg, user, device, target, dbopen.Config{RelaxedSync: true}, hs)
	e.t, e.hs = t, hs
	return e
}

// newDevice builds a device: a client whose requests go to handler in-process, a goolm
// OlmMachine on a crypto store in the database target, and a Machine. The env's t and hs are
// left for the caller.
func newDevice(tb testing.TB, cfg Config, user id.UserID, device id.DeviceID, target string, dbCfg dbopen.Config, handler http.Handler) *env {
	tb.Helper()
	ctx := context.Background()
	db, err := dbopen.Open(target, dbCfg)
	require.NoError(tb, err)
	tb.Cleanup(func() { _ = db.Close() })
	cli, err := mautrix.NewClient("https://hs.example.org", user, "token")
	require.NoError(tb, err)
	cli.DeviceID = device
	cli.Client = &http.Client{Transport: slidingsynctest.HandlerTransport(handler)}
	log := zerolog.Nop()
	cli.Log = log
	cs := mcrypto.NewSQLCryptoStore(db, nil, "", device, []byte("pickle key"))
	require.NoError(tb, cs.DB.Upgrade(ctx))
	olm := mcrypto.NewOlmMachine(cli, &log, cs, mcrypto.StateStore(mautrix.NewMemoryStateStore().(mcrypto.StateStore)))
	require.NoError(tb, olm.Load(ctx))
	m, err := New(cli, olm, cfg)
	require.NoError(tb, err)
	require.NoError(tb, m.Upgrade(ctx))
	return &env{db: db, cli: cli, olm: olm, store: cs, m: m}
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
