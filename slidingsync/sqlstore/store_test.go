package sqlstore_test

import (
	"testing"

	"github.com/sliding-e2ee/sdk/slidingsync/sqlstore/dbopen"
)

func TestConformanceSQLiteModernc(t *testing.T) {
	conformance(t, sqliteBackend(dbopen.DriverModernc))
}

func TestConformancePostgres(t *testing.T) {
	conformance(t, postgresBackend)
}
