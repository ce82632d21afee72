// Package pgtest gives tests a fresh PostgreSQL database: on the server named by
// SLIDINGSYNC_TEST_POSTGRES, or else on a throwaway cluster it starts itself from the Debian
// server binaries (/usr/lib/postgresql/*/bin), listening only on a unix socket in a temporary
// directory. When neither is possible the test is skipped with a message that starts with
// "PostgreSQL NOT TESTED", or fails if SLIDINGSYNC_REQUIRE_POSTGRES=1 (as CI sets it).
//
// A package that uses it calls Main from TestMain, so that a cluster it started is stopped
// when the tests end.
package pgtest

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	_ "github.com/lib/pq" // The PostgreSQL driver the tests use.
	"github.com/sliding-e2ee/sdk/internal/cachedbin"
)

const (
	// EnvDSN names the variable that holds the URI (postgres://...) of a server on which the
	// tests may create and drop databases.
	EnvDSN = "SLIDINGSYNC_TEST_POSTGRES"
	// EnvRequire names the variable that, set to 1, makes a missing PostgreSQL fail the test
	// instead of skipping it.
	EnvRequire = "SLIDINGSYNC_REQUIRE_POSTGRES"
)

var (
	mu       sync.Mutex
	started  bool
	adminURI string
	startErr error
	cluster  *localCluster
)

// Main runs the tests and then stops the cluster that pgtest started, if any. Call it from
// TestMain: os.Exit(pgtest.Main(m)).
func Main(m *testing.M) int {
	code := m.Run()
	mu.Lock()
	defer mu.Unlock()
	if cluster != nil {
		if err := cluster.stop(); err != nil {
			fmt.Fprintln(os.Stderr, "pgtest: stopping the throwaway cluster:", err)
		}
		cluster = nil
	}
	return code
}

// Available reports whether NewDatabase can create databases, starting the throwaway cluster
// if that is how it would get them. A test that needs PostgreSQL for a server it starts (not
// for the code under test) calls it to skip with its own message.
func Available() error {
	_, err := server()
	return err
}

// NewDatabase creates an empty database for the test, drops it when the test ends, and returns
// its URI for lib/pq ("postgres" driver).
func NewDatabase(t testing.TB) string {
	t.Helper()
	admin, err := server()
	if err != nil {
		msg := "PostgreSQL NOT TESTED: " + err.Error()
		if os.Getenv(EnvRequire) == "1" {
			t.Fatal(msg + " (and " + EnvRequire + "=1)")
		}
		fmt.Fprintln(os.Stderr, "!!! "+msg)
		t.Skip(msg)
	}
	name := "sstest_" + cachedbin.RandomHex(8)
	adminDB, err := sql.Open("postgres", admin)
	if err != nil {
		t.Fatalf("pgtest: %v", err)
	}
	defer adminDB.Close()
	if _, err = adminDB.Exec(`CREATE DATABASE "` + name + `"`); err != nil {
		t.Fatalf("pgtest: create database: %v", err)
	}
	t.Cleanup(func() {
		db, err := sql.Open("postgres", admin)
		if err != nil {
			t.Errorf("pgtest: %v", err)
			return
		}
		defer db.Close()
		if _, err = db.Exec(`DROP DATABASE "` + name + `" WITH (FORCE)`); err != nil {
			t.Errorf("pgtest: drop database: %v", err)
		}
	})
	u, err := url.Parse(admin)
	if err != nil {
		t.Fatalf("pgtest: parse %s: %v", EnvDSN, err)
	}
	u.Path = "/" + name
	return u.String()
}

func server() (string, error) {
	mu.Lock()
	defer mu.Unlock()
	if started {
		return adminURI, startErr
	}
	started = true
	if dsn := os.Getenv(EnvDSN); dsn != "" {
		if !strings.HasPrefix(dsn, "postgres://") && !strings.HasPrefix(dsn, "postgresql://") {
			startErr = fmt.Errorf("%s must be a postgres:// URI", EnvDSN)
			return "", startErr
		}
		adminURI = dsn
		startErr = ping(dsn)
		return adminURI, startErr
	}
	cluster, startErr = startCluster()
	if startErr == nil {
		adminURI = cluster.uri
	}
	return adminURI, startErr
}

func ping(uri string) error {
	db, err := sql.Open("postgres", uri)
	if err != nil {
		return err
	}
	defer db.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err = db.PingContext(ctx); err != nil {
		return fmt.Errorf("cannot reach %s: %w", EnvDSN, err)
	}
	return nil
}

type localCluster struct {
	dir    string
	binDir string
	asUser string
	uri    string
}

// findBinDir returns the newest /usr/lib/postgresql/<version>/bin that has initdb and pg_ctl.
func findBinDir() (string, error) {
	matches, _ := filepath.Glob("/usr/lib/postgresql/*/bin/initdb")
	sort.Slice(matches, func(i, j int) bool {
		vi, _ := strconv.Atoi(filepath.Base(filepath.Dir(filepath.Dir(matches[i]))))
		vj, _ := strconv.Atoi(filepath.Base(filepath.Dir(filepath.Dir(matches[j]))))
		return vi > vj
	})
	for _, initdb := range matches {
		dir := filepath.Dir(initdb)
		if _, err := os.Stat(filepath.Join(dir, "pg_ctl")); err == nil {
			return dir, nil
		}
	}
	return "", fmt.Errorf("%s is not set and no PostgreSQL server binaries were found (apt-get install postgresql)", EnvDSN)
}

func (c *localCluster) command(name string, args ...string) *exec.Cmd {
	bin := filepath.Join(c.binDir, name)
	if c.asUser != "" {
		return exec.Command("runuser", append([]string{"-u", c.asUser, "--", bin}, args...)...)
	}
	return exec.Command(bin, args...)
}

func startCluster() (*localCluster, error) {
	binDir, err := findBinDir()
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "pgtest")
	if err != nil {
		return nil, err
	}
	c := &localCluster{dir: dir, binDir: binDir}
	if os.Geteuid() == 0 {
		// PostgreSQL refuses to run as root.
		c.asUser = "postgres"
		pgUser, err := user.Lookup(c.asUser)
		if err != nil {
			_ = os.RemoveAll(dir)
			return nil, fmt.Errorf("running as root and there is no postgres user to run the server as: %w", err)
		}
		uid, _ := strconv.Atoi(pgUser.Uid)
		gid, _ := strconv.Atoi(pgUser.Gid)
		if err = os.Chown(dir, uid, gid); err != nil {
			_ = os.RemoveAll(dir)
			return nil, err
		}
	}
	data := filepath.Join(dir, "data")
	if out, err := c.command("initdb", "-D", data, "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync").CombinedOutput(); err != nil {
		_ = os.RemoveAll(dir)
		return nil, fmt.Errorf("initdb failed: %w: %s", err, out)
	}
	conf := fmt.Sprintf("\nlisten_addresses = ''\nunix_socket_directories = '%s'\nport = 5432\nmax_connections = 200\n", dir)
	f, err := os.OpenFile(filepath.Join(data, "postgresql.conf"), os.O_APPEND|os.O_WRONLY, 0)
	if err == nil {
		_, err = f.WriteString(conf)
		err = errors.Join(err, f.Close())
	}
	if err != nil {
		_ = os.RemoveAll(dir)
		return nil, fmt.Errorf("configure cluster: %w", err)
	}
	if out, err := c.command("pg_ctl", "-D", data, "-l", filepath.Join(dir, "log"), "-w", "-t", "60", "start").CombinedOutput(); err != nil {
		log, _ := os.ReadFile(filepath.Join(dir, "log"))
		_ = os.RemoveAll(dir)
		return nil, fmt.Errorf("pg_ctl start failed: %w: %s %s", err, out, log)
	}
	c.uri = (&url.URL{
		Scheme:   "postgres",
		User:     url.User("postgres"),
		Path:     "/postgres",
		RawQuery: url.Values{"host": {dir}, "sslmode": {"disable"}}.Encode(),
	}).String()
	if err = ping(c.uri); err != nil {
		return nil, errors.Join(err, c.stop())
	}
	return c, nil
}

func (c *localCluster) stop() error {
	out, err := c.command("pg_ctl", "-D", filepath.Join(c.dir, "data"), "-m", "immediate", "-w", "stop").CombinedOutput()
	if err != nil {
		err = fmt.Errorf("pg_ctl stop: %w: %s", err, out)
	}
	return errors.Join(err, os.RemoveAll(c.dir))
}
