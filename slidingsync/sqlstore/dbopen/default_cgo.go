//go:build cgo

package dbopen

// defaultSQLiteDriver is the driver Open uses for file paths when Config.SQLiteDriver is
// empty: mattn's cgo SQLite in binaries built with cgo (see the package documentation for why).
const defaultSQLiteDriver = DriverCgo
