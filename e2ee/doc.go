// Package e2ee provides the sliding sync extensions that end-to-end encryption needs: e2ee
// (MSC3884, MSC4543 on v4: one-time key counts, fallback key types, device-list changes) and
// to_device (MSC3885, MSC4538: to-device messages with an acknowledgement token). [New] returns
// them for a [slidingsync.Conn]; they know nothing of the crypto layer, which receives their
// data through [Consumer] and [Config.ToDevice].
//
// # Wire keys
//
//   - e2ee: "e2ee" on MSC3575 (the proxy) and MSC4186 (Synapse); "org.matrix.msc4543.e2ee" on
//     v4 (MSC4543 supersedes MSC3884 there).
//   - to_device: "to_device" on MSC3575 and MSC4186; "org.matrix.msc4538.to_device" on v4, the
//     unstable prefix of MSC4538 ("Unstable prefix" section), overridable with
//     Config.ToDeviceV4Key for a server that uses the bare key.
//
// Both send their full configuration on every request ({"enabled": true}; to_device adds
// "limit" and "since"), because servers of the MSC4186 family keep no stickiness.
//
// # e2ee: merge
//
// [Merge] is a pure function from the last committed [State] and one response's section to the
// new State and a [Delta]. An absent or null section or field changes nothing; a present count
// map replaces the old one (an unlisted algorithm counts 0); present fallback key types replace
// the old ones, and [] means "the fallback key was used", never "unknown"; device_lists are
// deltas passed to the consumer, not stored. Servers differ and all are handled: Synapse sends
// counts and fallback types on every response and device_lists on every incremental one; the
// proxy sends counts and fallback types only initially and on change and repeats its last
// device-list delta on a request without pos; Dendrite and continuwuity never send fallback
// types, so State.NeedsFallbackKey stays false there and no keys are churned.
//
// Server input is not trusted. A section of the wrong JSON shape (a string count, a count
// that is not an integer, a list where an object belongs) is an error wrapping
// [slidingsync.ErrInvalidResponse]: nothing is committed and the connection retries with
// backoff. Well-formed but invalid entries are dropped or capped, with one warning per
// response that counts them: a malformed algorithm (empty, longer than
// 128 bytes, or not printable ASCII) is dropped; a negative count is invalid
// and dropped, so the algorithm counts 0 like an unlisted one; a count above
// 10 000 is capped, as it still means "enough keys"; algorithms beyond
// 32 are dropped; a user ID that is malformed, longer than 255 bytes, has an
// empty localpart or contains spaces or control characters is dropped. Valid users are never
// capped, as dropping a real change would leave a stale device list: the consumer bounds the
// work, since only users it tracks lead to key queries.
//
// A Delta has Gap set when device-list changes may have been missed: the request carried no
// pos (first request, or after M_UNKNOWN_POS; Synapse then sends no device_lists at all), or
// the restored state was never active although the connection has a pos (e2ee was switched on
// mid-connection). The consumer must then treat every tracked user as outdated.
//
// # e2ee: durability
//
// Per response, in the connection's order:
//
//  1. Process: decode and merge the section into the committed state (the extension's
//     checkpoint, which the connection keeps and hands back), and ask the [Consumer] what the
//     response makes it do (Consumer.HandleE2EE returns a [slidingsync.Step]). Nothing is
//     delivered yet.
//  2. The commit, in one transaction: pos, the new state as the checkpoint, and the
//     consumer's Step.Commit, which records the delta durably (marks users outdated in the
//     crypto store) with the transaction's context. A consumer with nothing to write for a
//     response (Synapse repeats the key counts in every one) returns no Step.Commit, and an
//     idle response then commits nothing but pos.
//  3. After the commit, and only then: the consumer's Step.After starts network work (key
//     queries, uploads) on the consumer's own goroutine, retried with backoff from what the
//     consumer recorded. A Step whose commit failed is dropped, so a consumer that remembers
//     what its Step.Commit wrote (to skip writing it again) can trust that memory once its
//     Step.After runs.
//
// The extension's own state holds no to-do list: the consumer's record of outdated users is
// written in the same transaction as pos (or, for a store in another database, durably before
// that transaction commits). So, for every response: if the commit happened, the device-list
// change is recorded; if it did not (crash, failed hook, failed write), pos did not advance and
// the same pos is requested again, which re-delivers the change (Synapse recomputes it from
// pos; the proxy serves a retried pos from its buffer; a forgotten pos gives M_UNKNOWN_POS and
// then a gap, which marks every tracked user outdated). A crash after the commit leaves
// outdated users in the consumer's store for its worker to drain. The extension keeps no
// fallback-key to-do either: the committed State says whether the server holds an unused
// fallback key (NeedsFallbackKey) and every commit reports it; a consumer that must remember
// more (first setup, a rotation interval, retrying the same key) records its own pending flag
// inside the transaction, as package crypto does. Replays are harmless because the consumer's handling is idempotent
// (marking a user outdated twice is marking it once) and merging a response twice gives the
// same state.
//
// # to_device
//
// The request is {"enabled": true, "limit": N, "since": S}, S being the next_batch of the last
// committed batch (left out before the first). Events are handed to [Config.ToDevice]
// during Process, before rooms are merged, and the handler must store room keys durably before
// it returns; next_batch is staged and committed with pos, so the server is told to delete a
// batch only after it was handled. Delivery is at least once. limit is never below 1 (limit 0
// makes Synapse acknowledge everything) nor above 100 (Synapse's cap). A full batch whose token
// advanced asks the connection for an immediate request without long-poll. The token survives
// M_UNKNOWN_POS. A next_batch that goes missing, or stays equal to since while events keep
// coming, keeps since, is logged once until it advances again, and never triggers an immediate
// request, so it cannot spin.
//
// # One owner per device
//
// Two connections that carry e2ee or to_device for one device steal each other's device-list
// changes and to-device messages (MSC3884 "Concurrent connections"). [New] claims the device
// in the process for each extension it returns: a second claim of the same kind returns
// [ErrDeviceAlreadyClaimed] until the first is released. Across processes, run the connection
// under the SQL store's lease and commit through its guard, so that a process that lost the
// lease cannot commit:
//
//	err := store.RunWithLease(ctx, userID, deviceID, sqlstore.LeaseConfig{}, func(ctx context.Context, l *sqlstore.Lease) error {
//		conn, err := slidingsync.New(cli, slidingsync.Config{
//			Store:      l.Guard(store),
//			Extensions: exts, // from e2ee.New
//		})
//		if err != nil {
//			return err
//		}
//		return conn.Run(ctx)
//	})
package e2ee
