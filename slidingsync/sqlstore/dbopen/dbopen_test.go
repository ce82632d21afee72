package dbopen_test

import (
	"context"
	"database/sql"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.mau.fi/util/dbutil"

	"github.com/sliding-e2ee/sdk/slidingsync/sqlstore/dbopen"
)

func TestOpenSQLitePath(t *testing.T) {
	for _, driver := range []string{dbopen.DriverModernc, dbopen.DriverCgo} {
		t.Run(driver, func(t *testing.T) {
			if !slices.Contains(sql.Drivers(), driver) {
				t.Skipf("driver %s is not registered (built without cgo)", driver)
			}
			path := filepath.Join(t.TempDir(), "a dir?#%", "state.db")
			require.NoError(t, os.MkdirAll(filepath.Dir(path), 0o700))
			db, err := dbopen.Open(path, dbopen.Config{SQLiteDriver: driver})
			require.NoError(t, err)
			defer db.Close()
			assert.Equal(t, dbutil.SQLite, db.Dialect)
			ctx := context.Background()
			_, err = db.Exec(ctx, `CREATE TABLE t (x INTEGER)`)
			require.NoError(t, err)
			_, err = os.Stat(path)
			require.NoError(t, err, "the database is at the path given")
			var journal string
			var fk, busy int
			require.NoError(t, db.QueryRow(ctx, `PRAGMA journal_mode`).Scan(&journal))
			require.NoError(t, db.QueryRow(ctx, `PRAGMA foreign_keys`).Scan(&fk))
			require.NoError(t, db.QueryRow(ctx, `PRAGMA busy_timeout`).Scan(&busy))
			assert.Equal(t, "wal", journal)
			assert.Equal(t, 1, fk)
			assert.Equal(t, 5000, busy)
			assert.Equal(t, 2, synchronous(t, db), "FULL by default: a commit survives power loss")

			relaxed, err := dbopen.Open(filepath.Join(t.TempDir(), "relaxed.db"), dbopen.Config{SQLiteDriver: driver, RelaxedSync: true})
			require.NoError(t, err)
			defer relaxed.Close()
			assert.Equal(t, 1, synchronous(t, relaxed), "NORMAL when relaxed")
		})
	}
}

func synchronous(t *testing.T, db *dbutil.Database) int {
	t.Helper()
	var level int
	require.NoError(t, db.QueryRow(context.Background(), `PRAGMA synchronous`).Scan(&level))
	return level
}

func TestOpenPostgresURI(t *testing.T) {
	db, err := dbopen.Open("postgres://user@localhost/db?sslmode=disable", dbopen.Config{})
	require.NoError(t, err)
	defer db.Close()
	assert.Equal(t, dbutil.Postgres, db.Dialect)
}

func TestNewSQLiteFilesAreOwnerOnly(t *testing.T) {
	for _, driver := range []string{dbopen.DriverModernc, dbopen.DriverCgo} {
		t.Run(driver, func(t *testing.T) {
			if !slices.Contains(sql.Drivers(), driver) {
				t.Skipf("driver %s is not registered (built without cgo)", driver)
			}
			path := filepath.Join(t.TempDir(), "bot.db")
			db, err := dbopen.Open(path, dbopen.Config{SQLiteDriver: driver})
			require.NoError(t, err)
			defer db.Close()
			// The WAL and shared-memory files exist while a connection is open.
			conn, err := db.RawDB.Conn(context.Background())
			require.NoError(t, err)
			defer conn.Close()
			_, err = conn.ExecContext(context.Background(), `CREATE TABLE t (x INTEGER)`)
			require.NoError(t, err)
			_, err = conn.ExecContext(context.Background(), `INSERT INTO t VALUES (1)`)
			require.NoError(t, err)
			for _, p := range []string{path, path + "-wal", path + "-shm"} {
				st, err := os.Stat(p)
				require.NoError(t, err)
				assert.Zero(t, st.Mode().Perm()&0o077, "%s is %v", filepath.Base(p), st.Mode().Perm())
			}
		})
	}
}

func TestExistingSQLiteFileKeepsItsMode(t *testing.T) {
	path := filepath.Join(t.TempDir(), "shared.db")
	require.NoError(t, os.WriteFile(path, nil, 0o640))
	db, err := dbopen.Open(path, dbopen.Config{})
	require.NoError(t, err)
	defer db.Close()
	_, err = db.Exec(context.Background(), `CREATE TABLE t (x INTEGER)`)
	require.NoError(t, err)
	st, err := os.Stat(path)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o640), st.Mode().Perm(), "the operator's choice is kept")
}

// Statements reuse idle connections instead of opening (and configuring) a new one each.
func TestConnectionsAreReused(t *testing.T) {
	db, err := dbopen.Open(filepath.Join(t.TempDir(), "pool.db"), dbopen.Config{})
	require.NoError(t, err)
	defer db.Close()
	ctx := context.Background()
	_, err = db.Exec(ctx, `CREATE TABLE t (x INTEGER)`)
	require.NoError(t, err)
	for i := range 50 {
		_, err := db.Exec(ctx, `INSERT INTO t (x) VALUES ($1)`, i)
		require.NoError(t, err)
	}
	st := db.RawDB.Stats()
	assert.LessOrEqual(t, st.OpenConnections, 4)
	assert.GreaterOrEqual(t, st.Idle, 1, "a connection stays open for the next statement")
	assert.Zero(t, st.MaxIdleClosed, "no connection was closed for lack of idle room")
}
