// Package slidingsync is a sliding sync client: wire types for the three dialects servers
// speak, discovery, a connection loop, and a persistent, merged model of rooms and lists.
//
// # Dialects
//
//   - [ProtocolMSC3575]: the original proposal as the sliding sync proxy serves it
//     (/_matrix/client/unstable/org.matrix.msc3575/sync): ranges, sort, tuple required_state,
//     txn_id and list ops.
//   - [ProtocolMSC4186]: simplified sliding sync as Synapse serves it
//     (/_matrix/client/unstable/org.matrix.simplified_msc3575/sync): pos and timeout in the query.
//   - [ProtocolV4]: the merged MSC4186 text (/_matrix/client/v4/sync): pos, timeout and conn_id in
//     the body, one range, required_state objects, MSC4543-prefixed extension keys.
//
// [Discover] picks one: /versions advertising org.matrix.simplified_msc3575 means MSC4186; a
// .well-known proxy URL means MSC3575 at that URL; an explicit protocol always wins. A Conn
// with an explicit MSC3575 and no Config.BaseURL takes the proxy from .well-known (the
// homeserver when none is named).
//
// Configuration the servers of the chosen dialect refuse is refused before any request: on
// MSC4186, as Synapse, more than 100 lists, list names over 64 characters, timeline limits
// over 1000 and the spaces and room_name_like filters (Synapse answers those with 500 on every
// request). [New] checks it when Config.Protocol is set, Run once discovery has chosen, and
// [Conn.SetList] and [Conn.Subscribe] on every change.
//
// # The loop
//
// [Conn.Run] keeps exactly one request in flight. Each request is complete (lists,
// subscriptions, every extension's body): the client keeps stickiness, so servers that keep
// none work the same as those that keep some. Changing the configuration cancels the in-flight
// request and its response is never processed. The first request of a Run, and the first after
// the server forgets the connection, does not long-poll (its HTTP timeout is
// Config.NoPollTimeout: the server computes it at once, which can take long); later ones ask
// for Config.PollTimeout and allow Config.TimeoutMargin more at the HTTP level.
//
// A response may repeat the pos its request sent: Synapse answers every idle long-poll so. It
// is processed like any other (its extension data is current), commits nothing when it
// changes nothing, and the next request long-polls at once. Only a server that answers a
// long-poll with the same pos long before the poll ran out is backed off, so that it cannot
// make the loop spin.
//
// The store keeps the dialect and server that issued pos (Checkpoint.Origin). When Run finds
// another endpoint (a proxy replaced by native support, say), the stored pos is dropped as
// after M_UNKNOWN_POS; on another server the extensions also start from nothing, because their
// cursors (the to-device since) mean nothing there.
//
// Errors: M_UNKNOWN_POS (matched by errcode), and Synapse's 400 M_UNKNOWN "Invalid stream
// token" for a pos it cannot parse, drop pos and start afresh
// (extensions see a request without pos); M_UNKNOWN_TOKEN makes Run return; 429 waits retry_after_ms; 5xx, network errors and
// undecodable responses back off exponentially with jitter up to Config.MaxBackoff (30 s), so
// an outage costs a few requests a minute; other 4xx make Run return with an error naming the
// dialect and its URL. Every failure Run retries reaches Config.OnFailure with the length of
// its streak of identical failures, and is logged at error level once per streak.
//
// # Processing and delivery
//
// A response is processed in this order: every extension's Process (so room keys from
// to-device are stored before anything reads the timeline), the merge of lists and rooms
// (pure functions: [MergeList], [MergeRoom]), Config.OnResponse, then one [Store.Commit] of pos,
// changed lists and rooms, and the [Step] of every extension and of the handler: its
// checkpoint, and its Commit inside the transaction. Only after the commit does the new pos
// become current and do the Steps' After run. A failure anywhere before the commit commits
// nothing, drops every Step and requests the same pos again, so delivery is at least once: a
// crash or error replays the response, and handlers must be idempotent. A response whose
// Steps have no Commit and that changes nothing but pos (an idle long-poll) commits pos alone
// (one statement with sqlstore).
//
// # Extensions
//
// One contract ([Extension]): a body for every request, and for every response a [Step] that
// says what it produced: a checkpoint (a cursor), work inside the commit, work after it, more
// data pending (the next request does not long-poll), or a stall (the loop backs off). The
// Conn keeps every extension's checkpoint and hands the last committed one back with every
// call (RequestInfo.Checkpoint), so no extension keeps staged and committed copies of its
// state, and a failed cycle leaves nothing to undo. An application writes inside the commit
// through the Step that Config.OnResponse returns; it needs no extension for that.
//
// # Windows and memory
//
// A [List] pairs the wire settings ([ListConfig]) with a client-side [Window]: fixed ranges (the
// zero Window), [Grow], which covers every room step by step without long-polling, or [Scan],
// which covers every room with a kept head and a moving range (where the dialect takes several
// ranges), then keeps only the head and probes further when the window's last room has new
// activity. Config.RoomCache bounds the rooms kept in memory; the others are read from the
// store ([RoomLoader]) when a response touches them.
//
// # Merge rules
//
// A room entry with initial replaces what was known and an absent field means unset; otherwise
// an absent field is unchanged and an explicit null clears it. required_state is current
// state; a stub without content deletes. Servers that never send null (Synapse) show a
// removed name or avatar only as its state event with an empty value: such an event in
// required_state or the timeline clears it; on MSC4186 an entry without is_dm means not a DM
// (Synapse sends it on every entry of a DM). limited replaces the kept timeline and marks the
// room's membership stale ([RoomState.MembersStale]); an expanded timeline replaces it too.
// A SYNC op may echo a range reaching past the largest window index (2^18 - 1). The window of a list follows the MSC3575
// ops and never extends past its count.
//
// # Concurrency
//
// Conn's methods are safe for concurrent use. Run owns every goroutine it starts and returns
// only after they have stopped. A [RoomState] is immutable once built: the pointers Room and
// Rooms return stay consistent snapshots.
package slidingsync
