//go:build !unix

package sqlstore

// processExists cannot tell here: every holder is taken to be running.
func processExists(int) bool { return true }
