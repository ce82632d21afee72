// Package dbopen opens a [dbutil.Database] for the SDK's stores from a file path or a
// PostgreSQL URI, and registers the SQL drivers that takes. The library packages register no
// driver; import this package (from a main package or an example) to get the defaults:
//
//   - "sqlite3-fk-wal" (and "litestream"): mattn/go-sqlite3 through
//     go.mau.fi/util/dbutil/litestream, registered only when built with cgo, and then the
//     default for paths, as in mautrix's cryptohelper: in a cgo build it took less CPU than
//     the pure-Go driver both to learn a 10 000-room account and per idle long-poll
//     (BENCHMARKS.md, "Side by side").
//   - "sqlite": modernc.org/sqlite, pure Go, the default for paths when built without cgo
//     (CGO_ENABLED=0, or no C compiler). A binary that uses it and goolm cross-compiles to a
//     static binary.
//   - "postgres": github.com/lib/pq, for postgres:// and postgresql:// URIs.
package dbopen

import (
	"errors"
	"fmt"
	"io/fs"
	"net/url"
	"os"
	"strings"

	"go.mau.fi/util/dbutil"

	// Drivers: see the package documentation.
	_ "github.com/lib/pq"
	_ "go.mau.fi/util/dbutil/litestream"
	_ "modernc.org/sqlite"
)

const (
	// DriverModernc is the pure-Go SQLite driver, the default without cgo.
	DriverModernc = "sqlite"
	// DriverCgo is mattn's cgo SQLite driver with foreign keys, WAL and a busy timeout set on
	// every connection. It exists only in binaries built with cgo, where it is the default.
	DriverCgo = "sqlite3-fk-wal"
	// DriverPostgres is lib/pq.
	DriverPostgres = "postgres"
)

// Config says how to open a database. Its zero value opens SQLite files with the default
// driver (cgo's when built with cgo, else the pure-Go one) and no connection limits.
type Config struct {
	// SQLiteDriver is the driver for file paths: DriverModernc or DriverCgo. Empty means
	// DriverCgo in binaries built with cgo and DriverModernc in the others.
	SQLiteDriver string
	// MaxOpenConns limits open connections; zero means no limit.
	MaxOpenConns int
	// MaxIdleConns is how many idle connections are kept for reuse; zero means
	// 4. Without idle connections every statement opens a connection
	// (for SQLite: opening the file, running the pragmas, reading the schema) and closes it.
	MaxIdleConns int
	// Owner is recorded by dbutil to stop two programs from sharing one database by mistake;
	// empty records none.
	Owner string
	// Log receives dbutil's query and upgrade logs; nil means none.
	Log dbutil.DatabaseLogger
	// RelaxedSync opens SQLite with synchronous=NORMAL instead of FULL: commits no longer
	// wait for fsync, which makes small commits several times cheaper, but a power loss (not
	// a process crash) may undo the last commits. The SDK's to-device cursor acknowledges
	// messages to the server once committed, so an undone commit can lose room keys: leave it
	// false unless the disk has a battery-backed cache or the data is disposable.
	RelaxedSync bool
}

// defaultMaxIdleConns is Config.MaxIdleConns when it is zero.
const defaultMaxIdleConns = 4

// driverCgoFullSync is mautrix's variant of DriverCgo with synchronous=FULL.
const driverCgoFullSync = "sqlite3-fk-wal-fullsync"

// Open opens target: a postgres:// or postgresql:// URI opens PostgreSQL, anything else is a
// SQLite file path (created if missing, readable by its owner only). SQLite connections get foreign keys on, the WAL
// journal, synchronous=FULL (see Config.RelaxedSync), a 5 s busy timeout and BEGIN IMMEDIATE
// transactions, so that a transaction that reads before it writes never fails to upgrade its
// lock.
func Open(target string, cfg Config) (*dbutil.Database, error) {
	var dc dbutil.Config
	switch {
	case strings.HasPrefix(target, "postgres://"), strings.HasPrefix(target, "postgresql://"):
		dc.Type = DriverPostgres
		dc.URI = target
	default:
		driver := cfg.SQLiteDriver
		if driver == "" {
			driver = defaultSQLiteDriver
		}
		if err := createPrivate(target); err != nil {
			return nil, err
		}
		dc.Type = driver
		dc.URI = SQLiteDSN(driver, target)
		switch {
		case driver == DriverModernc && cfg.RelaxedSync:
			dc.URI = strings.Replace(dc.URI, "synchronous%28FULL%29", "synchronous%28NORMAL%29", 1)
		case driver == DriverCgo && !cfg.RelaxedSync:
			dc.Type = driverCgoFullSync
		}
	}
	dc.MaxOpenConns = cfg.MaxOpenConns
	dc.MaxIdleConns = cfg.MaxIdleConns
	if dc.MaxIdleConns <= 0 {
		dc.MaxIdleConns = defaultMaxIdleConns
	}
	db, err := dbutil.NewFromConfig(cfg.Owner, dc, cfg.Log)
	if err != nil {
		return nil, fmt.Errorf("dbopen: open %s database: %w", dc.Type, err)
	}
	return db, nil
}

// createPrivate creates a missing database file readable by its owner only: it holds access
// to the account's sync state, and with mautrix's stores in the same file, its keys. SQLite
// gives the WAL and shared-memory files the mode of the database file.
func createPrivate(path string) error {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	switch {
	case errors.Is(err, fs.ErrExist):
		return nil
	case err != nil:
		return fmt.Errorf("dbopen: create %s: %w", path, err)
	}
	return f.Close()
}

// SQLiteDSN returns the data source name that opens the SQLite file at path with driver
// (DriverModernc or DriverCgo) and the settings Open documents (with synchronous=FULL).
func SQLiteDSN(driver, path string) string {
	u := url.URL{Scheme: "file", Opaque: url.PathEscape(path)}
	q := url.Values{}
	q.Set("_txlock", "immediate")
	if driver == DriverModernc {
		// The cgo driver sets these in its connect hook.
		q.Add("_pragma", "foreign_keys(1)")
		q.Add("_pragma", "journal_mode(WAL)")
		q.Add("_pragma", "synchronous(FULL)")
		q.Add("_pragma", "busy_timeout(5000)")
	}
	u.RawQuery = q.Encode()
	return u.String()
}
