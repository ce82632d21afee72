package e2ee_test

import (
	"bufio"
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/id"

	"github.com/sliding-e2ee/sdk/e2ee"
	"github.com/sliding-e2ee/sdk/internal/crashtest"
	"github.com/sliding-e2ee/sdk/slidingsync"
	"github.com/sliding-e2ee/sdk/slidingsync/slidingsynctest"
	"github.com/sliding-e2ee/sdk/slidingsync/sqlstore"
	"github.com/sliding-e2ee/sdk/slidingsync/sqlstore/dbopen"
)

const (
	envHelper = "E2EE_TEST_HELPER"
	envDB     = "E2EE_CRASH_DB"
	envURL    = "E2EE_CRASH_URL"
	envUntil  = "E2EE_CRASH_UNTIL"
	// envCrashKills overrides how many times the crash test kills its child.
	envCrashKills = "E2EE_CRASH_KILLS"
	// envCrashSeed fixes the crash test's random choices, to replay a failure.
	envCrashSeed = "E2EE_CRASH_SEED"
)

func TestMain(m *testing.M) {
	if name := os.Getenv(envHelper); name != "" {
		if name != "crash" {
			fmt.Fprintln(os.Stderr, "unknown helper", name)
			os.Exit(2)
		}
		os.Exit(crashChild())
	}
	os.Exit(m.Run())
}

// The crash test's identity, given to the fake server and used by the child process.
var crashKey = slidingsync.ConnKey{UserID: "@bot:example.org", DeviceID: "CRASHBOT"}

const crashToken = "crash_token"

// Tables of the crash test's consumer, in the store's database: the users it was told
// changed, and the gaps (every user changed up to stream upto is outdated).
const crashSchema = `
CREATE TABLE crash_seen (user_id TEXT PRIMARY KEY);
CREATE TABLE crash_gap (upto BIGINT NOT NULL);
`

// crashPos is the fake Synapse's pos: the device-list stream position and a serial that
// makes every pos new.
func crashPos(stream, serial int) string { return fmt.Sprintf("%d_%d", stream, serial) }

func parseCrashPos(pos string) (int, bool) {
	s, _, ok := strings.Cut(pos, "_")
	if !ok {
		return 0, false
	}
	n, err := strconv.Atoi(s)
	return n, err == nil
}

// crashConsumer records what it is told inside the commit transaction.
type crashConsumer struct {
	db  *dbutil.Database
	pos string // pos of the response being committed, set by OnResponse
	// until stops the child once it committed this stream position (0: never).
	until int
	stop  context.CancelFunc
}

func (c *crashConsumer) HandleE2EE(_ context.Context, _ e2ee.State, d *e2ee.Delta) slidingsync.Step {
	step := slidingsync.Step{After: c.committed}
	if !d.Empty() {
		step.Commit = func(ctx context.Context) error { return c.record(ctx, d) }
	}
	return step
}

func (c *crashConsumer) record(ctx context.Context, d *e2ee.Delta) error {
	for _, u := range d.Changed {
		if _, err := c.db.Exec(ctx, `INSERT INTO crash_seen (user_id) VALUES ($1) ON CONFLICT DO NOTHING`, u); err != nil {
			return err
		}
	}
	if d.Gap {
		upto, _ := parseCrashPos(c.pos)
		if _, err := c.db.Exec(ctx, `INSERT INTO crash_gap (upto) VALUES ($1)`, upto); err != nil {
			return err
		}
	}
	fmt.Printf("handled %s\n", c.pos)
	return nil
}

func (c *crashConsumer) committed(context.Context) {
	fmt.Printf("committed %s\n", c.pos)
	if s, ok := parseCrashPos(c.pos); ok && c.until > 0 && s >= c.until {
		c.stop()
	}
}

// crashChild syncs against the parent's server until it is killed, or until the stored pos
// reaches the stream position in envUntil.
func crashChild() int {
	ctx := context.Background()
	db, err := dbopen.Open(os.Getenv(envDB), dbopen.Config{})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	store := sqlstore.New(db, nil)
	until, _ := strconv.Atoi(os.Getenv(envUntil))
	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	consumer := &crashConsumer{db: store.DB, until: until, stop: cancel}
	exts, _, err := e2ee.New(crashKey.UserID, crashKey.DeviceID, e2ee.Config{Consumer: consumer})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	cli, err := mautrix.NewClient(os.Getenv(envURL), crashKey.UserID, crashToken)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	cli.DeviceID = crashKey.DeviceID
	cli.DefaultHTTPRetries = 0
	conn, err := slidingsync.New(cli, slidingsync.Config{
		Protocol:   slidingsync.ProtocolMSC4186,
		Store:      store,
		Extensions: exts,
		MinBackoff: time.Millisecond,
		MaxBackoff: 10 * time.Millisecond,
		OnResponse: func(_ context.Context, res *slidingsync.Result) (slidingsync.Step, error) {
			consumer.pos = res.Response.Pos
			fmt.Printf("received %s\n", res.Response.Pos)
			return slidingsync.Step{}, nil
		},
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Println("ready")
	if err := conn.Run(runCtx); err != nil && !errors.Is(err, context.Canceled) {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}

// fakeSynapse answers like Synapse's e2ee extension: every request adds one user with a
// device-list change, and a request with pos gets every change since that pos; a request
// without pos gets none.
type fakeSynapse struct {
	mu        sync.Mutex
	log       []id.UserID
	serial    int
	delivered map[id.UserID]bool
}

func (f *fakeSynapse) respond(req *slidingsync.Request) *slidingsync.Response {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.log = append(f.log, id.UserID(fmt.Sprintf("@u%d:x", len(f.log))))
	f.serial++
	section := e2ee.Response{
		DeviceOneTimeKeysCount:       slidingsync.Some(map[id.KeyAlgorithm]int{id.KeyAlgorithmSignedCurve25519: f.serial % 50}),
		DeviceUnusedFallbackKeyTypes: slidingsync.Some([]id.KeyAlgorithm{}),
	}
	if from, ok := parseCrashPos(req.Pos); ok {
		changed := append([]id.UserID{}, f.log[min(from, len(f.log)):]...)
		for _, u := range changed {
			f.delivered[u] = true
		}
		section.DeviceLists = slidingsync.Some(e2ee.DeviceLists{Changed: changed, Left: []id.UserID{}})
	}
	raw, err := json.Marshal(section)
	if err != nil {
		panic(err)
	}
	return &slidingsync.Response{
		Pos:        crashPos(len(f.log), f.serial),
		Extensions: map[string]json.RawMessage{"e2ee": raw},
	}
}

func (f *fakeSynapse) snapshot() (log []id.UserID, delivered map[id.UserID]bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]id.UserID(nil), f.log...), maps.Clone(f.delivered)
}

// crashCheck verifies that every change the committed pos covers was recorded by the
// consumer or covered by a recorded gap, and returns the committed stream position.
func crashCheck(t *testing.T, dbPath string, log []id.UserID, what string) int {
	t.Helper()
	ctx := context.Background()
	db, err := dbopen.Open(dbPath, dbopen.Config{})
	require.NoError(t, err)
	defer db.Close()
	store := sqlstore.New(db, nil)
	cp, err := store.Load(ctx, crashKey)
	require.NoError(t, err)
	committed := 0
	if cp.Pos != "" {
		var ok bool
		committed, ok = parseCrashPos(cp.Pos)
		require.True(t, ok, "%s: pos %q", what, cp.Pos)
	}
	seen := map[id.UserID]bool{}
	rows, err := store.DB.Query(ctx, `SELECT user_id FROM crash_seen`)
	require.NoError(t, err)
	for rows.Next() {
		var u id.UserID
		require.NoError(t, rows.Scan(&u))
		seen[u] = true
	}
	require.NoError(t, rows.Err())
	var maxGap sql.NullInt64
	require.NoError(t, store.DB.QueryRow(ctx, `SELECT MAX(upto) FROM crash_gap`).Scan(&maxGap))
	for i, u := range log[:min(committed, len(log))] {
		if seen[u] {
			continue
		}
		// A gap recorded at stream upto marked every user tracked then as outdated.
		require.True(t, maxGap.Valid && int64(i) < maxGap.Int64,
			"%s: %s (change %d) is covered by committed pos %q but was neither recorded nor covered by a gap (last gap %v)",
			what, u, i, cp.Pos, maxGap)
	}
	return committed
}

// TestCrashLosesNoDeviceListChange kills a syncing child process at random moments, 100
// times, and checks after each kill that every device-list change up to the committed pos was
// recorded by the consumer (or covered by a gap), and at the end that every change the
// server ever delivered was.
func TestCrashLosesNoDeviceListChange(t *testing.T) {
	if testing.Short() {
		t.Skip("kills child processes")
	}
	seed, kills := crashtest.Plan(t, envCrashSeed, envCrashKills, 100)
	rng := rand.New(rand.NewPCG(seed, seed))

	dbPath := filepath.Join(t.TempDir(), "crash.db")
	db, err := dbopen.Open(dbPath, dbopen.Config{})
	require.NoError(t, err)
	store := sqlstore.New(db, nil)
	require.NoError(t, store.Upgrade(context.Background()))
	for _, stmt := range strings.Split(strings.TrimSpace(crashSchema), ";") {
		if stmt = strings.TrimSpace(stmt); stmt != "" {
			_, err = store.DB.Exec(context.Background(), stmt)
			require.NoError(t, err)
		}
	}
	require.NoError(t, db.Close())

	fake := &fakeSynapse{delivered: map[id.UserID]bool{}}
	srv := slidingsynctest.NewServer(slidingsynctest.Options{Protocol: slidingsync.ProtocolMSC4186,
		UserID: crashKey.UserID, DeviceID: crashKey.DeviceID, AccessToken: crashToken})
	srv.SetResponder(fake.respond)
	hs := httptest.NewServer(srv)
	defer hs.Close()

	child := func(until int) (*exec.Cmd, *bufio.Reader) {
		cmd := exec.Command(os.Args[0], "-test.run=^$")
		cmd.Env = append(os.Environ(), envHelper+"=crash", envDB+"="+dbPath, envURL+"="+hs.URL, envUntil+"="+strconv.Itoa(until))
		cmd.Stderr = os.Stderr
		return cmd, crashtest.StartReady(t, cmd, seed)
	}

	lastLine := map[string]int{}
	resets := 0
	cycle := 2 * time.Millisecond
	for kill := range kills {
		if rng.IntN(10) == 0 {
			// The server forgets the connection: the next request gets M_UNKNOWN_POS.
			srv.PushError(slidingsync.MUnknownPos.WithMessage("Unknown position"))
			resets++
		}
		cmd, lines := child(0)
		// Let the child get through a few cycles, then kill it at a random moment of the
		// next one.
		var last string
		start := time.Now()
		n := rng.IntN(8)
		for i := 0; i < n; {
			line, err := lines.ReadString('\n')
			require.NoError(t, err, "kill %d (seed %d): child died", kill, seed)
			last = strings.Fields(line)[0]
			if last == "committed" {
				i++
			}
		}
		if n > 0 {
			cycle = (cycle + time.Since(start)/time.Duration(n)) / 2
		}
		time.Sleep(time.Duration(rng.Int64N(int64(cycle) + 1)))
		require.NoError(t, cmd.Process.Signal(syscall.SIGKILL))
		// Read what the child said before it died, to know where the kill landed.
		for {
			line, err := lines.ReadString('\n')
			if err != nil {
				break
			}
			last = strings.Fields(line)[0]
		}
		require.Error(t, cmd.Wait(), "kill %d: the child exited by itself", kill)
		if last == "" {
			last = "start"
		}
		lastLine[last]++
		log, _ := fake.snapshot()
		crashCheck(t, dbPath, log, fmt.Sprintf("kill %d (seed %d)", kill, seed))
	}

	// A last run without a kill catches up with everything the server delivered.
	log, _ := fake.snapshot()
	cmd, lines := child(len(log) + 1)
	for {
		if _, err := lines.ReadString('\n'); err != nil {
			break
		}
	}
	require.NoError(t, cmd.Wait())
	log, delivered := fake.snapshot()
	committed := crashCheck(t, dbPath, log, fmt.Sprintf("final run (seed %d)", seed))
	require.Greater(t, committed, len(log)-2)
	for u := range delivered {
		i, err := strconv.Atoi(strings.TrimSuffix(strings.TrimPrefix(string(u), "@u"), ":x"))
		require.NoError(t, err)
		require.Less(t, i, committed, "%s was delivered but is not covered by the final pos", u)
	}
	t.Logf("kills by the child's last line (received: between response and commit; handled: inside the commit; committed: after it): %v", lastLine)
	t.Logf("%d changes, %d delivered, %d forced resets, estimated cycle %v", len(log), len(delivered), resets, cycle)
}
