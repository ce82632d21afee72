package crypto

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"
	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix"
	mcrypto "maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/id"

	"github.com/sliding-e2ee/sdk/e2ee"
	"github.com/sliding-e2ee/sdk/internal/crashtest"
	"github.com/sliding-e2ee/sdk/slidingsync"
	"github.com/sliding-e2ee/sdk/slidingsync/sqlstore/dbopen"
)

const (
	envCrashChild = "CRYPTO_CRASH_CHILD" // set in the child: the database path
	envCrashURL   = "CRYPTO_CRASH_URL"
	envCrashFinal = "CRYPTO_CRASH_FINAL" // the child runs until everything is settled, then exits 0
	// envCrashKills overrides how many times the crash test kills its child.
	envCrashKills = "CRYPTO_CRASH_KILLS"
	// envCrashSeed fixes the crash test's kill plan, to replay a failure.
	envCrashSeed = "CRYPTO_CRASH_SEED"

	crashUsers     = 8
	crashPickleKey = "crash pickle key"
)

func crashUser(i int) id.UserID { return id.UserID(fmt.Sprintf("@u%02d:example.org", i)) }

// crashDevice is the device a user adds with their v-th device-list change.
func crashDevice(v int) id.DeviceID { return id.DeviceID(fmt.Sprintf("D%d", v)) }

// crashDevices are the devices of a user after their v-th change: each change adds one and
// drops the oldest of four.
func crashDevices(v int) []int {
	var out []int
	for i := max(1, v-2); i <= v; i++ {
		out = append(out, i)
	}
	return out
}

// openCrashMachine opens the Machine of the crash test's bot on the database at path, against
// the homeserver at url.
func openCrashMachine(ctx context.Context, path, url string) (*dbutil.Database, *Machine, error) {
	db, err := dbopen.Open(path, dbopen.Config{RelaxedSync: true})
	if err != nil {
		return nil, nil, err
	}
	cli, err := mautrix.NewClient(url, testUser, "token")
	if err != nil {
		return nil, nil, err
	}
	cli.DeviceID = testDevice
	cli.DefaultHTTPRetries = 0
	log := zerolog.Nop()
	cli.Log = log
	cs := mcrypto.NewSQLCryptoStore(db, nil, "", testDevice, []byte(crashPickleKey))
	if err := cs.DB.Upgrade(ctx); err != nil {
		return nil, nil, err
	}
	olm := mcrypto.NewOlmMachine(cli, &log, cs, mcrypto.StateStore(mautrix.NewMemoryStateStore().(mcrypto.StateStore)))
	if err := olm.Load(ctx); err != nil {
		return nil, nil, err
	}
	m, err := New(cli, olm, Config{
		MinRetryDelay: time.Millisecond, MaxRetryDelay: 5 * time.Millisecond,
		FallbackKeyRotation: time.Millisecond, FallbackKeyGrace: 5 * time.Millisecond,
	})
	if err != nil {
		return nil, nil, err
	}
	if err := m.Upgrade(ctx); err != nil {
		return nil, nil, err
	}
	_, err = db.Exec(ctx, `CREATE TABLE IF NOT EXISTS crash_cursor (next BIGINT NOT NULL)`)
	return db, m, err
}

// TestMachineCrashChild is the child process of TestMachineCrash; it skips unless started by
// it.
func TestMachineCrashChild(t *testing.T) {
	path := os.Getenv(envCrashChild)
	if path == "" {
		t.Skip("started by TestMachineCrash only")
	}
	if err := crashChild(path, os.Getenv(envCrashURL), os.Getenv(envCrashFinal) != ""); err != nil {
		fmt.Fprintln(os.Stderr, "crash child:", err)
		os.Exit(1)
	}
	fmt.Println("done")
	os.Exit(0)
}

// crashChild is a bot's sync loop in miniature: it polls the parent's /changes (the device
// lists and fallback key report of a sliding sync response), records them with HandleE2EE and
// its cursor in one transaction, as sqlstore's commit does with pos, and lets Machine.Run do
// the network work. In the final run it returns once everything is settled.
func crashChild(path, url string, final bool) error {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	db, m, err := openCrashMachine(ctx, path, url)
	if err != nil {
		return err
	}
	all := make([]id.UserID, crashUsers)
	for i := range all {
		all[i] = crashUser(i)
	}
	tracked, err := m.store.FilterTrackedUsers(ctx, all)
	if err != nil {
		return err
	}
	for _, u := range all {
		if !slices.Contains(tracked, u) {
			if err := m.store.PutDevices(ctx, u, map[id.DeviceID]*id.Device{}); err != nil {
				return err
			}
		}
	}
	var cursor int
	err = db.QueryRow(ctx, `SELECT next FROM crash_cursor`).Scan(&cursor)
	if err != nil {
		if _, err = db.Exec(ctx, `INSERT INTO crash_cursor (next) VALUES (0)`); err != nil {
			return err
		}
	}
	fmt.Println("ready")
	runErr := make(chan error, 1)
	go func() { runErr <- m.Run(ctx) }()
	for {
		select {
		case err := <-runErr:
			return fmt.Errorf("run: %w", err)
		default:
		}
		var ch crashChanges
		resp, err := http.Get(url + "/changes?since=" + strconv.Itoa(cursor))
		if err != nil {
			return err
		}
		err = json.NewDecoder(resp.Body).Decode(&ch)
		resp.Body.Close()
		if err != nil {
			return err
		}
		types := []id.KeyAlgorithm{id.KeyAlgorithmSignedCurve25519}
		if ch.FallbackUsed {
			types = nil
		}
		d := &e2ee.Delta{Changed: ch.Users, FallbackKeyTypes: slidingsync.Some(types)}
		err = db.DoTxn(ctx, nil, func(ctx context.Context) error {
			if err := m.record(ctx, d); err != nil {
				return err
			}
			_, err := db.Exec(ctx, `UPDATE crash_cursor SET next = $1`, ch.Next)
			return err
		})
		if err != nil {
			return err
		}
		cursor = ch.Next
		m.lookForWork()
		if final && len(ch.Users) == 0 {
			if settled, err := crashSettled(ctx, m); err != nil {
				return err
			} else if settled {
				return nil
			}
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// crashSettled reports whether no user is outdated and no fallback key waits for upload.
func crashSettled(ctx context.Context, m *Machine) (bool, error) {
	owed, err := crashOwed(ctx, m)
	if err != nil || len(owed) > 0 {
		return false, err
	}
	row, err := m.loadFallback(ctx)
	return !row.pending && (row.rotatedAt == 0 || row.uploaded), err
}

// crashOwed returns the users the Machine still has to query: outdated, or changed since
// their last settled query.
func crashOwed(ctx context.Context, m *Machine) (map[id.UserID]struct{}, error) {
	outdated, err := m.store.GetOutdatedTrackedUsers(ctx)
	if err != nil {
		return nil, err
	}
	gens, err := m.generations(ctx)
	if err != nil {
		return nil, err
	}
	owed := make(map[id.UserID]struct{})
	for _, u := range outdated {
		owed[u] = struct{}{}
	}
	for u := range gens {
		owed[u] = struct{}{}
	}
	return owed, nil
}

type crashChanges struct {
	Users        []id.UserID `json:"users"`
	Next         int         `json:"next"`
	FallbackUsed bool        `json:"fallback_used"`
}

// The places where the parent kills its child.
const (
	killAtQuery    = iota // a /keys/query arrived: the query was sent, not answered
	killAfterQuery        // a /keys/query was answered: its result may be stored, not settled
	killAtUpload          // a fallback key upload arrived: the key was generated and saved
	killAtRandom          // any moment
	killPlaces
)

var killNames = [killPlaces]string{"at query", "after query", "at fallback upload", "random"}

// crashHS is the parent's homeserver: a stream of device-list changes (each adds a device to
// a user), /keys/query answering every user's current devices, and /keys/upload recording
// fallback keys. It kills the child at the planned request.
type crashHS struct {
	mu     sync.Mutex
	run    int           // the live child; requests of older ones get 410
	plan   int           // kill place for the live child
	seen   bool          // the planned kill was triggered
	kill   chan struct{} // the handler asks the parent to kill the child
	dead   chan struct{} // closed once the child is dead
	frozen bool          // no more changes (final run)
	// fallbackUnused is whether the server holds an unused fallback key: false from the
	// start and after a claim, true after an upload.
	fallbackUnused bool
	log            []id.UserID
	versions       map[id.UserID]int
	devices        map[id.UserID]map[int]json.RawMessage
	polls          int
	owed           map[id.UserID]struct{} // users the bot must still query
	inFlight       map[id.KeyID]mautrix.OneTimeKey
	expect         map[id.KeyID]mautrix.OneTimeKey // the next fallback upload must be this key
	verified       int                             // uploads that matched expect
	problems       []string
	uploadsOK      int
}

func (hs *crashHS) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	run, rest, _ := strings.Cut(strings.TrimPrefix(r.URL.Path, "/c"), "/")
	n, _ := strconv.Atoi(run)
	hs.mu.Lock()
	if n != hs.run {
		hs.mu.Unlock()
		w.WriteHeader(http.StatusGone)
		return
	}
	hs.mu.Unlock()
	body, _ := io.ReadAll(r.Body)
	switch {
	case rest == "changes":
		hs.changes(w, r)
	case strings.HasSuffix(rest, "/keys/query"):
		hs.query(w, body)
	case strings.HasSuffix(rest, "/keys/upload"):
		hs.upload(w, body)
	default:
		w.WriteHeader(http.StatusNotFound)
		writeJSON(w, map[string]string{"errcode": "M_UNRECOGNIZED", "error": "not here"})
	}
}

// killHere asks the parent to kill the child and waits until it is dead.
func (hs *crashHS) killHere() {
	hs.mu.Lock()
	kill, dead := hs.kill, hs.dead
	hs.mu.Unlock()
	select {
	case kill <- struct{}{}:
	default:
	}
	<-dead
}

// planned reports whether this request of kind place is the one to kill at: the first of
// its kind.
func (hs *crashHS) planned(place int) bool {
	if hs.plan != place || hs.seen {
		return false
	}
	hs.seen = true
	return true
}

func (hs *crashHS) changes(w http.ResponseWriter, r *http.Request) {
	since, _ := strconv.Atoi(r.URL.Query().Get("since"))
	hs.mu.Lock()
	hs.polls++
	fallbackUsed := false
	if hs.frozen {
		fallbackUsed = !hs.fallbackUnused
	} else {
		// Deterministic changes: one user per poll.
		u := crashUser(hs.polls * 3 % crashUsers)
		hs.log = append(hs.log, u)
		hs.versions[u]++
		if hs.polls%4 == 0 {
			hs.fallbackUnused = false // someone claimed it
		}
		fallbackUsed = !hs.fallbackUnused
	}
	since = min(max(since, 0), len(hs.log))
	ch := crashChanges{Users: slices.Clone(hs.log[since:]), Next: len(hs.log), FallbackUsed: fallbackUsed}
	hs.mu.Unlock()
	writeJSON(w, ch)
}

// deviceKeys returns user's v-th device, signed by its own key.
func (hs *crashHS) deviceKeys(u id.UserID, v int) json.RawMessage {
	if dk, ok := hs.devices[u][v]; ok {
		return dk
	}
	acc := mcrypto.NewOlmAccount()
	dev := crashDevice(v)
	keys := mautrix.DeviceKeys{
		UserID: u, DeviceID: dev, Algorithms: []id.Algorithm{id.AlgorithmOlmV1, id.AlgorithmMegolmV1},
		Keys: mautrix.KeyMap{
			id.NewDeviceKeyID(id.KeyAlgorithmEd25519, dev):    acc.SigningKey().String(),
			id.NewDeviceKeyID(id.KeyAlgorithmCurve25519, dev): acc.IdentityKey().String(),
		},
	}
	sig, err := acc.SignJSON(&keys)
	if err != nil {
		hs.problems = append(hs.problems, "sign device keys: "+err.Error())
	}
	keys.Signatures = map[id.UserID]map[id.KeyID]string{u: {id.NewKeyID(id.KeyAlgorithmEd25519, dev.String()): sig}}
	raw, _ := json.Marshal(&keys)
	if hs.devices[u] == nil {
		hs.devices[u] = map[int]json.RawMessage{}
	}
	hs.devices[u][v] = raw
	return raw
}

func (hs *crashHS) query(w http.ResponseWriter, body []byte) {
	var req struct {
		DeviceKeys map[id.UserID][]id.DeviceID `json:"device_keys"`
	}
	_ = json.Unmarshal(body, &req)
	hs.mu.Lock()
	if hs.planned(killAtQuery) {
		hs.mu.Unlock()
		hs.killHere()
		return
	}
	after := hs.planned(killAfterQuery)
	resp := map[id.UserID]map[id.DeviceID]json.RawMessage{}
	for u := range req.DeviceKeys {
		devs := map[id.DeviceID]json.RawMessage{}
		for _, v := range crashDevices(hs.versions[u]) {
			devs[crashDevice(v)] = hs.deviceKeys(u, v)
		}
		resp[u] = devs
		delete(hs.owed, u)
	}
	hs.mu.Unlock()
	writeJSON(w, map[string]any{"device_keys": resp, "failures": map[string]any{}})
	if after {
		if f, ok := w.(http.Flusher); ok {
			f.Flush()
		}
		go hs.killHere()
	}
}

func (hs *crashHS) upload(w http.ResponseWriter, body []byte) {
	var req struct {
		FallbackKeys map[id.KeyID]mautrix.OneTimeKey `json:"fallback_keys"`
	}
	_ = json.Unmarshal(body, &req)
	hs.mu.Lock()
	if len(req.FallbackKeys) > 0 {
		if hs.expect != nil {
			if !maps.EqualFunc(hs.expect, req.FallbackKeys, func(a, b mautrix.OneTimeKey) bool { return a.Key == b.Key }) {
				hs.problems = append(hs.problems, fmt.Sprintf("run %d uploaded fallback key %v, want the pending %v", hs.run, keyIDs(req.FallbackKeys), keyIDs(hs.expect)))
			}
			hs.expect = nil
			hs.verified++
		}
		hs.inFlight = req.FallbackKeys
		if hs.planned(killAtUpload) {
			hs.mu.Unlock()
			hs.killHere()
			return
		}
		hs.inFlight = nil
		hs.uploadsOK++
		hs.fallbackUnused = true
	}
	hs.mu.Unlock()
	writeJSON(w, map[string]any{"one_time_key_counts": map[string]int{"signed_curve25519": 50}})
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(v)
}

func keyIDs(keys map[id.KeyID]mautrix.OneTimeKey) []id.KeyID {
	return slices.Sorted(maps.Keys(keys))
}

// TestMachineCrash kills a child process running a Machine at seeded random moments:
// while a device-key query is in flight, right after it was answered (before the
// generations settle), while a freshly generated fallback key is being uploaded, and at any
// moment. After every kill, each user the database still owes a query is queried again by a
// later run, and a fallback key that was generated but not uploaded is the next one uploaded
// (compared with what the server received before the kill). At the end every user's stored
// devices are those the server has.
func TestMachineCrash(t *testing.T) {
	if testing.Short() {
		t.Skip("kills child processes")
	}
	seed, kills := crashtest.Plan(t, envCrashSeed, envCrashKills, 32)
	rng := rand.New(rand.NewPCG(seed, seed))
	ctx := context.Background()
	dbPath := filepath.Join(t.TempDir(), "crash.db")

	hs := &crashHS{
		versions: map[id.UserID]int{}, devices: map[id.UserID]map[int]json.RawMessage{},
		owed: map[id.UserID]struct{}{},
	}
	srv := httptest.NewServer(hs)
	defer srv.Close()

	start := func(final bool) (*exec.Cmd, *bufio.Reader) {
		cmd := exec.Command(os.Args[0], "-test.run=^TestMachineCrashChild$")
		cmd.Env = append(os.Environ(), envCrashChild+"="+dbPath, envCrashURL+"="+fmt.Sprintf("%s/c%d", srv.URL, hs.run))
		if final {
			cmd.Env = append(cmd.Env, envCrashFinal+"=1")
		}
		cmd.Stderr = os.Stderr
		return cmd, crashtest.StartReady(t, cmd, seed)
	}

	byPlace := map[string]int{}
	unsettled := 0 // kills that left a queried user unsettled (stored devices, generation row)
	for kill := range kills {
		hs.mu.Lock()
		hs.run++
		hs.plan, hs.seen = rng.IntN(killPlaces), false
		hs.kill, hs.dead = make(chan struct{}, 1), make(chan struct{})
		place := hs.plan
		hs.mu.Unlock()
		cmd, lines := start(false)
		go func() { _, _ = lines.WriteTo(io.Discard) }()
		timeout := 600 * time.Millisecond
		if place == killAtRandom {
			timeout = time.Duration(rng.Int64N(int64(250 * time.Millisecond)))
		}
		t0 := time.NewTimer(timeout)
		select {
		case <-hs.kill:
		case <-t0.C:
			place = killAtRandom // the planned request did not come in time
		}
		t0.Stop()
		require.NoError(t, cmd.Process.Signal(syscall.SIGKILL))
		require.Error(t, cmd.Wait(), "kill %d (seed %d): the child exited by itself", kill, seed)
		hs.mu.Lock()
		hs.run++ // late requests of the dead child are refused
		close(hs.dead)
		inFlight := hs.inFlight
		hs.inFlight = nil
		hs.mu.Unlock()
		byPlace[killNames[place]]++

		// What the database owes after the kill.
		db, m, err := openCrashMachine(ctx, dbPath, srv.URL)
		require.NoError(t, err)
		owed, err := crashOwed(ctx, m)
		require.NoError(t, err)
		outdated, err := m.store.GetOutdatedTrackedUsers(ctx)
		require.NoError(t, err)
		if len(owed) > len(outdated) {
			unsettled++
		}
		hs.mu.Lock()
		changes := slices.Clone(hs.log)
		hs.mu.Unlock()
		crashCheckDevices(t, db, m, changes, owed, fmt.Sprintf("kill %d (seed %d)", kill, seed))
		row, err := m.loadFallback(ctx)
		require.NoError(t, err)
		var pending map[id.KeyID]mautrix.OneTimeKey
		if row.rotatedAt != 0 && !row.uploaded {
			pending, err = m.signedFallbackKeys()
			require.NoError(t, err)
			require.NotEmpty(t, pending, "kill %d (seed %d): a rotated key is recorded but the account has none", kill, seed)
		}
		require.NoError(t, db.Close())
		if inFlight != nil {
			require.Equal(t, keyIDs(inFlight), keyIDs(pending),
				"kill %d (seed %d): the key killed in flight is not the one recorded as pending", kill, seed)
		}
		hs.mu.Lock()
		maps.Copy(hs.owed, owed)
		if pending != nil {
			hs.expect = pending
		}
		problems := slices.Clone(hs.problems)
		hs.mu.Unlock()
		require.Empty(t, problems, "seed %d", seed)
	}

	// A last run without a kill settles everything.
	hs.mu.Lock()
	hs.run++
	hs.plan = -1
	hs.frozen = true
	hs.kill, hs.dead = make(chan struct{}, 1), make(chan struct{})
	hs.mu.Unlock()
	cmd, lines := start(true)
	stuck := time.AfterFunc(10*time.Second, func() { _ = cmd.Process.Signal(syscall.SIGQUIT) })
	out, _ := lines.ReadString('\n')
	stuck.Stop()
	require.NoError(t, cmd.Wait(), "final run (seed %d)", seed)
	require.Equal(t, "done", strings.TrimSpace(out))

	hs.mu.Lock()
	defer hs.mu.Unlock()
	require.Empty(t, hs.problems, "seed %d", seed)
	require.Empty(t, hs.owed, "users owed a query after a kill were never queried again (seed %d)", seed)
	require.Nil(t, hs.expect, "the pending fallback key was never uploaded (seed %d)", seed)
	require.Positive(t, byPlace[killNames[killAtUpload]], "no kill landed on a fallback upload (seed %d)", seed)
	db, m, err := openCrashMachine(ctx, dbPath, srv.URL)
	require.NoError(t, err)
	defer db.Close()
	for i := range crashUsers {
		u := crashUser(i)
		devs, err := m.store.GetDevices(ctx, u)
		require.NoError(t, err)
		var want []id.DeviceID
		for _, v := range crashDevices(hs.versions[u]) {
			want = append(want, crashDevice(v))
		}
		require.ElementsMatch(t, want, slices.Collect(maps.Keys(devs)), "%s (seed %d)", u, seed)
	}
	t.Logf("kills by place: %v; %d left a queried user unsettled; %d pending fallback keys re-uploaded as they were; %d changes, %d fallback uploads",
		byPlace, unsettled, hs.verified, len(hs.log), hs.uploadsOK)
}

// crashCheckDevices checks that every device-list change the bot committed (the changes
// before its cursor) is either reflected in the stored devices or still owed a query.
func crashCheckDevices(t *testing.T, db *dbutil.Database, m *Machine, changes []id.UserID, owed map[id.UserID]struct{}, what string) {
	t.Helper()
	ctx := context.Background()
	var cursor int
	require.NoError(t, db.QueryRow(ctx, `SELECT next FROM crash_cursor`).Scan(&cursor), what)
	committed := map[id.UserID]int{}
	for _, u := range changes[:min(cursor, len(changes))] {
		committed[u]++
	}
	for u, v := range committed {
		if _, ok := owed[u]; ok {
			continue
		}
		devs, err := m.store.GetDevices(ctx, u)
		require.NoError(t, err, what)
		stored := 0
		for dev := range devs {
			n, err := strconv.Atoi(strings.TrimPrefix(dev.String(), "D"))
			require.NoError(t, err, what)
			stored = max(stored, n)
		}
		require.GreaterOrEqual(t, stored, v,
			"%s: %s has committed change %d but its stored devices are from change %d and no query is owed", what, u, v, stored)
	}
}
