package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/sliding-e2ee/sdk/internal/minihs"
)

// botKind is one bot the benchmark can run: a package, how it is built and the arguments
// that make it that bot.
type botKind struct {
	pkg  string     // package built
	cgo  bool       // built with CGO_ENABLED=1 (else 0)
	api  minihs.API // the API its server speaks
	args []string   // extra arguments
	what string     // one line for the legend
}

// botKinds are the bots -bots can name. "v2" is what a mautrix bot on /sync runs today; the
// SDK's bot is built twice because the SQLite driver it uses by default depends on cgo.
var botKinds = map[string]botKind{
	"v2": {pkg: "./example/syncbench/v2bot", cgo: true, api: minihs.APIV2, args: []string{"-store", "path"},
		what: "mautrix on /sync as its users write it: cryptohelper.NewCryptoHelper(cli, key, path), mattn's cgo SQLite with mautrix's settings (WAL, synchronous=NORMAL)"},
	"v2-dbopen": {pkg: "./example/syncbench/v2bot", api: minihs.APIV2, args: []string{"-store", "dbopen"},
		what: "the same mautrix bot on the SDK's dbopen: pure-Go SQLite, synchronous=FULL (the earlier baseline)"},
	"sdk": {pkg: "./example/e2eebot", cgo: true, api: minihs.APISliding, args: []string{"-protocol", "msc4186"},
		what: "the SDK's example bot (MSC4186 in Synapse's dialect), cgo build"},
	"sdk-nocgo": {pkg: "./example/e2eebot", api: minihs.APISliding, args: []string{"-protocol", "msc4186"},
		what: "the same bot built with CGO_ENABLED=0"},
}

// parseBots reads -bots: known names, none twice.
func parseBots(list string) ([]string, error) {
	var out []string
	for _, n := range strings.Split(list, ",") {
		n = strings.TrimSpace(n)
		if _, ok := botKinds[n]; !ok {
			return nil, fmt.Errorf("-bots: unknown bot %q (known: v2, v2-dbopen, sdk, sdk-nocgo)", n)
		}
		if slices.Contains(out, n) {
			return nil, fmt.Errorf("-bots: %q named twice", n)
		}
		out = append(out, n)
	}
	return out, nil
}

// buildBots builds each distinct binary the named bots need into dir and returns the path of
// each bot's binary.
func buildBots(ctx context.Context, dir string, names []string) (map[string]string, error) {
	root, err := moduleRoot(ctx)
	if err != nil {
		return nil, err
	}
	bins := map[string]string{}
	built := map[string]string{}
	for _, n := range names {
		k := botKinds[n]
		key := fmt.Sprintf("%s cgo=%v", k.pkg, k.cgo)
		if bin, ok := built[key]; ok {
			bins[n] = bin
			continue
		}
		bin := filepath.Join(dir, n)
		cmd := exec.CommandContext(ctx, "go", "build", "-tags", "goolm", "-o", bin, k.pkg)
		cmd.Dir = root
		cmd.Env = append(os.Environ(), "CGO_ENABLED="+map[bool]string{true: "1", false: "0"}[k.cgo])
		if out, err := cmd.CombinedOutput(); err != nil {
			return nil, fmt.Errorf("go build %s (%s): %w\n%s", k.pkg, key, err, out)
		}
		built[key], bins[n] = bin, bin
	}
	return bins, nil
}

// pollArgs makes a bot's long-poll as long as the server's idle hold. Synapse holds an idle
// long-poll until the client's timeout and then answers with the same pos; the fake server
// holds it for rc.idleHold instead (so that an idle cycle takes 150 ms, not 30 s), and a
// sliding sync client that asked for 30 s must see an answer after its own timeout, as from
// Synapse, not a server answering at once. The v2 bot takes no such flag; its server cuts its
// long-poll to the same hold.
func pollArgs(k botKind, rc runConfig) []string {
	if k.api != minihs.APISliding || rc.idleHold <= 0 {
		return nil
	}
	return []string{"-poll-timeout", rc.idleHold.String()}
}

// runAll generates the account once and runs every named bot o.runs times, the bots one after
// the other within each run. It returns results[bot][run].
func runAll(ctx context.Context, o options, rc runConfig, names []string, bins map[string]string) ([][]*result, error) {
	say := func(format string, args ...any) {
		if o.progress != nil {
			fmt.Fprintf(o.progress, format+"\n", args...)
		}
	}
	start := time.Now()
	acct, err := minihs.Generate(minihs.GenConfig{Rooms: o.rooms, Seed: o.seed})
	if err != nil {
		return nil, err
	}
	say("account: %d rooms (%d encrypted), %d users, %d peers with device keys, %d to-device messages; generated in %s",
		len(acct.Rooms), (len(acct.Rooms)+1)/2, len(acct.Users), len(acct.Peers), len(acct.ToDevice), time.Since(start).Round(time.Millisecond))
	out := make([][]*result, len(names))
	for run := range max(o.runs, 1) {
		for i, n := range names {
			k := botKinds[n]
			spec := botSpec{name: n, bin: bins[n], api: k.api, extra: append(slices.Clone(k.args), pollArgs(k, rc)...)}
			if o.v2Profile != "" && k.pkg == botKinds["v2"].pkg {
				spec.extra = append(spec.extra, "-cpuprofile", fmt.Sprintf("%s.%s.%d", o.v2Profile, n, run+1))
			}
			say("run %d of %d: %s ...", run+1, max(o.runs, 1), n)
			res, err := runBot(ctx, spec, acct, rc)
			if err != nil {
				return nil, err
			}
			out[i] = append(out[i], res)
		}
	}
	return out, nil
}
