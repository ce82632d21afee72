package sqlstore

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"strconv"
	"strings"
)

// defaultHolder names this process in a lease: "host:pid:random@pidns", where pidns
// identifies the PID namespace (on Linux; empty elsewhere). A process on the same host and in
// the same PID namespace can then tell whether the holder still runs.
func defaultHolder() string {
	host, _ := os.Hostname()
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	return fmt.Sprintf("%s:%d:%s@%s", host, os.Getpid(), hex.EncodeToString(b), pidNamespace())
}

// pidNamespace identifies this process's PID namespace, or "" where there is none to read
// (processes then share one if they share a host).
func pidNamespace() string {
	link, err := os.Readlink("/proc/self/ns/pid")
	if err != nil {
		return ""
	}
	return strings.TrimSuffix(strings.TrimPrefix(link, "pid:["), "]")
}

// holderGone reports whether a lease holder is provably no longer running: a default holder
// name of this host and PID namespace whose process does not exist. Any other holder (another
// host, a name given in LeaseConfig.Holder, a process that runs) is not known to be gone.
func holderGone(holder string) bool {
	rest, ns, ok := strings.Cut(holder, "@")
	if !ok || ns != pidNamespace() {
		return false
	}
	parts := strings.Split(rest, ":")
	if len(parts) < 3 {
		return false
	}
	host := strings.Join(parts[:len(parts)-2], ":")
	pid, err := strconv.Atoi(parts[len(parts)-2])
	if self, _ := os.Hostname(); err != nil || host != self || pid <= 0 || pid == os.Getpid() {
		return false
	}
	return !processExists(pid)
}
