package proxytest

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/sliding-e2ee/sdk/internal/cachedbin"
	"github.com/sliding-e2ee/sdk/internal/dendritetest"
	"github.com/sliding-e2ee/sdk/internal/pgtest"
)

const (
	// Version is the release of the sliding sync proxy the harness runs.
	Version = "v0.99.19"
	// Module is the Go module the proxy is built from (Apache-2.0).
	Module = "github.com/matrix-org/sliding-sync"
	// Command is the package of the proxy's executable inside Module.
	Command = "./cmd/syncv3"

	// EnvBin names the variable that holds the path of a prebuilt proxy binary.
	EnvBin = "SLIDINGSYNC_PROXY_BIN"
	// EnvRequire names the variable that, set to 1, makes a test that cannot run the proxy
	// fail instead of skipping.
	EnvRequire = "SLIDINGSYNC_REQUIRE_PROXY"

	// SkipPrefix starts the message of every skip (and of the failure that replaces it when
	// EnvRequire is 1).
	SkipPrefix = "PROXY NOT TESTED"

	// buildTimeout stays under go test's default 10 minute timeout; a cold build (module
	// downloads included) takes about 3.5 minutes on 2 cores, a warm one seconds.
	buildTimeout = 8 * time.Minute
	startTimeout = 60 * time.Second
)

// CachedBinaryPath is where the harness caches the proxy binary it builds:
// <user cache dir>/sliding-e2ee/syncv3-<Version>.
func CachedBinaryPath() (string, error) { return cachedbin.Path(binSpec) }

var binSpec = cachedbin.Spec{Name: "syncv3", Version: Version, EnvBin: EnvBin, Build: Build}

// Binary returns the path of a proxy binary: the one named by EnvBin, else the cached one,
// else one it builds into the cache. The result is computed once per process.
func Binary() (string, error) { return binary() }

var binary = sync.OnceValues(func() (string, error) { return cachedbin.Find(binSpec) })

// Build builds the proxy Version into dst. The Go module proxy does not serve the module's
// version list, so "go install Module/cmd/syncv3@Version" is refused; Build downloads the
// module at its exact version instead ("go mod download -json"), copies it out of the
// read-only module cache and builds Command inside that copy, as the main module (so with its
// own go.mod and go.sum, and nothing entering this module's). dst is replaced atomically.
func Build(dst string) error {
	goBin, err := exec.LookPath("go")
	if err != nil {
		return fmt.Errorf("cannot build the proxy: no go command: %w", err)
	}
	if err = os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return err
	}
	work, err := os.MkdirTemp("", "syncv3-build")
	if err != nil {
		return err
	}
	defer os.RemoveAll(work)
	ctx, cancel := context.WithTimeout(context.Background(), buildTimeout)
	defer cancel()
	env := append(os.Environ(), "GOFLAGS=-mod=mod", "GOTOOLCHAIN=local", "GOWORK=off")

	dl := exec.CommandContext(ctx, goBin, "mod", "download", "-json", Module+"@"+Version)
	dl.Dir, dl.Env, dl.WaitDelay = work, env, 5*time.Second
	var stderr bytes.Buffer
	dl.Stderr = &stderr
	out, err := dl.Output()
	if err != nil {
		return fmt.Errorf("cannot download %s@%s (is the Go module proxy reachable?): %w: %s%s", Module, Version, err, cachedbin.Tail(out, 1000), cachedbin.Tail(stderr.Bytes(), 1000))
	}
	var mod struct{ Dir, Error string }
	if err = json.Unmarshal(out, &mod); err != nil || mod.Dir == "" {
		return fmt.Errorf("go mod download %s@%s: no module directory in %q (%v)", Module, Version, cachedbin.Tail(out, 1000), err)
	}
	src := filepath.Join(work, "src")
	if err = os.CopyFS(src, os.DirFS(mod.Dir)); err != nil {
		return fmt.Errorf("copy %s: %w", mod.Dir, err)
	}
	tmp := dst + ".tmp-" + cachedbin.RandomHex(4)
	defer os.Remove(tmp)
	build := exec.CommandContext(ctx, goBin, "build", "-trimpath", "-o", tmp, Command)
	build.Dir, build.Env, build.WaitDelay = src, env, 5*time.Second
	if out, err := build.CombinedOutput(); err != nil {
		return fmt.Errorf("cannot build the proxy %s (is the Go module proxy reachable?): %w: %s", Version, err, cachedbin.Tail(out, 2000))
	}
	return os.Rename(tmp, dst)
}

// skip skips the test with a message that starts with SkipPrefix, or fails it when EnvRequire
// is 1.
func skip(t testing.TB, why string) {
	t.Helper()
	cachedbin.Skip(t, SkipPrefix, EnvRequire, why)
}

// Proxy is a running (or killed) sliding sync proxy in front of a Dendrite.
type Proxy struct {
	// URL is the proxy's base URL, http://127.0.0.1:<port>; it stays the same across restarts.
	URL string
	// Upstream is the URL of the homeserver the proxy polls (SYNCV3_SERVER).
	Upstream string
	// DB is the URI of the proxy's own PostgreSQL database (SYNCV3_DB); it stays the same
	// across restarts.
	DB string

	bin, addr, secret, dir string

	mu     sync.Mutex
	proc   *cachedbin.Proc
	starts int
}

// Start starts a fresh Dendrite (dendritetest.Start with opts) that advertises the proxy in
// its /.well-known/matrix/client (opts come after that setting, so
// dendritetest.WithSlidingSyncProxy("") among them leaves the proxy unadvertised, for clients
// given its URL), then the proxy in front of it: on a free 127.0.0.1 port,
// with its own fresh database on the PostgreSQL server of pgtest (the test binary must call
// pgtest.Main from TestMain). It returns once both answer, and stops both when the test ends.
// Without a proxy binary, a Dendrite binary or PostgreSQL the test is skipped with a message
// that starts with SkipPrefix, or fails if EnvRequire is 1.
func Start(t testing.TB, opts ...dendritetest.Option) (*dendritetest.Server, *Proxy) {
	t.Helper()
	bin, err := Binary()
	if err != nil {
		skip(t, err.Error())
	}
	if _, err := dendritetest.Binary(); err != nil {
		skip(t, "no Dendrite to run it in front of: "+err.Error())
	}
	if err := pgtest.Available(); err != nil {
		skip(t, "no PostgreSQL for its database: "+err.Error())
	}
	// The proxy's port is chosen first, because Dendrite's configuration names it. It stays
	// reserved while Dendrite picks its own port.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("proxytest: %v", err)
	}
	addr := l.Addr().String()
	srv := dendritetest.Start(t, append([]dendritetest.Option{dendritetest.WithSlidingSyncProxy("http://" + addr)}, opts...)...)
	db := pgtest.NewDatabase(t)
	p := &Proxy{
		URL:      "http://" + addr,
		Upstream: srv.URL,
		DB:       db,
		bin:      bin,
		addr:     addr,
		secret:   cachedbin.RandomHex(16),
		dir:      t.TempDir(),
	}
	_ = l.Close()
	if err = p.start(); err != nil {
		t.Fatalf("proxytest: %v", err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("proxytest: log of the proxy's last run:\n%s", p.Log())
		}
		if err := p.stop(); err != nil {
			t.Errorf("proxytest: %v", err)
		}
	})
	return srv, p
}

func (p *Proxy) start() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.starts++
	cmd := exec.Command(p.bin)
	cmd.Dir = p.dir
	cmd.Env = append(os.Environ(),
		"SYNCV3_SERVER="+p.Upstream,
		"SYNCV3_DB="+p.DB,
		"SYNCV3_SECRET="+p.secret,
		"SYNCV3_BINDADDR="+p.addr,
		"SYNCV3_LOG_LEVEL=info",
	)
	// /client/server.json is served once the database is migrated and the listener is up.
	proc, err := cachedbin.Start("the proxy", cmd, filepath.Join(p.dir, fmt.Sprintf("syncv3-%d.log", p.starts)),
		p.URL+"/client/server.json", startTimeout)
	if err != nil {
		return err
	}
	p.proc = proc
	return nil
}

// Kill kills the proxy with SIGKILL, as a crash would, and waits until it has exited. Its
// database and port stay for Restart.
func (p *Proxy) Kill(t testing.TB) {
	t.Helper()
	p.mu.Lock()
	defer p.mu.Unlock()
	if err := p.proc.Kill(); err != nil {
		t.Fatalf("proxytest: %v", err)
	}
}

// Restart starts the proxy again on the same port, with the same database and secret, and
// waits until it answers; a proxy still running is killed first (SIGKILL).
func (p *Proxy) Restart(t testing.TB) {
	t.Helper()
	p.Kill(t)
	if err := p.start(); err != nil {
		t.Fatalf("proxytest: restart: %v", err)
	}
}

// Log returns the tail of the log of the proxy's current (or last) run.
func (p *Proxy) Log() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.proc.Log()
}

func (p *Proxy) stop() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.proc.Stop()
}
