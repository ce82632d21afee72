package main

import (
	"context"
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/sliding-e2ee/sdk/internal/minihs"
)

// The bot restarted after a SIGKILL, with default flags but a 5 min lease, takes its lease
// over at once: the lease's holder (same host, a process that no longer runs) is provably
// gone. The gap from the kill to the new process's first sync request is logged for 20
// kills; the assertion only holds it well under the lease (a restart that waited for the
// lease to expire would take 5 min).
func TestRestartAfterKillTakesTheLeaseOverAtOnce(t *testing.T) {
	if testing.Short() {
		t.Skip("20 restarts of the bot")
	}
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
	defer cancel()
	srv, err := minihs.NewServer(minihs.Options{Rooms: 10, Dir: t.TempDir()})
	require.NoError(t, err)
	defer srv.Close()
	bot, dev, _ := srv.Bot()
	start := botChild(t, srv, "-protocol", "msc4186", "-lease", "5m")
	syncsAfter := func(at time.Time) (time.Time, bool) {
		for _, r := range srv.SyncRequests() {
			if r.Arrived.After(at) {
				return r.Arrived, true
			}
		}
		return time.Time{}, false
	}

	cmd := start()
	require.NoError(t, srv.WaitFor(ctx, func() bool { return len(srv.Uploads(bot, dev)) > 0 }), "the bot starts")
	var gaps []time.Duration
	for range 20 {
		require.NoError(t, cmd.Process.Signal(syscall.SIGKILL))
		_ = cmd.Wait()
		killed := time.Now()
		cmd = start()
		var first time.Time
		require.NoError(t, srv.WaitFor(ctx, func() bool {
			var ok bool
			first, ok = syncsAfter(killed)
			return ok
		}), "the restarted bot syncs")
		gaps = append(gaps, first.Sub(killed))
	}
	_ = cmd.Process.Kill()
	_ = cmd.Wait()
	slices.Sort(gaps)
	t.Logf("kill to the new process's first sync request, 20 kills: median %v, max %v (min %v)",
		gaps[len(gaps)/2].Round(time.Millisecond), gaps[len(gaps)-1].Round(time.Millisecond), gaps[0].Round(time.Millisecond))
	require.Less(t, gaps[len(gaps)-1], time.Minute, "a restart waited for the lease to expire")
}
