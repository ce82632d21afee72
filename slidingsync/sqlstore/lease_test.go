package sqlstore_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"maunium.net/go/mautrix/id"

	"github.com/sliding-e2ee/sdk/slidingsync"
	"github.com/sliding-e2ee/sdk/slidingsync/sqlstore"
	"github.com/sliding-e2ee/sdk/slidingsync/sqlstore/dbopen"
)

const (
	leaseUser   = id.UserID("@lease:example.org")
	leaseDevice = id.DeviceID("LEASEDEV")
)

func shortLease(holder string) sqlstore.LeaseConfig {
	return sqlstore.LeaseConfig{
		Holder:        holder,
		Duration:      2 * time.Second,
		RenewInterval: 300 * time.Millisecond,
		PollInterval:  100 * time.Millisecond,
	}
}

func leaseRow(t *testing.T, s *sqlstore.Store) (holder string, expiresAt int64) {
	t.Helper()
	err := s.DB.QueryRow(context.Background(), `SELECT holder, expires_at FROM slidingsync_lease WHERE user_id=$1 AND device_id=$2`, leaseUser, leaseDevice).Scan(&holder, &expiresAt)
	require.NoError(t, err)
	return holder, expiresAt
}

func leaseInProcess(t *testing.T, b backend) {
	ctx := context.Background()
	target := b.newTarget(t)
	db, s := open(t, b, target)
	defer db.Close()

	t.Run("ExclusiveUntilReleased", func(t *testing.T) {
		a, err := s.AcquireLease(ctx, leaseUser, leaseDevice, shortLease("A"))
		require.NoError(t, err)
		// B waits in standby: its context ends before A's lease would expire.
		waitCtx, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
		_, err = s.AcquireLease(waitCtx, leaseUser, leaseDevice, shortLease("B"))
		cancel()
		require.ErrorIs(t, err, context.DeadlineExceeded)
		// A different device is independent.
		other, err := s.AcquireLease(ctx, leaseUser, "OTHERDEV", shortLease("B"))
		require.NoError(t, err)
		require.NoError(t, other.Release(ctx))

		got := make(chan *sqlstore.Lease, 1)
		go func() {
			l, err := s.AcquireLease(ctx, leaseUser, leaseDevice, shortLease("B"))
			assert.NoError(t, err)
			got <- l
		}()
		require.NoError(t, a.Release(ctx))
		select {
		case <-a.Lost():
		default:
			t.Fatal("Lost is not closed after Release")
		}
		bl := <-got
		require.NotNil(t, bl)
		holder, _ := leaseRow(t, s)
		assert.Equal(t, "B", holder)
		require.NoError(t, bl.Release(ctx))
	})

	t.Run("SameHolderRetakes", func(t *testing.T) {
		a, err := s.AcquireLease(ctx, leaseUser, leaseDevice, shortLease("A"))
		require.NoError(t, err)
		// A restarted process with the same holder name does not wait for expiry.
		again, err := s.AcquireLease(ctx, leaseUser, leaseDevice, shortLease("A"))
		require.NoError(t, err)
		require.NoError(t, again.Release(ctx))
		require.NoError(t, a.Release(ctx))
	})

	t.Run("LostWhenTaken", func(t *testing.T) {
		a, err := s.AcquireLease(ctx, leaseUser, leaseDevice, shortLease("A"))
		require.NoError(t, err)
		guarded := a.Guard(s)
		key := slidingsync.ConnKey{UserID: leaseUser, DeviceID: leaseDevice, ConnID: "guarded"}
		require.NoError(t, guarded.Commit(ctx, key, &slidingsync.Update{Pos: "1", Rooms: map[id.RoomID]*slidingsync.RoomState{"!a:x": {ID: "!a:x", Name: "A"}}}))
		// The guard keeps the store's RoomLoader, so that a Conn with RoomCache can use it.
		rl, ok := guarded.(slidingsync.RoomLoader)
		require.True(t, ok, "a guarded sqlstore is a RoomLoader")
		rooms, err := rl.LoadRooms(ctx, key, []id.RoomID{"!a:x"})
		require.NoError(t, err)
		assert.Equal(t, "A", rooms["!a:x"].Name)
		head, err := rl.LoadHead(ctx, key)
		require.NoError(t, err)
		assert.Equal(t, "1", head.Pos)

		// Another process takes over behind A's back.
		_, err = s.DB.Exec(ctx, `UPDATE slidingsync_lease SET holder='thief' WHERE user_id=$1 AND device_id=$2`, leaseUser, leaseDevice)
		require.NoError(t, err)
		err = guarded.Commit(ctx, key, &slidingsync.Update{Pos: "2"})
		require.ErrorIs(t, err, sqlstore.ErrLeaseLost)
		cp, err := s.Load(ctx, key)
		require.NoError(t, err)
		assert.Equal(t, "1", cp.Pos, "a commit without the lease commits nothing")

		select {
		case <-a.Lost():
		case <-time.After(10 * time.Second):
			t.Fatal("Lost not closed after the lease was taken")
		}
		require.NoError(t, a.Release(ctx))
		holder, _ := leaseRow(t, s)
		assert.Equal(t, "thief", holder, "Release deletes only its own lease")
		_, err = s.DB.Exec(ctx, `DELETE FROM slidingsync_lease`)
		require.NoError(t, err)
	})

	t.Run("RunWithLease", func(t *testing.T) {
		err := s.RunWithLease(ctx, leaseUser, leaseDevice, shortLease("A"), func(ctx context.Context, l *sqlstore.Lease) error {
			_, err := s.DB.Exec(ctx, `UPDATE slidingsync_lease SET holder='thief' WHERE user_id=$1 AND device_id=$2`, leaseUser, leaseDevice)
			require.NoError(t, err)
			<-ctx.Done()
			return ctx.Err()
		})
		require.ErrorIs(t, err, sqlstore.ErrLeaseLost)
		_, err = s.DB.Exec(ctx, `DELETE FROM slidingsync_lease`)
		require.NoError(t, err)

		sentinel := errors.New("done")
		err = s.RunWithLease(ctx, leaseUser, leaseDevice, shortLease("A"), func(ctx context.Context, l *sqlstore.Lease) error {
			return sentinel
		})
		require.ErrorIs(t, err, sentinel)
		var n int
		require.NoError(t, s.DB.QueryRow(ctx, `SELECT COUNT(*) FROM slidingsync_lease`).Scan(&n))
		assert.Zero(t, n, "RunWithLease releases the lease")
	})
}

const (
	envLeaseHolder   = "SLIDINGSYNC_LEASE_HOLDER"
	envLeaseDuration = "SLIDINGSYNC_LEASE_DURATION"
)

// leaseChild acquires the lease, says so with the database time it expires, and holds it
// until killed.
func leaseChild() int {
	ctx := context.Background()
	db, err := dbopen.Open(os.Getenv(envTarget), dbopen.Config{SQLiteDriver: os.Getenv(envDriver)})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	s := newStoreFor(db)
	fmt.Println("standby")
	cfg := shortLease(os.Getenv(envLeaseHolder))
	if d, err := time.ParseDuration(os.Getenv(envLeaseDuration)); err == nil {
		cfg.Duration, cfg.RenewInterval = d, d/3
	}
	l, err := s.AcquireLease(ctx, leaseUser, leaseDevice, cfg)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	var expires int64
	if err = s.DB.QueryRow(ctx, `SELECT expires_at FROM slidingsync_lease WHERE user_id=$1 AND device_id=$2 AND holder=$3`, leaseUser, leaseDevice, l.Holder()).Scan(&expires); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	fmt.Printf("acquired %d\n", expires)
	<-l.Lost()
	fmt.Println("lost")
	return 1
}

type leaseProc struct {
	cmd   *exec.Cmd
	lines chan string
}

func startLeaseProc(t *testing.T, b backend, target, holder string, env ...string) *leaseProc {
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), envHelper+"=lease", envTarget+"="+target, envDriver+"="+b.cfg.SQLiteDriver, envLeaseHolder+"="+holder)
	cmd.Env = append(cmd.Env, env...)
	cmd.Stderr = os.Stderr
	stdout, err := cmd.StdoutPipe()
	require.NoError(t, err)
	require.NoError(t, cmd.Start())
	p := &leaseProc{cmd: cmd, lines: make(chan string, 16)}
	go func() {
		defer close(p.lines)
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			p.lines <- sc.Text()
		}
	}()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	return p
}

// next returns the process's next line; a process that says nothing for a minute has failed.
func (p *leaseProc) next(t *testing.T) string {
	t.Helper()
	select {
	case line, ok := <-p.lines:
		require.True(t, ok, "the process exited")
		return line
	case <-time.After(time.Minute):
		t.Fatal("the process said nothing for a minute")
		return ""
	}
}

func acquiredAt(t *testing.T, line string) int64 {
	t.Helper()
	v, ok := strings.CutPrefix(line, "acquired ")
	require.True(t, ok, "expected acquired, got %q", line)
	n, err := strconv.ParseInt(v, 10, 64)
	require.NoError(t, err)
	return n
}

func leaseTwoProcesses(t *testing.T, b backend) {
	target := b.newTarget(t)
	db, s := open(t, b, target)
	defer db.Close()
	cfg := shortLease("")

	a := startLeaseProc(t, b, target, "A")
	require.Equal(t, "standby", a.next(t))
	acquiredAt(t, a.next(t))

	bp := startLeaseProc(t, b, target, "B")
	require.Equal(t, "standby", bp.next(t))
	// B polls while A renews: give it more than a lease lifetime to (wrongly) take over.
	time.Sleep(cfg.Duration + cfg.Duration/2)
	select {
	case line := <-bp.lines:
		t.Fatalf("B said %q while A holds the lease", line)
	default:
	}
	holder, _ := leaseRow(t, s)
	require.Equal(t, "A", holder)

	require.NoError(t, a.cmd.Process.Signal(syscall.SIGKILL))
	_ = a.cmd.Wait()
	killed := time.Now()
	// A is dead: its last renewal is final.
	holder, aExpires := leaseRow(t, s)
	require.Equal(t, "A", holder)

	bExpires := acquiredAt(t, bp.next(t))
	takeover := time.Since(killed)
	bAcquired := bExpires - cfg.Duration.Milliseconds()
	t.Logf("B took over %v after A was killed; %d ms after A's lease expired (database clock)", takeover, bAcquired-aExpires)
	assert.GreaterOrEqual(t, bAcquired, aExpires, "B took the lease before A's expired")
	// Liveness: B polls every PollInterval; allow a generous margin for a loaded machine.
	assert.Less(t, bAcquired-aExpires, (cfg.PollInterval + 5*time.Second).Milliseconds(), "B did not take over within the lease lifetime plus a poll")
	holder, _ = leaseRow(t, s)
	assert.Equal(t, "B", holder)
}

func TestLeaseSQLiteModernc(t *testing.T) {
	leaseInProcess(t, sqliteBackend(dbopen.DriverModernc))
}

func TestLeasePostgres(t *testing.T) {
	leaseInProcess(t, postgresBackend)
}

func TestLeaseTwoProcessesSQLiteModernc(t *testing.T) {
	leaseTwoProcesses(t, sqliteBackend(dbopen.DriverModernc))
}

func TestLeaseTwoProcessesPostgres(t *testing.T) {
	leaseTwoProcesses(t, postgresBackend)
}

// leaseGoneHolder: with default holder names, a process on the same host takes the lease of a
// holder that was killed at once, long before the lease would expire; while the holder runs it
// waits.
func leaseGoneHolder(t *testing.T, b backend) {
	target := b.newTarget(t)
	db, s := open(t, b, target)
	defer db.Close()
	long := envLeaseDuration + "=1m"

	a := startLeaseProc(t, b, target, "", long)
	require.Equal(t, "standby", a.next(t))
	aExpires := acquiredAt(t, a.next(t))
	aHolder, _ := leaseRow(t, s)
	require.Contains(t, aHolder, fmt.Sprintf(":%d:", a.cmd.Process.Pid), "the default holder names the process")

	bp := startLeaseProc(t, b, target, "", long)
	require.Equal(t, "standby", bp.next(t))
	time.Sleep(time.Second) // B polls every 100 ms: many times here
	select {
	case line := <-bp.lines:
		t.Fatalf("B said %q while A runs", line)
	default:
	}

	require.NoError(t, a.cmd.Process.Signal(syscall.SIGKILL))
	_ = a.cmd.Wait()
	killed := time.Now()
	bExpires := acquiredAt(t, bp.next(t))
	t.Logf("B took over %v after A was killed, %d ms before A's lease would have expired", time.Since(killed).Round(time.Millisecond), aExpires-(bExpires-time.Minute.Milliseconds()))
	assert.Less(t, bExpires-time.Minute.Milliseconds(), aExpires, "B took the lease before A's expired")
	holder, _ := leaseRow(t, s)
	assert.NotEqual(t, aHolder, holder)
}

func TestLeaseGoneHolderTakenOverAtOnceSQLiteModernc(t *testing.T) {
	leaseGoneHolder(t, sqliteBackend(dbopen.DriverModernc))
}

func TestLeaseGoneHolderTakenOverAtOncePostgres(t *testing.T) {
	leaseGoneHolder(t, postgresBackend)
}
