// Package minihs is an in-memory homeserver on loopback for side-by-side benchmarks of a
// sliding sync bot and a classic /sync bot, and the generator of the synthetic account both
// of them sync.
//
// [Generate] builds an [Account] from a seed: rooms (half of them encrypted) with their state
// (create, power levels, join rules, history visibility, name, encryption, the bot and a few
// members), one recent timeline event each, a pool of users, a few peers with real Olm device
// keys (so that mautrix accepts and verifies them), and queued to-device messages. Everything
// but the Olm key material follows the seed.
//
// A [Server] serves one account to one bot device, in one of two APIs:
//
//   - [APISliding]: sliding sync in Synapse's dialect (MSC4186 at the simplified_msc3575 path):
//     every response carries a SYNC op with the window's room IDs for every range, the e2ee
//     extension always carries one-time key counts and fallback key types (device_lists only
//     when the request has a pos), and ranges, timeline_limit and required_state are honoured.
//   - [APIV2]: the classic /sync (initial and incremental) with the e2ee fields Synapse always
//     sends, and a filter endpoint.
//
// Both serve the key endpoints (upload, query, claim), sendToDevice, room sends, members and
// joins. Bytes are counted on the connections in both directions, and every request of
// interest is reported to an observer with the byte counters at that moment, so a harness can
// measure the bot as a black box. A long-poll with nothing new returns after
// Options.IdleHold, so idle cycles can be measured quickly.
package minihs
