// Package ssfront is a test tool: a sliding sync front for Dendrite, which has no sliding sync
// of its own. [New] returns an http.Handler that sits in front of Dendrite's client API and
// serves the MSC4186 dialect as Synapse does
// (POST /_matrix/client/unstable/org.matrix.simplified_msc3575/sync, pos and timeout in the
// query) by translating each request into Dendrite v2 /sync calls made with the caller's
// access token. Every other request is reverse-proxied unchanged, except
// GET /_matrix/client/versions, which also advertises
// unstable_features["org.matrix.simplified_msc3575"].
//
// It is meant for integration tests on loopback, not for production: all state is in memory
// and unbounded by time, nothing is persisted, and a restart of the front forgets every
// connection (clients then get M_UNKNOWN_POS).
//
// # What it supports
//
//   - Connections keyed by access token and conn_id. Each pos is an opaque counter mapped to a
//     v2 since token and to what the connection has sent so far; an unknown pos gives 400
//     M_UNKNOWN_POS. A request without pos starts afresh with an initial v2 sync and returns
//     at once; a request with pos long-polls v2 /sync with the request's timeout.
//   - Lists: count is the number of joined and invited rooms, and one SYNC op per list covers
//     the list's first range with the rooms ordered by their most recent timeline event.
//   - Rooms: a room not yet sent on the connection (or whose membership changed from invite to
//     join) is sent with initial: true, its required_state filtered from the v2 state and the
//     timeline's state events (exact types and state keys, "*", "$ME", and $LAZY for the
//     members who sent the timeline events), the name from m.room.name, the last
//     timeline_limit timeline events, prev_batch, limited, and joined and invited counts from
//     the v2 summary. Later responses carry only rooms with new timeline or state events.
//     Invites carry invite_state. A connection without lists or room subscriptions gets no
//     rooms.
//   - The e2ee extension: device_lists from v2 (left out on a request without pos, as Synapse
//     does), device_one_time_keys_count always present with signed_curve25519 filled in as 0
//     when Dendrite leaves it out (Dendrite drops the count when no key is left), and never
//     device_unused_fallback_key_types (Dendrite has no fallback keys).
//   - The to_device extension, backed by a second v2 cursor per device that is used only for
//     to-device messages: since is the v2 since and next_batch is v2's next_batch, so a since
//     the client sends acknowledges (and makes Dendrite delete) what came before it, as MSC3885
//     says. This cursor is independent of pos and survives M_UNKNOWN_POS. While a device uses
//     to_device, the to-device position inside the room cursor's v2 token is replaced by the
//     acknowledged one, so that the room cursor never deletes messages the client has not
//     acknowledged.
//
// # What it does not support
//
// Room data is not limited to the lists' windows: every joined or invited room with news is
// sent, whatever the ranges. All lists share one required_state and timeline_limit (their
// union and maximum), and room subscriptions only add their settings to that union. List
// filters, sort, heroes, avatars as fields (m.room.avatar is in required_state when asked
// for), bump_stamp, num_live, notification counts, account data, receipts, typing, the
// to_device limit (v2 has none: a batch is everything pending), and the MSC3575 and v4
// dialects are not implemented. Left rooms simply disappear from the lists. Room data comes
// only from what v2 returns: a room first sent from an incremental v2 sync (say, after lists
// were added to an extensions-only connection) carries only the state that sync returned,
// although Dendrite sends full state for a room newly joined.
package ssfront
