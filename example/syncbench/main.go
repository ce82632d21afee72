// Command syncbench measures, side by side in one run, the SDK's example bot (sliding sync,
// MSC4186 in Synapse's dialect) and a bot on mautrix's classic /sync pipeline (./v2bot), each
// as a separate process against its own in-memory homeserver (internal/minihs) serving the
// same generated account. It builds both bots with -tags goolm into a temporary directory,
// runs them one after the other, measures them from the server side as black boxes and
// prints a table with the SDK/v2 ratios and the targets.
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

	"github.com/sliding-e2ee/sdk/internal/minihs"
)

type options struct {
	rooms      int
	seed       uint64
	idleCycles int
	idleHold   time.Duration
	phaseLimit time.Duration
	churn      int
	dbDir      string
	only       string
	sdkBin     string
	v2Bin      string
	keep       bool
	allowBig   bool
	v2Profile  string
	v2Idle     int
	progress   io.Writer // where runPair reports what it does; nil for none
}

func main() {
	var o options
	flag.IntVar(&o.rooms, "rooms", 10000, "rooms in the generated account (above 10000 needs -large)")
	flag.Uint64Var(&o.seed, "seed", 1, "generator seed")
	flag.IntVar(&o.idleCycles, "idle-cycles", 100, "idle long-poll cycles measured (after 3 of warm-up)")
	flag.DurationVar(&o.idleHold, "idle-hold", 150*time.Millisecond, "how long the server holds a long-poll with nothing new")
	flag.DurationVar(&o.phaseLimit, "phase-timeout", 6*time.Minute, "longest wait for one measured phase")
	flag.IntVar(&o.churn, "churn", 50, "untracked users changing devices together with the tracked one")
	flag.StringVar(&o.dbDir, "db-dir", defaultDBDir(), "directory of the bots' SQLite databases (tmpfs by default, so the disk's fsync does not dominate)")
	flag.StringVar(&o.only, "only", "both", "which bots to run: both, v2 or sdk")
	flag.StringVar(&o.sdkBin, "sdk-bin", "", "prebuilt example/e2eebot binary (default: build it)")
	flag.StringVar(&o.v2Bin, "v2-bin", "", "prebuilt example/syncbench/v2bot binary (default: build it)")
	flag.BoolVar(&o.keep, "keep", false, "keep the work directory (binaries, bot logs)")
	flag.BoolVar(&o.allowBig, "large", false, "allow more than 10000 rooms (50000 takes several minutes and over a GB of memory)")
	flag.StringVar(&o.v2Profile, "v2-cpuprofile", "", "write a CPU profile of the v2 bot to this file")
	flag.IntVar(&o.v2Idle, "v2-max-idle-conns", 0, "idle SQLite connections of the v2 bot: 0 is dbopen's default, as for the SDK's bot; negative keeps none")
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
	work, err := os.MkdirTemp("", "syncbench")
	if err != nil {
		return err
	}
	if o.keep {
		fmt.Fprintln(w, "work directory:", work)
	} else {
		defer os.RemoveAll(work)
	}
	if o.sdkBin == "" || o.v2Bin == "" {
		fmt.Fprintln(w, "building the bots with -tags goolm ...")
		sdk, v2, err := buildBots(ctx, work)
		if err != nil {
			return err
		}
		o.sdkBin, o.v2Bin = cmp(o.sdkBin, sdk), cmp(o.v2Bin, v2)
	}
	rc := runConfig{dbDir: o.dbDir, idleCycles: o.idleCycles, idleHold: o.idleHold, phaseLimit: o.phaseLimit, churn: o.churn, logDir: work}
	if o.only != "both" && o.only != "v2" {
		o.v2Bin = ""
	}
	if o.only != "both" && o.only != "sdk" {
		o.sdkBin = ""
	}
	o.progress = w
	v2, sdk, err := runPair(ctx, o, rc, o.v2Bin, o.sdkBin)
	if err != nil {
		return err
	}
	fmt.Fprintf(w, "\n%d rooms, seed %d, %d CPUs (%s), %s %s/%s\n\n", o.rooms, o.seed, runtime.NumCPU(), cpuModel(), runtime.Version(), runtime.GOOS, runtime.GOARCH)
	printTable(w, v2, sdk)
	for _, r := range []*result{v2, sdk} {
		if r == nil {
			continue
		}
		for _, n := range r.notes {
			fmt.Fprintf(w, "%s: %s\n", r.name, n)
		}
		if len(r.unknown) > 0 {
			fmt.Fprintf(w, "%s: endpoints the server does not serve: %s\n", r.name, strings.Join(r.unknown, ", "))
		}
	}
	if o.keep {
		fmt.Fprintln(w, "bot logs:", filepath.Join(work, "v2.log"), filepath.Join(work, "sdk.log"))
	}
	return nil
}

// runPair generates the account and runs the v2 bot and then the SDK bot; an empty binary
// skips that bot.
func runPair(ctx context.Context, o options, rc runConfig, v2Bin, sdkBin string) (v2, sdk *result, err error) {
	say := func(format string, args ...any) {
		if o.progress != nil {
			fmt.Fprintf(o.progress, format+"\n", args...)
		}
	}
	start := time.Now()
	acct, err := minihs.Generate(minihs.GenConfig{Rooms: o.rooms, Seed: o.seed})
	if err != nil {
		return nil, nil, err
	}
	say("account: %d rooms (%d encrypted), %d users, %d peers with device keys, %d to-device messages; generated in %s",
		len(acct.Rooms), (len(acct.Rooms)+1)/2, len(acct.Users), len(acct.Peers), len(acct.ToDevice), time.Since(start).Round(time.Millisecond))
	if v2Bin != "" {
		say("running the v2 /sync bot ...")
		spec := botSpec{name: "v2", bin: v2Bin, api: minihs.APIV2, extra: []string{"-max-idle-conns", fmt.Sprint(o.v2Idle)}}
		if o.v2Profile != "" {
			spec.extra = append(spec.extra, "-cpuprofile", o.v2Profile)
		}
		if v2, err = runBot(ctx, spec, acct, rc); err != nil {
			return nil, nil, err
		}
	}
	if sdkBin != "" {
		say("running the SDK bot (sliding sync) ...")
		spec := botSpec{name: "sdk", bin: sdkBin, api: minihs.APISliding, extra: []string{"-protocol", "msc4186"}}
		if sdk, err = runBot(ctx, spec, acct, rc); err != nil {
			return nil, nil, err
		}
	}
	return v2, sdk, nil
}

func cmp(a, b string) string {
	if a != "" {
		return a
	}
	return b
}

// buildBots builds example/e2eebot and example/syncbench/v2bot into dir.
func buildBots(ctx context.Context, dir string) (sdk, v2 string, err error) {
	root, err := moduleRoot(ctx)
	if err != nil {
		return "", "", err
	}
	sdk, v2 = filepath.Join(dir, "e2eebot"), filepath.Join(dir, "v2bot")
	for bin, pkg := range map[string]string{sdk: "./example/e2eebot", v2: "./example/syncbench/v2bot"} {
		cmd := exec.CommandContext(ctx, "go", "build", "-tags", "goolm", "-o", bin, pkg)
		cmd.Dir = root
		if out, err := cmd.CombinedOutput(); err != nil {
			return "", "", fmt.Errorf("go build %s: %w\n%s", pkg, err, out)
		}
	}
	return sdk, v2, nil
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
