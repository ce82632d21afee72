//go:build cgo

package sqlstore_test

import (
	"testing"

	"github.com/sliding-e2ee/sdk/slidingsync/sqlstore/dbopen"
)

func TestConformanceSQLiteCgo(t *testing.T) {
	conformance(t, sqliteBackend(dbopen.DriverCgo))
}

func TestSharedDatabaseSQLiteCgo(t *testing.T) {
	sharedDatabase(t, sqliteBackend(dbopen.DriverCgo))
}

func TestLeaseSQLiteCgo(t *testing.T) {
	leaseInProcess(t, sqliteBackend(dbopen.DriverCgo))
}

// cgoDriver is the cgo SQLite driver the benchmarks compare, or empty without cgo.
const cgoDriver = dbopen.DriverCgo
