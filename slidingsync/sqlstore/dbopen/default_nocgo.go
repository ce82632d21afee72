//go:build !cgo

package dbopen

// defaultSQLiteDriver is the driver Open uses for file paths when Config.SQLiteDriver is
// empty: the pure-Go driver in binaries built without cgo, where it is the only one.
const defaultSQLiteDriver = DriverModernc
