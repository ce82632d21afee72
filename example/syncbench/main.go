// Command syncbench measures, side by side in one run, the SDK's example bot (sliding sync,
// MSC4186 in Synapse's dialect) and a bot on mautrix's classic /sync pipeline (./v2bot) as
// mautrix users write it, each as a separate process against its own in-memory homeserver
// (internal/minihs) serving the same generated account. It builds the bots with -tags goolm
// into a temporary directory (the SDK's bot both with and without cgo, as the SQLite driver
// it uses depends on it), runs each of them -runs times, measures them from the server side
// as black boxes and prints a table with each figure's median, its range and the ratios to
// the first bot, with the targets.
//
//	go run -tags goolm ./example/syncbench -rooms 10000
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"time"
)

type options struct {
	rooms      int
	seed       uint64
	runs       int
	bots       string
	idleCycles int
	idleHold   time.Duration
	phaseLimit time.Duration
	churn      int
	dbDir      string
	keep       bool
	allowBig   bool
	v2Profile  string
	progress   io.Writer // where runAll reports what it does; nil for none
}

func main() {
	var o options
	flag.IntVar(&o.rooms, "rooms", 10000, "rooms in the generated account (above 10000 needs -large)")
	flag.Uint64Var(&o.seed, "seed", 1, "generator seed")
	flag.IntVar(&o.runs, "runs", 3, "runs of every bot; the table gives each figure's median and range")
	flag.StringVar(&o.bots, "bots", "v2,sdk,sdk-nocgo", "bots to run, the first being the baseline of the ratios: v2, v2-dbopen, sdk, sdk-nocgo")
	flag.IntVar(&o.idleCycles, "idle-cycles", 100, "idle long-poll cycles measured (after 3 of warm-up)")
	flag.DurationVar(&o.idleHold, "idle-hold", 150*time.Millisecond, "how long the server holds a long-poll with nothing new")
	flag.DurationVar(&o.phaseLimit, "phase-timeout", 6*time.Minute, "longest wait for one measured phase")
	flag.IntVar(&o.churn, "churn", 50, "untracked users changing devices together with the tracked one")
	flag.StringVar(&o.dbDir, "db-dir", defaultDBDir(), "directory of the bots' SQLite databases (tmpfs by default, so the disk's fsync does not dominate)")
	flag.BoolVar(&o.keep, "keep", false, "keep the work directory (binaries, bot logs)")
	flag.BoolVar(&o.allowBig, "large", false, "allow more than 10000 rooms (50000 takes several minutes and over a GB of memory)")
	flag.StringVar(&o.v2Profile, "v2-cpuprofile", "", "write CPU profiles of the v2 bots to files named after this prefix, the bot and the run")
	flag.Parse()
	if o.rooms > 10000 && !o.allowBig {
		fmt.Fprintln(os.Stderr, "syncbench: more than 10000 rooms needs -large")
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, o, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "syncbench:", err)
		os.Exit(1)
	}
}

func defaultDBDir() string {
	if st, err := os.Stat("/dev/shm"); err == nil && st.IsDir() {
		return "/dev/shm"
	}
	return os.TempDir()
}

func run(ctx context.Context, o options, w io.Writer) error {
	names, err := parseBots(o.bots)
	if err != nil {
		return err
	}
	work, err := os.MkdirTemp("", "syncbench")
	if err != nil {
		return err
	}
	if o.keep {
		fmt.Fprintln(w, "work directory:", work)
	} else {
		defer os.RemoveAll(work)
	}
	fmt.Fprintln(w, "building the bots with -tags goolm ...")
	bins, err := buildBots(ctx, work, names)
	if err != nil {
		return err
	}
	rc := runConfig{dbDir: o.dbDir, idleCycles: o.idleCycles, idleHold: o.idleHold, phaseLimit: o.phaseLimit, churn: o.churn, logDir: work}
	o.progress = w
	results, err := runAll(ctx, o, rc, names, bins)
	if err != nil {
		return err
	}
	fmt.Fprintf(w, "\n%d rooms, seed %d, %d runs, %d CPUs (%s), %s %s/%s\n\n", o.rooms, o.seed, max(o.runs, 1), runtime.NumCPU(), cpuModel(), runtime.Version(), runtime.GOOS, runtime.GOARCH)
	for _, n := range names {
		fmt.Fprintf(w, "- %s: %s\n", n, botKinds[n].what)
	}
	fmt.Fprintln(w)
	printTable(w, names, results)
	for i, rs := range results {
		for run, r := range rs {
			for _, n := range r.notes {
				fmt.Fprintf(w, "%s, run %d: %s\n", names[i], run+1, n)
			}
			if len(r.unknown) > 0 {
				fmt.Fprintf(w, "%s, run %d: endpoints the server does not serve: %s\n", names[i], run+1, strings.Join(r.unknown, ", "))
			}
		}
	}
	if o.keep {
		fmt.Fprintln(w, "bot logs (the last run of each):", work)
	}
	return nil
}

func moduleRoot(ctx context.Context) (string, error) {
	out, err := exec.CommandContext(ctx, "go", "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOMOD: %w", err)
	}
	mod := strings.TrimSpace(string(out))
	if mod == "" || mod == os.DevNull {
		return "", fmt.Errorf("run syncbench inside the module")
	}
	return filepath.Dir(mod), nil
}

func cpuModel() string {
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return "unknown CPU"
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "model name"); ok {
			return strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(v), ":"))
		}
	}
	return "unknown CPU"
}
