package sqlstore_test

import (
	"context"
	"strconv"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/sliding-e2ee/sdk/slidingsync"
	"github.com/sliding-e2ee/sdk/slidingsync/sqlstore/dbopen"
)

func TestConformanceSQLiteModernc(t *testing.T) {
	conformance(t, sqliteBackend(dbopen.DriverModernc))
}

func TestConformancePostgres(t *testing.T) {
	conformance(t, postgresBackend)
}

func TestConns(t *testing.T) {
	for _, b := range []backend{sqliteBackend(dbopen.DriverModernc), postgresBackend} {
		t.Run(b.name, func(t *testing.T) {
			ctx := context.Background()
			target := b.newTarget(t)
			db, s := open(t, b, target)
			keys := []slidingsync.ConnKey{
				{UserID: "@b:x", DeviceID: "D1", ConnID: ""},
				{UserID: "@a:x", DeviceID: "D2", ConnID: "enc"},
				{UserID: "@a:x", DeviceID: "D2", ConnID: ""},
			}
			got, err := s.Conns(ctx)
			require.NoError(t, err)
			assert.Empty(t, got)
			for i, k := range keys {
				require.NoError(t, s.Commit(ctx, k, &slidingsync.Update{Pos: strconv.Itoa(i)}))
			}
			require.NoError(t, db.Close())
			db, s = open(t, b, target)
			defer db.Close()
			got, err = s.Conns(ctx)
			require.NoError(t, err)
			assert.Equal(t, []slidingsync.ConnKey{keys[2], keys[1], keys[0]}, got)
			require.NoError(t, s.Delete(ctx, keys[1]))
			got, err = s.Conns(ctx)
			require.NoError(t, err)
			assert.Equal(t, []slidingsync.ConnKey{keys[2], keys[0]}, got)
		})
	}
}
