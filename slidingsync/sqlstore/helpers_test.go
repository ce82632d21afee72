package sqlstore_test

import (
	"context"
	"database/sql"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"
	"go.mau.fi/util/dbutil"

	"github.com/sliding-e2ee/sdk/internal/pgtest"
	"github.com/sliding-e2ee/sdk/slidingsync/sqlstore"
	"github.com/sliding-e2ee/sdk/slidingsync/sqlstore/dbopen"
	"github.com/sliding-e2ee/sdk/slidingsync/storetest"
)

func TestMain(m *testing.M) {
	if runHelperProcess() {
		return
	}
	os.Exit(pgtest.Main(m))
}

// backend names a database kind the tests run on and creates databases of that kind.
type backend struct {
	name string
	// newTarget creates an empty database and returns what dbopen.Open takes.
	newTarget func(t testing.TB) string
	cfg       dbopen.Config
}

func sqliteBackend(driver string) backend {
	return backend{
		name: "sqlite-" + driver,
		newTarget: func(t testing.TB) string {
			return filepath.Join(t.TempDir(), "slidingsync.db")
		},
		cfg: dbopen.Config{SQLiteDriver: driver},
	}
}

var postgresBackend = backend{
	name:      "postgres",
	newTarget: pgtest.NewDatabase,
}

// open opens the database at target and upgrades the store on it.
func open(t testing.TB, b backend, target string) (*dbutil.Database, *sqlstore.Store) {
	t.Helper()
	db, err := dbopen.Open(target, b.cfg)
	require.NoError(t, err)
	s := sqlstore.New(db, nil)
	require.NoError(t, s.Upgrade(context.Background()))
	return db, s
}

// sideTable is a key-value table in the store's database for the conformance suite.
type sideTable struct{ db *dbutil.Database }

func newSideTable(t testing.TB, db *dbutil.Database) *sideTable {
	_, err := db.Exec(context.Background(), `CREATE TABLE IF NOT EXISTS storetest_side (k TEXT PRIMARY KEY, v TEXT NOT NULL)`)
	require.NoError(t, err)
	return &sideTable{db: db}
}

func (st *sideTable) Put(ctx context.Context, key, value string) error {
	_, err := st.db.Exec(ctx, `INSERT INTO storetest_side (k, v) VALUES ($1, $2) ON CONFLICT (k) DO UPDATE SET v=excluded.v`, key, value)
	return err
}

func (st *sideTable) Get(ctx context.Context, key string) (string, bool, error) {
	var v string
	err := st.db.QueryRow(ctx, `SELECT v FROM storetest_side WHERE k=$1`, key).Scan(&v)
	if errors.Is(err, sql.ErrNoRows) {
		return "", false, nil
	}
	return v, err == nil, err
}

func conformance(t *testing.T, b backend) {
	storetest.Run(t, func(t *testing.T) storetest.Opener {
		target := b.newTarget(t)
		return func(t *testing.T) storetest.Opened {
			db, s := open(t, b, target)
			return storetest.Opened{Store: s, Close: db.Close, Side: newSideTable(t, s.DB)}
		}
	})
}
