package main

import (
	"context"
	"encoding/json"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/sliding-e2ee/sdk/internal/minihs"
)

func TestProcReaders(t *testing.T) {
	before, err := cpuTime(os.Getpid())
	require.NoError(t, err)
	// Spin until the kernel's rusage says 30 ms of CPU went by; schedstat must agree.
	rusage := func() time.Duration {
		var ru syscall.Rusage
		require.NoError(t, syscall.Getrusage(syscall.RUSAGE_SELF, &ru))
		return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	}
	for r0 := rusage(); rusage()-r0 < 30*time.Millisecond; {
	}
	after, err := cpuTime(os.Getpid())
	require.NoError(t, err)
	assert.GreaterOrEqual(t, after-before, 25*time.Millisecond, "30 ms of CPU by rusage shows up in schedstat")
	stat, err := statCPU(os.Getpid())
	require.NoError(t, err)
	assert.Greater(t, stat, time.Duration(0))
	rss, err := peakRSS(os.Getpid())
	require.NoError(t, err)
	assert.Greater(t, rss, int64(1000), "a Go test binary uses more than 1 MB")
}

func TestTableRatiosAndTargets(t *testing.T) {
	v2 := &result{name: "v2", ready: sample{at: 10 * time.Second, cpu: 8 * time.Second, in: 1000, out: 999000, measured: true}, peakRSSKB: 200 << 10}
	sdk := func(readyMS int) *result {
		return &result{name: "sdk", ready: sample{at: time.Duration(readyMS) * time.Millisecond, cpu: 2 * time.Second, in: 1000, out: 9000, measured: true},
			allKnown: sample{at: 11 * time.Second, cpu: 2500 * time.Millisecond, measured: true}, peakRSSKB: 40 << 10}
	}
	var b strings.Builder
	printTable(&b, []string{"v2", "sdk"}, [][]*result{{v2}, {sdk(400), sdk(500), sdk(900)}})
	out := b.String()
	assert.Contains(t, out, "| measure | v2 | sdk | sdk / v2 | target | met |")
	assert.Contains(t, out, "| time to ready | 10000 ms | 500 ms (400–900) | 0.05 | ≤ 1/10 | yes |", "the median of three runs, with their range")
	assert.Contains(t, out, "| CPU to ready | 8000 ms | 2000 ms (2000–2000) | 0.25 | ≤ 1/10 | **no** |")
	assert.Contains(t, out, "| bytes to ready (both directions) | 1000 KB | 10.0 KB (10.0–10.0) | 0.01 | ≤ 1/20 | yes |")
	assert.Contains(t, out, "| peak RSS (whole run) | 200 MB | 40.0 MB (40.0–40.0) | 0.2 | ≤ 1/4 | yes |")
	assert.Contains(t, out, "| every room known | — | 11000 ms (11000–11000) | 1.1 | ≤ baseline's ready | **no** |", "judged against v2's time to ready")
	assert.Contains(t, out, "| CPU until every room known | — | 2500 ms (2500–2500) | 0.312 | ≤ 1/3 of baseline's CPU to ready | yes |", "judged against v2's CPU to ready")
	assert.Contains(t, out, "| idle cycle: CPU | — | — | — | ≤ 1 |  |", "unmeasured figures stay empty")

	b.Reset()
	printTable(&b, []string{"v2", "sdk", "sdk-nocgo"}, [][]*result{{v2}, {sdk(500)}, {sdk(2000)}})
	assert.Contains(t, b.String(), "| time to ready | 10000 ms | 500 ms | 2000 ms | 0.05 | 0.2 | ≤ 1/10 | yes, **no** |", "every bot against the first")
}

func TestParseBots(t *testing.T) {
	got, err := parseBots("v2, sdk,sdk-nocgo")
	require.NoError(t, err)
	assert.Equal(t, []string{"v2", "sdk", "sdk-nocgo"}, got)
	_, err = parseBots("v2,sdk,v2")
	assert.ErrorContains(t, err, `"v2" named twice`)
	_, err = parseBots("v3")
	assert.ErrorContains(t, err, `unknown bot "v3"`)
}

var (
	buildOnce sync.Once
	benchBins map[string]string
	buildErr  error
)

// BenchmarkSideBySide runs the v2 bot and the SDK's bot at 1000 rooms per op (each as its own
// process, one after the other) and reports the SDK/v2 ratios the targets are about.
func BenchmarkSideBySide(b *testing.B) {
	names := []string{"v2", "sdk"}
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "syncbench-bins")
		if err != nil {
			buildErr = err
			return
		}
		benchBins, buildErr = buildBots(context.Background(), dir, names)
	})
	require.NoError(b, buildErr)
	o := options{rooms: 1000, seed: 1, runs: 1}
	rc := runConfig{dbDir: defaultDBDir(), idleCycles: 20, idleHold: 150 * time.Millisecond, phaseLimit: 2 * time.Minute, churn: 20, logDir: b.TempDir()}
	for b.Loop() {
		results, err := runAll(context.Background(), o, rc, names, benchBins)
		require.NoError(b, err)
		for i, rs := range results {
			for _, n := range rs[0].notes {
				b.Logf("%s: %s (log %s)", names[i], n, filepath.Join(rc.logDir, names[i]+".log"))
			}
		}
		for _, m := range measures {
			if q, _, ok := m.ratio(results[0], results[1]); ok && m.maxRatio > 0 {
				b.ReportMetric(q, metricName(m.name)+"-sdk/v2")
			}
		}
		v2, sdk := results[0][0], results[1][0]
		b.ReportMetric(ms(v2.ready.at), "v2-ready-ms")
		b.ReportMetric(ms(sdk.ready.at), "sdk-ready-ms")
		b.ReportMetric(ms(sdk.allKnown.at), "sdk-all-known-ms")
	}
}

func metricName(s string) string {
	s = strings.TrimSpace(s)
	s = strings.NewReplacer("(both directions)", "", "(whole run)", "", ":", "", " ", "-").Replace(s)
	return strings.Trim(strings.ReplaceAll(s, "--", "-"), "-")
}

func TestTrackerPhases(t *testing.T) {
	tr := newTracker()
	t0 := time.Now()
	tr.start = t0
	at := func(ms int) time.Time { return t0.Add(time.Duration(ms) * time.Millisecond) }
	ev := func(e minihs.Event) { tr.observe(e) }

	ev(minihs.Event{Kind: minihs.KindSyncRequest, At: at(1)})
	ev(minihs.Event{Kind: minihs.KindSyncResponse, At: at(2), Token: "1/s1", BytesOut: 100})
	ev(minihs.Event{Kind: minihs.KindSyncRequest, At: at(3), Token: "1/s1"})
	assert.False(t, tr.ready.measured, "persisted, but no keys yet")
	ev(minihs.Event{Kind: minihs.KindKeysUpload, At: at(5), OTKs: 50})
	assert.False(t, tr.ready.measured, "one-time keys without device keys are not the upload")
	ev(minihs.Event{Kind: minihs.KindKeysUpload, At: at(6), DeviceKeys: true, BytesIn: 40, BytesOut: 120})
	require.True(t, tr.ready.measured)
	assert.Equal(t, 6*time.Millisecond, tr.ready.at, "ready is the later of the two conditions")
	assert.Equal(t, int64(160), tr.ready.in+tr.ready.out)

	ev(minihs.Event{Kind: minihs.KindSyncResponse, At: at(7), Token: "2/s1", AllKnown: true})
	ev(minihs.Event{Kind: minihs.KindSyncResponse, At: at(8), Token: "3/s1", AllKnown: true})
	assert.False(t, tr.allKnown.measured)
	ev(minihs.Event{Kind: minihs.KindSyncRequest, At: at(9), Token: "2/s1"})
	require.True(t, tr.allKnown.measured)
	assert.Equal(t, 9*time.Millisecond, tr.allKnown.at)

	tr.idleMeasure, tr.idleWant = true, 2
	for i := range 6 {
		idle := i != 3 // a busy response restarts the count
		ev(minihs.Event{Kind: minihs.KindSyncResponse, At: at(10 + i), Idle: idle, BytesOut: int64(1000 * i)})
	}
	assert.False(t, tr.idleFrom.measured, "three idle cycles in a row make the warm-up")
	for i := 6; i < 11; i++ {
		ev(minihs.Event{Kind: minihs.KindSyncResponse, At: at(10 + i), Idle: true, BytesOut: int64(1000 * i)})
	}
	require.True(t, tr.idleFrom.measured)
	require.True(t, tr.idleT.measured)
	assert.Equal(t, int64(2000), tr.idleT.out-tr.idleFrom.out, "two cycles measured after the warm-up")
}

// TestMain turns the test binary into a bot that syncs v2 and never uploads keys when
// SYNCBENCH_KEYLESS_BOT is set, for TestKeylessBotIsReported.
func TestMain(m *testing.M) {
	if os.Getenv("SYNCBENCH_KEYLESS_BOT") == "1" {
		keylessBot()
		return
	}
	os.Exit(m.Run())
}

func keylessBot() {
	var hs, token string
	for i, a := range os.Args {
		switch {
		case a == "-homeserver" && i+1 < len(os.Args):
			hs = os.Args[i+1]
		case a == "-access-token" && i+1 < len(os.Args):
			token = os.Args[i+1]
		}
	}
	since := ""
	for {
		req, err := http.NewRequest(http.MethodGet, hs+"/_matrix/client/v3/sync?timeout=30000&since="+url.QueryEscape(since), nil)
		if err != nil {
			os.Exit(1)
		}
		req.Header.Set("Authorization", "Bearer "+token)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			os.Exit(1)
		}
		var body struct {
			NextBatch string `json:"next_batch"`
		}
		err = json.NewDecoder(resp.Body).Decode(&body)
		resp.Body.Close()
		if err != nil {
			os.Exit(1)
		}
		since = body.NextBatch
	}
}

func TestKeylessBotIsReported(t *testing.T) {
	acct, err := minihs.Generate(minihs.GenConfig{Rooms: 20, Seed: 1})
	require.NoError(t, err)
	t.Setenv("SYNCBENCH_KEYLESS_BOT", "1")
	bin, err := os.Executable()
	require.NoError(t, err)
	rc := runConfig{dbDir: t.TempDir(), logDir: t.TempDir(), idleCycles: 3, idleHold: 20 * time.Millisecond,
		phaseLimit: 20 * time.Second, keyGrace: 200 * time.Millisecond}
	began := time.Now()
	res, err := runBot(context.Background(), botSpec{name: "keyless", bin: bin, api: minihs.APIV2}, acct, rc)
	require.NoError(t, err)
	assert.Less(t, time.Since(began), 15*time.Second, "reported, not waited for until the phase limit")
	assert.False(t, res.ready.measured)
	assert.True(t, res.allKnown.measured, "every room is known after the first v2 response")
	assert.Equal(t, 3, res.idleCycles, "idle cycles are still measured")
	assert.Contains(t, strings.Join(res.notes, "\n"), "no device keys were uploaded")
}
