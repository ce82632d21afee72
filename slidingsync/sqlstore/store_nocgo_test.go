//go:build !cgo

package sqlstore_test

// cgoDriver is the cgo SQLite driver the benchmarks compare, or empty without cgo.
const cgoDriver = ""
