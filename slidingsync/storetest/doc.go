// Package storetest is a conformance suite for implementations of [slidingsync.Store]. The
// SDK runs it over its in-memory store, SQLite (both drivers) and PostgreSQL; run it over your
// own store the same way:
//
//	func TestMyStore(t *testing.T) {
//		storetest.Run(t, func(t *testing.T) storetest.Opener {
//			path := filepath.Join(t.TempDir(), "db")
//			return func(t *testing.T) storetest.Opened {
//				s := openMyStore(t, path)
//				return storetest.Opened{Store: s, Close: s.Close}
//			}
//		})
//	}
//
// Every check closes the store after it writes and opens it again before it reads back, so a
// store that only looks right while its caches are warm fails. The suite covers an empty load,
// commit then load, incremental commits that merge rooms, lists and extension checkpoints,
// isolation of keys by user, device and conn_id, transaction hooks (run once, with a context
// that writes through the same transaction when Opened.Side is set, and a failing hook that
// commits nothing), large updates, events that round-trip through [slidingsync.RoomState]'s
// JSON encoding, and concurrent commits to different keys.
//
// Checkpoints are compared through their JSON encoding, so a nil and an empty map or slice are
// equal, as are two events with the same JSON.
package storetest
