package sqlstore_test

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/sliding-e2ee/sdk/internal/crashtest"
	"github.com/sliding-e2ee/sdk/slidingsync"
	"github.com/sliding-e2ee/sdk/slidingsync/sqlstore/dbopen"
	"github.com/sliding-e2ee/sdk/slidingsync/storetest"
)

const (
	envTarget = "SLIDINGSYNC_SQLSTORE_TARGET"
	envDriver = "SLIDINGSYNC_SQLSTORE_DRIVER"
	// envCrashKills overrides how many times the crash test kills its child.
	envCrashKills = "SLIDINGSYNC_CRASH_KILLS"
	// envCrashSeed fixes the crash test's random delays, to replay a failure.
	envCrashSeed = "SLIDINGSYNC_CRASH_SEED"

	crashBigEvery = 20
	crashBigRooms = 500
)

var crashKey = slidingsync.ConnKey{UserID: "@crash:example.org", DeviceID: "CRASHDEV", ConnID: "main"}

func crashEvent(raw string) *event.Event {
	var evt event.Event
	if err := json.Unmarshal([]byte(raw), &evt); err != nil {
		panic(err)
	}
	return &evt
}

func crashRoom(roomID id.RoomID, i int) *slidingsync.RoomState {
	return &slidingsync.RoomState{
		ID:                roomID,
		Name:              strconv.Itoa(i),
		NotificationCount: i,
		PrevBatch:         fmt.Sprintf("pb%d", i),
		MembersStale:      i%2 == 0,
		State: map[slidingsync.StateKey]*event.Event{
			{Type: "m.room.name"}: crashEvent(fmt.Sprintf(`{"type":"m.room.name","state_key":"","sender":"@a:x","event_id":"$n%d","content":{"name":"%d"}}`, i, i)),
		},
		Timeline: []*event.Event{
			crashEvent(fmt.Sprintf(`{"type":"m.room.message","sender":"@a:x","event_id":"$m%d","content":{"msgtype":"m.text","body":"update %d"}}`, i, i)),
		},
	}
}

// crashUpdate is update i of the crash test's deterministic sequence: every room, list and
// extension checkpoint it touches carries i, so a mix of two updates is visible.
func crashUpdate(i int) *slidingsync.Update {
	upd := &slidingsync.Update{
		Pos:   strconv.Itoa(i),
		Rooms: make(map[id.RoomID]*slidingsync.RoomState),
		Extensions: map[string]json.RawMessage{
			"to_device": json.RawMessage(fmt.Sprintf(`{"since":"%d"}`, i)),
			"e2ee":      json.RawMessage(fmt.Sprintf(`{"update":%d}`, i)),
		},
	}
	window := make([]id.RoomID, 0, 3)
	for j := range 3 {
		roomID := id.RoomID(fmt.Sprintf("!small%02d:x", (i*7+j*13)%50))
		upd.Rooms[roomID] = crashRoom(roomID, i)
		window = append(window, roomID)
	}
	upd.Lists = map[string]slidingsync.ListState{"all": {Count: i, Rooms: window}}
	if i%crashBigEvery == 0 {
		for j := range crashBigRooms {
			roomID := id.RoomID(fmt.Sprintf("!big%04d:x", j))
			upd.Rooms[roomID] = crashRoom(roomID, i)
		}
	}
	return upd
}

const crashSideQuery = `INSERT INTO crash_side (id, n) VALUES (1, $1) ON CONFLICT (id) DO UPDATE SET n=excluded.n`

// crashChild commits the sequence from where the database stands until it is killed. Each
// commit's transaction hook also records the update number in another table.
func crashChild() int {
	ctx := context.Background()
	db, err := dbopen.Open(os.Getenv(envTarget), dbopen.Config{SQLiteDriver: os.Getenv(envDriver)})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	// The parent upgraded the database: this process tests the commit cycle only.
	s := newStoreFor(db)
	cp, err := s.Load(ctx, crashKey)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	k := 0
	if cp.Pos != "" {
		k, _ = strconv.Atoi(cp.Pos)
	}
	fmt.Println("ready")
	for i := k + 1; ; i++ {
		upd := crashUpdate(i)
		upd.TxnHooks = []func(ctx context.Context) error{func(ctx context.Context) error {
			_, err := s.DB.Exec(ctx, crashSideQuery, i)
			return err
		}}
		start := time.Now()
		if err = s.Commit(ctx, crashKey, upd); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		fmt.Printf("committed %d %d\n", i, time.Since(start))
	}
}

func crashTest(t *testing.T, b backend) {
	seed, kills := crashtest.Plan(t, envCrashSeed, envCrashKills, 100)
	rng := rand.New(rand.NewPCG(seed, seed))
	target := b.newTarget(t)
	ctx := context.Background()
	db, s := open(t, b, target)
	_, err := s.DB.Exec(ctx, `CREATE TABLE crash_side (id INTEGER PRIMARY KEY, n BIGINT NOT NULL)`)
	require.NoError(t, err)
	require.NoError(t, db.Close())

	var model *slidingsync.Checkpoint
	modelK := 0
	var progress []int
	estSmall, estBig := 10*time.Millisecond, 100*time.Millisecond
	for kill := range kills {
		cmd := exec.Command(os.Args[0], "-test.run=^$")
		cmd.Env = append(os.Environ(), envHelper+"=crash", envTarget+"="+target, envDriver+"="+b.cfg.SQLiteDriver)
		cmd.Stderr = os.Stderr
		stdout, err := cmd.StdoutPipe()
		require.NoError(t, err)
		require.NoError(t, cmd.Start())
		lines := bufio.NewReader(stdout)
		line, err := lines.ReadString('\n')
		if err != nil || strings.TrimSpace(line) != "ready" {
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
			t.Fatalf("kill %d: child did not start (seed %d): %q %v", kill, seed, line, err)
		}
		// Let the child commit a few updates, then kill it at a random moment of the next
		// commit, whose duration is estimated from the durations the child reported.
		next := modelK + 1
		for range rng.IntN(3) {
			line, err = lines.ReadString('\n')
			require.NoError(t, err, "kill %d: child died", kill)
			var i int
			var dur time.Duration
			_, err = fmt.Sscanf(line, "committed %d %d", &i, &dur)
			require.NoError(t, err, "kill %d: child said %q", kill, line)
			if i%crashBigEvery == 0 {
				estBig = (estBig + dur) / 2
			} else {
				estSmall = (estSmall + dur) / 2
			}
			next = i + 1
		}
		est := estSmall
		if next%crashBigEvery == 0 {
			est = estBig
		}
		delay := time.Duration(rng.Int64N(int64(est) + 1))
		time.Sleep(delay)
		require.NoError(t, cmd.Process.Signal(syscall.SIGKILL))
		err = cmd.Wait()
		require.Error(t, err, "kill %d: the child exited by itself", kill)

		db, err := dbopen.Open(target, b.cfg)
		require.NoError(t, err)
		waitOtherSessionsGone(t, db)
		s := newStoreFor(db)
		got, err := s.Load(ctx, crashKey)
		require.NoError(t, err)
		var side int
		if got.Pos != "" {
			require.NoError(t, s.DB.QueryRow(ctx, `SELECT n FROM crash_side WHERE id=1`).Scan(&side))
		}
		require.NoError(t, db.Close())

		k := 0
		if got.Pos != "" {
			k, err = strconv.Atoi(got.Pos)
			require.NoError(t, err, "kill %d: pos %q", kill, got.Pos)
		}
		require.GreaterOrEqual(t, k, modelK, "kill %d (seed %d): a committed update was lost", kill, seed)
		for modelK < k {
			modelK++
			model = storetest.Apply(model, crashUpdate(modelK))
		}
		if !storetest.AssertEqual(t, model, got, "kill %d (seed %d): the reload is not the state after update %d", kill, seed, k) {
			t.FailNow()
		}
		require.Equal(t, k, side, "kill %d (seed %d): the hook's write does not belong to pos", kill, seed)
		progress = append(progress, k)
	}
	t.Logf("pos after each kill: %v", progress)
	t.Logf("commit duration estimates: small %v, big %v", estSmall, estBig)
	require.Greater(t, modelK, 2*crashBigEvery, "the child made too little progress to test anything")
}

func TestCrashConsistencySQLiteModernc(t *testing.T) {
	crashTest(t, sqliteBackend(dbopen.DriverModernc))
}

func TestCrashConsistencyPostgres(t *testing.T) {
	crashTest(t, postgresBackend)
}

// waitOtherSessionsGone waits until no other session is connected to the database. A killed
// child's PostgreSQL session outlives the child for a moment: a COMMIT it sent just before the
// kill may still complete, and reading before then would see pos and the hook's row from two
// different moments. SQLite has no server side: a killed writer is done.
func waitOtherSessionsGone(t *testing.T, db *dbutil.Database) {
	t.Helper()
	if db.Dialect != dbutil.Postgres {
		return
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		var n int
		require.NoError(t, db.QueryRow(context.Background(), `SELECT count(*) FROM pg_stat_activity
			WHERE datname = current_database() AND pid <> pg_backend_pid()`).Scan(&n))
		if n == 0 {
			return
		}
		require.True(t, time.Now().Before(deadline), "%d other sessions still connected after 30 s", n)
		time.Sleep(5 * time.Millisecond)
	}
}
