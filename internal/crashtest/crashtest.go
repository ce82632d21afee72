// Package crashtest holds what the SDK's crash tests share: a replayable plan (seed and kill
// count, overridable from the environment) and starting the test binary as a child process
// that reports "ready" on its standard output before the parent may kill it.
package crashtest

import (
	"bufio"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"
)

// Plan returns the seed and the number of kills of a crash test: the values of the
// environment variables seedEnv and killsEnv when set, else a seed from the clock and
// defaultKills. It logs how to replay the run.
func Plan(t testing.TB, seedEnv, killsEnv string, defaultKills int) (seed uint64, kills int) {
	t.Helper()
	kills = defaultKills
	if v := os.Getenv(killsEnv); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n <= 0 {
			t.Fatalf("crashtest: %s=%q is not a positive number", killsEnv, v)
		}
		kills = n
	}
	seed = uint64(time.Now().UnixNano())
	if v := os.Getenv(seedEnv); v != "" {
		s, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			t.Fatalf("crashtest: %s=%q is not a seed", seedEnv, v)
		}
		seed = s
	}
	t.Logf("%d kills; replay with %s=%d", kills, seedEnv, seed)
	return seed, kills
}

// StartReady starts cmd with its standard output piped and waits for the child's first line,
// which must be "ready". It returns the rest of the output.
func StartReady(t testing.TB, cmd *exec.Cmd, seed uint64) *bufio.Reader {
	t.Helper()
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatalf("crashtest: %v", err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("crashtest: start the child: %v", err)
	}
	lines := bufio.NewReader(stdout)
	line, err := lines.ReadString('\n')
	if err != nil || strings.TrimSpace(line) != "ready" {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		t.Fatalf("crashtest: child did not start (seed %d): %q %v", seed, line, err)
	}
	return lines
}
