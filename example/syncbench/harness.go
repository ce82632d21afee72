package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"maunium.net/go/mautrix/id"

	"github.com/sliding-e2ee/sdk/internal/minihs"
)

// botSpec says how to start one bot against a server.
type botSpec struct {
	name  string     // "v2" or "sdk"
	bin   string     // built binary
	api   minihs.API // the API its server speaks
	extra []string   // extra arguments
}

// runConfig holds what every measurement of one run shares.
type runConfig struct {
	dbDir      string        // where the bots' databases go
	idleCycles int           // idle cycles measured after warmup
	idleHold   time.Duration // how long the server holds a long-poll with nothing new
	phaseLimit time.Duration // longest wait for one phase
	churn      int           // untracked users in the device-list change
	logDir     string        // where the bots' output goes
	// keyGrace is how long after persisting its first response a bot may take to upload
	// keys; zero means a minute.
	keyGrace time.Duration
}

// sample is the bot's cost at one moment.
type sample struct {
	at       time.Duration // since start
	cpu      time.Duration
	in, out  int64 // bytes the server received from / sent to the bot
	rssKB    int64
	measured bool
}

// result is what one bot measured.
type result struct {
	name     string
	ready    sample // keys uploaded and the first response persisted
	allKnown sample // a request after the response that made every room known

	idleCycles              int
	idleCPU                 time.Duration // per cycle
	idleIn, idleOut         float64       // bytes per cycle
	idleWall                time.Duration // per cycle, the hold included
	echoLatency             time.Duration // peer message in a response → encrypted echo sent
	deviceListLatency       time.Duration // response with the change written → key query arrived
	peakRSSKB               int64         // VmHWM, read until the bot exits
	totalCPU                time.Duration // rusage after exit
	totalIn, totalOut       int64
	syncRequests, responses int
	notes                   []string
	unknown                 []string
}

// tracker follows one bot through its server's observer events.
type tracker struct {
	mu      sync.Mutex
	changed chan struct{}
	start   time.Time
	pid     int

	keysUploaded bool
	firstToken   string
	persisted    bool
	ready        sample

	allKnownToken string
	allKnown      sample

	idleRun         int
	idleMeasure     bool
	idleFrom, idleT sample
	idleWant        int

	echoRoom   id.RoomID
	echoAt     time.Time
	echoSent   time.Time
	echoSteps  map[minihs.Kind]time.Time // the first of each kind of event after echoAt
	watchUser  id.UserID
	changeAt   time.Time
	queriedAt  time.Time
	requests   int
	responses  int
	unknown    map[string]int
	lastRSSKB  int64
	lastSample sample
}

func newTracker() *tracker {
	return &tracker{changed: make(chan struct{}, 1), unknown: map[string]int{}, echoSteps: map[minihs.Kind]time.Time{}}
}

func (t *tracker) sampleLocked(ev minihs.Event) sample {
	s := sample{at: ev.At.Sub(t.start), in: ev.BytesIn, out: ev.BytesOut, measured: true}
	if t.pid > 0 {
		s.cpu, _ = cpuTime(t.pid)
		s.rssKB, _ = peakRSS(t.pid)
	}
	return s
}

func (t *tracker) signal() {
	select {
	case t.changed <- struct{}{}:
	default:
	}
}

// observe is the server's observer: it runs on the server's request goroutines.
func (t *tracker) observe(ev minihs.Event) {
	t.mu.Lock()
	defer t.mu.Unlock()
	defer t.signal()
	if !t.echoAt.IsZero() && t.echoSent.IsZero() && ev.At.After(t.echoAt) && (ev.Kind != minihs.KindSyncResponse || ev.Rooms > 0) {
		if _, seen := t.echoSteps[ev.Kind]; !seen {
			t.echoSteps[ev.Kind] = ev.At
		}
	}
	switch ev.Kind {
	case minihs.KindKeysUpload:
		if ev.DeviceKeys && !t.keysUploaded {
			t.keysUploaded = true
			if t.persisted {
				t.ready = t.sampleLocked(ev)
			}
		}
	case minihs.KindSyncRequest:
		t.requests++
		if t.firstToken != "" && ev.Token == t.firstToken && !t.persisted {
			t.persisted = true
			if t.keysUploaded {
				t.ready = t.sampleLocked(ev)
			}
		}
		if t.allKnownToken != "" && ev.Token == t.allKnownToken && !t.allKnown.measured {
			t.allKnown = t.sampleLocked(ev)
		}
	case minihs.KindSyncResponse:
		t.responses++
		if t.firstToken == "" {
			t.firstToken = ev.Token
		}
		if ev.AllKnown && t.allKnownToken == "" {
			t.allKnownToken = ev.Token
		}
		if t.watchUser != "" && t.changeAt.IsZero() && slices.Contains(ev.Users, t.watchUser) {
			t.changeAt = ev.At
		}
		if !ev.Idle {
			t.idleRun = 0
			if !t.idleT.measured {
				t.idleFrom = sample{} // the cycles measured must all be idle: start over
			}
			break
		}
		t.idleRun++
		if t.idleMeasure {
			switch {
			case !t.idleFrom.measured && t.idleRun >= 3:
				t.idleFrom = t.sampleLocked(ev)
				t.idleRun = 0
			case t.idleFrom.measured && !t.idleT.measured && t.idleRun >= t.idleWant:
				t.idleT = t.sampleLocked(ev)
			}
		}
	case minihs.KindRoomSend:
		if ev.RoomID == t.echoRoom && ev.EventType == "m.room.encrypted" && t.echoSent.IsZero() && !t.echoAt.IsZero() {
			t.echoSent = ev.At
		}
	case minihs.KindKeysQuery:
		if !t.changeAt.IsZero() && t.queriedAt.IsZero() && slices.Contains(ev.Users, t.watchUser) {
			t.queriedAt = ev.At
		}
	case minihs.KindOther:
		if ev.Status == 404 {
			t.unknown[ev.Path]++
		}
	}
}

// echoBreakdown says when the first of each step of the echo happened after the peer's message.
func (t *tracker) echoBreakdown() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	var parts []string
	for _, k := range []minihs.Kind{minihs.KindSyncResponse, minihs.KindKeysQuery, minihs.KindKeysClaim, minihs.KindSendToDevice, minihs.KindRoomSend} {
		if at, ok := t.echoSteps[k]; ok {
			parts = append(parts, fmt.Sprintf("%s +%.1f ms", k, ms(at.Sub(t.echoAt))))
		}
	}
	return strings.Join(parts, ", ")
}

// waitFor waits until cond holds (checked under the tracker's lock), the bot exits or limit
// passes.
func (t *tracker) waitFor(ctx context.Context, exited <-chan struct{}, limit time.Duration, cond func() bool) error {
	deadline := time.NewTimer(limit)
	defer deadline.Stop()
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		t.mu.Lock()
		ok := cond()
		t.mu.Unlock()
		if ok {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-exited:
			return errors.New("the bot exited")
		case <-deadline.C:
			return fmt.Errorf("no result within %s", limit)
		case <-t.changed:
		case <-tick.C:
		}
	}
}

// runBot starts one bot against its own server for acct, measures it and stops it.
func runBot(ctx context.Context, spec botSpec, acct *minihs.Account, rc runConfig) (*result, error) {
	res := &result{name: spec.name}
	tr := newTracker()
	srv, err := minihs.NewServer(minihs.Options{Account: acct, API: spec.api, IdleHold: rc.idleHold, Observer: tr.observe})
	if err != nil {
		return nil, err
	}
	defer srv.Close()
	url := srv.URL()

	db := filepath.Join(rc.dbDir, fmt.Sprintf("syncbench-%s-%d.db", spec.name, time.Now().UnixNano()))
	defer removeDB(db)
	args := append([]string{
		"-homeserver", url, "-user", minihs.BotUserID.String(), "-access-token", minihs.AccessToken,
		"-device-id", minihs.BotDeviceID.String(), "-db", db,
	}, spec.extra...)
	logPath := filepath.Join(rc.logDir, spec.name+".log")
	logFile, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	defer logFile.Close()
	cmd := exec.Command(spec.bin, args...)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	tr.mu.Lock()
	tr.start = time.Now()
	err = cmd.Start()
	if err == nil {
		tr.pid = cmd.Process.Pid
	}
	tr.mu.Unlock()
	if err != nil {
		return nil, fmt.Errorf("start %s: %w", spec.name, err)
	}
	exited := make(chan struct{})
	var waitErr error
	go func() { waitErr = cmd.Wait(); close(exited) }()

	note := func(format string, args ...any) { res.notes = append(res.notes, fmt.Sprintf(format, args...)) }
	phase := func(what string, cond func() bool) bool {
		if err := tr.waitFor(ctx, exited, rc.phaseLimit, cond); err != nil {
			note("%s: %v", what, err)
			return false
		}
		return true
	}

	// A bot that persists responses but never uploads keys is reported after keyGrace rather
	// than waited for until the phase limit.
	keyGrace := rc.keyGrace
	if keyGrace <= 0 {
		keyGrace = time.Minute
	}
	var persistedAt time.Time
	okReady := phase("ready (keys uploaded and first response persisted)", func() bool {
		if tr.persisted && persistedAt.IsZero() {
			persistedAt = time.Now()
		}
		return tr.ready.measured || (!persistedAt.IsZero() && time.Since(persistedAt) > keyGrace)
	})
	if okReady && !tr.ready.measured {
		okReady = false
		note("ready: the first response was persisted but no device keys were uploaded within %s", keyGrace)
	}
	okKnown := phase("every room known", func() bool { return tr.allKnown.measured })
	tr.mu.Lock()
	hasKeys := tr.keysUploaded
	tr.mu.Unlock()
	if !hasKeys {
		note("no device keys uploaded: the echo and device-list measurements are skipped")
	}
	if okKnown && !hasKeys {
		measureIdle(ctx, tr, exited, rc, res, note)
	}
	if hasKeys && (okReady || okKnown) {
		// Let start-up work (key uploads, the last window growth) finish: one idle cycle.
		_ = tr.waitFor(ctx, exited, rc.phaseLimit, func() bool { return tr.idleRun >= 1 })
		room, peer := acct.Rooms[0], acct.Peers[0]
		tr.mu.Lock()
		tr.echoRoom, tr.echoAt = room.ID, time.Now()
		tr.mu.Unlock()
		srv.PeerMessage(0, peer.UserID, "hello from "+peer.UserID.String())
		if phase("encrypted echo", func() bool { return !tr.echoSent.IsZero() }) {
			res.echoLatency = tr.echoSent.Sub(tr.echoAt)
			note("echo steps: %s", tr.echoBreakdown())
			_ = tr.waitFor(ctx, exited, rc.phaseLimit, func() bool { return tr.idleRun >= 1 })
			users := []id.UserID{peer.UserID}
			for i := range min(rc.churn, len(acct.Users)) {
				users = append(users, acct.Users[i])
			}
			tr.mu.Lock()
			tr.watchUser = peer.UserID
			tr.mu.Unlock()
			srv.ChangeDevices(users...)
			if phase("key query after a device-list change", func() bool { return !tr.queriedAt.IsZero() }) {
				res.deviceListLatency = tr.queriedAt.Sub(tr.changeAt)
			}
		}
		measureIdle(ctx, tr, exited, rc, res, note)
	}

	rss, _ := peakRSS(tr.pid)
	_ = cmd.Process.Signal(syscall.SIGTERM)
	// VmHWM is read until the bot is gone, so that the shutdown counts too. rusage's Maxrss is
	// not used: a child started through vfork inherits the harness's RSS as its high-water
	// mark, and the harness holds the whole generated account.
	poll := time.NewTicker(5 * time.Millisecond)
	deadline := time.After(10 * time.Second)
wait:
	for {
		select {
		case <-exited:
			break wait
		case <-poll.C:
			if v, err := peakRSS(tr.pid); err == nil {
				rss = max(rss, v)
			}
		case <-deadline:
			_ = cmd.Process.Kill()
			<-exited
			note("did not stop within 10 s of SIGTERM; killed")
			break wait
		}
	}
	poll.Stop()
	if waitErr != nil && !isSignalExit(waitErr) {
		note("exit: %v (log: %s)", waitErr, logPath)
	}
	if ru, ok := cmd.ProcessState.SysUsage().(*syscall.Rusage); ok {
		res.totalCPU = time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	}
	res.peakRSSKB = rss
	tr.mu.Lock()
	defer tr.mu.Unlock()
	res.ready, res.allKnown = tr.ready, tr.allKnown
	res.syncRequests, res.responses = tr.requests, tr.responses
	for p, n := range tr.unknown {
		res.unknown = append(res.unknown, fmt.Sprintf("%s ×%d", p, n))
	}
	slices.Sort(res.unknown)
	res.totalIn, res.totalOut = srv.Bytes()
	return res, nil
}

// measureIdle measures rc.idleCycles idle long-poll cycles after a warm-up.
func measureIdle(ctx context.Context, tr *tracker, exited <-chan struct{}, rc runConfig, res *result, note func(string, ...any)) {
	tr.mu.Lock()
	tr.idleMeasure, tr.idleRun, tr.idleWant = true, 0, rc.idleCycles
	tr.idleFrom, tr.idleT = sample{}, sample{}
	tr.mu.Unlock()
	if err := tr.waitFor(ctx, exited, rc.phaseLimit, func() bool { return tr.idleT.measured }); err != nil {
		note("idle cycles: %v", err)
		return
	}
	tr.mu.Lock()
	defer tr.mu.Unlock()
	n := float64(rc.idleCycles)
	res.idleCycles = rc.idleCycles
	res.idleCPU = time.Duration(float64(tr.idleT.cpu-tr.idleFrom.cpu) / n)
	res.idleIn = float64(tr.idleT.in-tr.idleFrom.in) / n
	res.idleOut = float64(tr.idleT.out-tr.idleFrom.out) / n
	res.idleWall = time.Duration(float64(tr.idleT.at-tr.idleFrom.at) / n)
}

func isSignalExit(err error) bool {
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			return true
		}
	}
	return false
}

func removeDB(path string) {
	for _, suffix := range []string{"", "-wal", "-shm", "-journal"} {
		_ = os.Remove(path + suffix)
	}
}
