// Package sqlstore persists sliding sync connections in SQLite or PostgreSQL through
// go.mau.fi/util/dbutil, as mautrix's crypto and state stores do, so one database can hold all
// three: each store is a child database with its own version table (this one's is
// slidingsync_version) and embedded upgrades (upgrades/*.sql).
//
// # What is stored
//
// Per account (user ID and device ID) and conn_id ([slidingsync.ConnKey]): the pos of the last
// processed response, every list's state, every room's merged state (required state, the
// bounded latest timeline, prev_batch, counts and flags such as MembersStale, encoded with
// [slidingsync.RoomState]'s JSON encoding), and the checkpoint of every extension. A restart
// loads them with [Store.Load] and resumes from the stored pos.
//
// # Atomicity and crash consistency
//
// [Store.Commit] writes one [slidingsync.Update] in one database transaction (dbutil's DoTxn),
// and runs the update's transaction hooks inside it with the transaction's context: writes
// that other child databases of the same parent make with that context (mautrix's crypto
// store, for one) commit or roll back with pos. Any error, from a hook or a write, rolls all of
// it back. A process that dies at any moment, SIGKILL included, leaves the database at the
// last commit: the next Load returns a pos, rooms, lists and extension checkpoints that all
// belong to one processed response, never a half-applied one. The tests prove this by killing
// a child process at random moments of its commit cycle, hundreds of times, on SQLite and on
// PostgreSQL. Durability beyond a process crash is the database's: SQLite opened by
// [dbopen] uses WAL with synchronous=FULL, so a commit also survives power loss;
// dbopen.Config.RelaxedSync trades that for cheaper commits (never consistency).
//
// [Store.Load] reads in one transaction, REPEATABLE READ on PostgreSQL, so a concurrent commit
// is seen whole or not at all.
//
// An update that writes nothing but pos (an idle long-poll, once the extensions have said
// they have nothing to write: their slidingsync.Step carries no Commit) is one statement, atomic on its own, with
// no transaction; through a lease's guard on SQLite that statement also checks the lease.
//
// On SQLite a commit that has begun runs to its end even if its context is cancelled: it is
// local and short (at most busy_timeout when another process holds the write lock), and a
// context that cannot be cancelled spares the watcher goroutines that database/sql and the
// driver start per transaction and per statement. On PostgreSQL cancellation aborts it.
//
// # Drivers
//
// The package registers no SQL driver. The application opens the database; [dbopen] does it
// from a path or a postgres:// URI and registers mattn's cgo SQLite driver (sqlite3-fk-wal, the
// default in builds with cgo), the pure-Go modernc.org/sqlite (the default without cgo) and
// lib/pq. With
// SQLite, open transactions with BEGIN IMMEDIATE (_txlock=immediate), as dbopen does, so that a
// transaction that reads before it writes cannot fail to take the write lock.
//
// Commit encodes large updates on up to GOMAXPROCS goroutines, in batches of RoomBatchSize
// rooms, while the transaction writes earlier batches as multi-row upserts; those goroutines
// have stopped when Commit returns.
//
// # Concurrency
//
// A Store is safe for concurrent use by several goroutines and processes. Commits to one key
// are serialised by the database; the last one wins. Running two connections that carry the
// e2ee or to_device extensions for one device loses data (two consumers of one to-device
// stream), so only one process per device may run that connection: take a [Lease] first.
//
// # Leases
//
// [Store.AcquireLease] takes a named lease per device (user ID and device ID), kept in the
// slidingsync_lease table as a row with a holder and an expiry. A second process waits in
// standby, trying every PollInterval, and takes over once the lease expires: within
// LeaseConfig.Duration plus PollInterval after the holder died, or at its next poll after the
// holder called Release. With default holder names (host, pid and PID namespace), a process
// on the same host takes over at once when the holder's process no longer runs: a bot
// restarted after a crash does not wait for its own old lease to expire. The holder renews every RenewInterval from a goroutine that stops on
// Release (which waits for it) or when the context passed to AcquireLease is done. [Lease.Lost]
// is closed once the lease can no longer be trusted: a renewal found another holder or an
// expired row, or no renewal succeeded before the lease would have expired, counted from
// before the last successful renewal was sent. Expiry uses the database's clock
// (clock_timestamp() on PostgreSQL, julianday('now') on SQLite), so processes on hosts whose
// clocks disagree still agree on when a lease expires; the same statements run on both
// databases. [Lease.Guard] wraps a store so that every Commit checks the lease inside its
// transaction (on PostgreSQL it also locks the lease row until the commit ends), so a process
// that lost its lease cannot commit after another one took over. [Store.RunWithLease]
// combines acquire, a context cancelled with cause [ErrLeaseLost] on loss, and release.
package sqlstore
