package sqlstore_test

import (
	"os"

	"go.mau.fi/util/dbutil"

	"github.com/sliding-e2ee/sdk/slidingsync/sqlstore"
)

// envHelper selects what a re-executed test binary does instead of running tests.
const envHelper = "SLIDINGSYNC_SQLSTORE_HELPER"

var helpers = map[string]func() int{
	"crash": crashChild,
	"lease": leaseChild,
}

// runHelperProcess runs the helper named by envHelper and exits, or returns false when the
// binary runs as a test.
func runHelperProcess() bool {
	name := os.Getenv(envHelper)
	if name == "" {
		return false
	}
	fn := helpers[name]
	if fn == nil {
		os.Stderr.WriteString("unknown helper " + name + "\n")
		os.Exit(2)
	}
	os.Exit(fn())
	return true
}

func newStoreFor(db *dbutil.Database) *sqlstore.Store {
	return sqlstore.New(db, nil)
}
