package dendritetest

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/pem"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"maunium.net/go/mautrix"

	"github.com/sliding-e2ee/sdk/internal/cachedbin"
)

const (
	// Version is the Dendrite release the harness runs.
	Version = "v0.13.8"
	// Module is the Go module Dendrite is built from (Apache-2.0; not the AGPL fork).
	Module = "github.com/matrix-org/dendrite"

	// EnvBin names the variable that holds the path of a prebuilt Dendrite binary.
	EnvBin = "SLIDINGSYNC_DENDRITE_BIN"
	// EnvRequire names the variable that, set to 1, makes a missing Dendrite fail the test
	// instead of skipping it.
	EnvRequire = "SLIDINGSYNC_REQUIRE_DENDRITE"

	// ServerName is the server name of every Dendrite the harness starts.
	ServerName = "localhost"

	// buildTimeout stays under go test's default 10 minute timeout; a cold build takes about
	// 3.5 minutes on 2 cores.
	buildTimeout = 8 * time.Minute
	startTimeout = 60 * time.Second
)

// Server is a running Dendrite.
type Server struct {
	// URL is the client-server API base URL, http://127.0.0.1:<port>.
	URL string
	// Dir holds the configuration, databases and log of this server.
	Dir string

	proc *cachedbin.Proc
}

// CachedBinaryPath is where the harness caches the Dendrite binary it builds:
// <user cache dir>/sliding-e2ee/dendrite-<Version>.
func CachedBinaryPath() (string, error) { return cachedbin.Path(binSpec) }

var binSpec = cachedbin.Spec{Name: "dendrite", Version: Version, EnvBin: EnvBin, Build: Build}

// Binary returns the path of a Dendrite binary: the one named by EnvBin, else the cached one,
// else one it builds into the cache. The result is computed once per process.
func Binary() (string, error) { return binary() }

var binary = sync.OnceValues(func() (string, error) { return cachedbin.Find(binSpec) })

// Build builds Dendrite Version into dst in a throwaway module, so that Dendrite's
// dependencies never enter this module's go.mod. It needs the go command and the Go module
// proxy (or a module cache that already holds Dendrite). It builds with cgo when a C compiler
// is available (mattn's SQLite, Dendrite's default) and without otherwise (Dendrite then uses
// modernc's SQLite). dst is replaced atomically.
func Build(dst string) error {
	goBin, err := exec.LookPath("go")
	if err != nil {
		return fmt.Errorf("cannot build Dendrite: no go command: %w", err)
	}
	if err = os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return err
	}
	mod, err := os.MkdirTemp("", "dendrite-build")
	if err != nil {
		return err
	}
	defer os.RemoveAll(mod)
	gomod := "module dendritebuild\n\ngo 1.21\n\nrequire " + Module + " " + Version + "\n"
	if err = os.WriteFile(filepath.Join(mod, "go.mod"), []byte(gomod), 0o644); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), buildTimeout)
	defer cancel()
	tmp := dst + ".tmp-" + cachedbin.RandomHex(4)
	defer os.Remove(tmp)
	cmd := exec.CommandContext(ctx, goBin, "build", "-trimpath", "-o", tmp, Module+"/cmd/dendrite")
	cmd.Dir = mod
	cmd.Env = append(os.Environ(), "GOFLAGS=-mod=mod", "GOTOOLCHAIN=local", "GOWORK=off")
	if _, err := exec.LookPath("gcc"); err != nil {
		cmd.Env = append(cmd.Env, "CGO_ENABLED=0")
	}
	cmd.WaitDelay = 5 * time.Second
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("cannot build Dendrite %s (is the Go module proxy reachable?): %w: %s", Version, err, cachedbin.Tail(out, 2000))
	}
	return os.Rename(tmp, dst)
}

// Option changes how [Start] configures Dendrite.
type Option func(*settings)

type settings struct {
	slidingSyncProxy string
}

// WithSlidingSyncProxy makes Dendrite advertise a sliding sync proxy at proxyURL: its
// /.well-known/matrix/client then names the server itself as m.homeserver (its own loopback
// URL) and proxyURL under "org.matrix.msc3575.proxy" (Dendrite's
// global.well_known_client_name and global.well_known_sliding_sync_proxy). Without it, or
// with an empty proxyURL, Dendrite serves no .well-known/matrix/client. The proxy need not
// run yet: Dendrite only passes the URL on.
func WithSlidingSyncProxy(proxyURL string) Option {
	return func(s *settings) { s.slidingSyncProxy = proxyURL }
}

// Start starts a fresh Dendrite for the test (SQLite databases in a temporary directory,
// client API on a free loopback port, federation, presence and rate limiting off, open
// registration) and stops it when the test ends. Without a Dendrite binary the test is
// skipped with a message that starts with "DENDRITE NOT TESTED", or fails if EnvRequire is 1.
func Start(t testing.TB, opts ...Option) *Server {
	t.Helper()
	var set settings
	for _, o := range opts {
		o(&set)
	}
	bin, err := Binary()
	if err != nil {
		cachedbin.Skip(t, "DENDRITE NOT TESTED", EnvRequire, err.Error())
	}
	dir := t.TempDir()
	if err = writeKey(filepath.Join(dir, "matrix_key.pem")); err != nil {
		t.Fatalf("dendritetest: %v", err)
	}
	// The port is picked by listening on :0 and closing; another process could take it in
	// between, so a start that fails to answer is retried on a new port.
	var lastErr error
	for attempt := 0; attempt < 3; attempt++ {
		port, err := freePort()
		if err != nil {
			t.Fatalf("dendritetest: %v", err)
		}
		// The configuration names the server's own URL in .well-known, so it is written
		// for each port.
		if err = os.WriteFile(filepath.Join(dir, "dendrite.yaml"), []byte(config(dir, port, set)), 0o644); err != nil {
			t.Fatalf("dendritetest: %v", err)
		}
		s, err := launch(bin, dir, port)
		if err == nil {
			t.Cleanup(func() {
				if err := s.proc.Stop(); err != nil {
					t.Errorf("dendritetest: %v", err)
				}
			})
			return s
		}
		lastErr = err
	}
	t.Fatalf("dendritetest: %v", lastErr)
	return nil
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func writeKey(path string) error {
	seed := make([]byte, ed25519.SeedSize)
	if _, err := rand.Read(seed); err != nil {
		return err
	}
	block := &pem.Block{
		Type:    "MATRIX PRIVATE KEY",
		Headers: map[string]string{"Key-ID": "ed25519:" + cachedbin.RandomHex(3)},
		Bytes:   seed,
	}
	return os.WriteFile(path, pem.EncodeToMemory(block), 0o600)
}

func launch(bin, dir string, port int) (*Server, error) {
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	cmd := exec.Command(bin,
		"-config", filepath.Join(dir, "dendrite.yaml"),
		"-http-bind-address", addr,
		"-really-enable-open-registration",
	)
	cmd.Dir = dir
	proc, err := cachedbin.Start("dendrite", cmd, filepath.Join(dir, fmt.Sprintf("dendrite-%d.log", port)),
		"http://"+addr+"/_matrix/client/versions", startTimeout)
	if err != nil {
		return nil, err
	}
	return &Server{URL: "http://" + addr, Dir: dir, proc: proc}, nil
}

// Client returns a mautrix client for this server with no user set.
func (s *Server) Client(t testing.TB) *mautrix.Client {
	t.Helper()
	cli, err := mautrix.NewClient(s.URL, "", "")
	if err != nil {
		t.Fatalf("dendritetest: %v", err)
	}
	cli.Client = &http.Client{Timeout: 60 * time.Second}
	return cli
}

// Register registers @localpart:localhost with the m.login.dummy flow and returns a client
// logged in as it, with user ID, device ID and access token set.
func (s *Server) Register(t testing.TB, localpart string) *mautrix.Client {
	t.Helper()
	return s.RegisterWithPassword(t, localpart, "password-"+cachedbin.RandomHex(8))
}

// RegisterWithPassword is Register with a known password, for tests that log in again.
func (s *Server) RegisterWithPassword(t testing.TB, localpart, password string) *mautrix.Client {
	t.Helper()
	cli := s.Client(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	resp, err := cli.RegisterDummy(ctx, &mautrix.ReqRegister[any]{
		Username:                 localpart,
		Password:                 password,
		InitialDeviceDisplayName: localpart + " test device",
	})
	if err != nil {
		t.Fatalf("dendritetest: register %s: %v", localpart, err)
	}
	cli.UserID = resp.UserID
	cli.DeviceID = resp.DeviceID
	cli.AccessToken = resp.AccessToken
	return cli
}

// config is the Dendrite configuration: SQLite under dir, everything that would reach out
// or slow tests down off, and the .well-known entries that set asks for.
func config(dir string, port int, set settings) string {
	db := func(name string) string {
		return "    connection_string: file:" + filepath.Join(dir, name+".db") + "\n"
	}
	wellKnown := ""
	if set.slidingSyncProxy != "" {
		wellKnown = fmt.Sprintf("  well_known_client_name: %q\n  well_known_sliding_sync_proxy: %q\n",
			fmt.Sprintf("http://127.0.0.1:%d", port), set.slidingSyncProxy)
	}
	return `version: 2
global:
  server_name: ` + ServerName + `
` + wellKnown + `  private_key: ` + filepath.Join(dir, "matrix_key.pem") + `
  key_validity_period: 168h0m0s
  disable_federation: true
  presence:
    enable_inbound: false
    enable_outbound: false
  trusted_third_party_id_servers: []
  jetstream:
    storage_path: ` + dir + `
    addresses: []
    topic_prefix: Dendrite
    in_memory: true
  metrics:
    enabled: false
  sentry:
    enabled: false
  dns_cache:
    enabled: false
  server_notices:
    enabled: false
  report_stats:
    enabled: false
  cache:
    max_size_estimated: 67108864
    max_age: 1h0m0s
client_api:
  registration_disabled: false
  registration_requires_token: false
  guests_disabled: true
  enable_registration_captcha: false
  rate_limiting:
    enabled: false
federation_api:
  database:
` + db("federationapi") + `  send_max_retries: 1
  key_perspectives: []
key_server:
  database:
` + db("keyserver") + `media_api:
  database:
` + db("mediaapi") + `  base_path: ` + filepath.Join(dir, "media") + `
  max_file_size_bytes: 10485760
  dynamic_thumbnails: false
room_server:
  default_room_version: "10"
  database:
` + db("roomserver") + `sync_api:
  database:
` + db("syncapi") + `  search:
    enabled: false
user_api:
  bcrypt_cost: 4
  account_database:
` + db("userapi") + `relay_api:
  database:
` + db("relayapi") + `mscs:
  mscs: []
  database:
` + db("mscs") + `tracing:
  enabled: false
logging:
- type: std
  level: warn
`
}
