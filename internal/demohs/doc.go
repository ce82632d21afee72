// Package demohs is an in-memory homeserver on loopback for the example bot's demo and for
// tests that run a bot as a separate process: one bot device, scripted peers with real Olm
// machines, and the endpoints the SDK's crypto flow needs.
//
// A [Server] listens on 127.0.0.1 (httptest). Sliding sync (MSC4186, at the
// simplified_msc3575 path) goes through a slidingsynctest.Server with its Synapse
// personality and a Responder, behind a long-poll that waits until the bot has something new
// or its timeout (at most Options.PollTimeout) ends. An answer without news, such as an idle
// long-poll's, keeps the request's pos and carries the e2ee counts, as Synapse does; requests
// are checked against Synapse's request model. It serves:
//
//   - sync: the list ranges are honoured and echoed in the SYNC ops (the bot scans the
//     list), a list without ranges only counted, required_state and timeline_limit of the
//     list, invites as invite_state, a room the bot joined sent again as initial; the e2ee
//     extension with device_one_time_keys_count and
//     device_unused_fallback_key_types on every response and device_lists.changed when the
//     request has a pos; the to_device extension with since, limit and next_batch, a message
//     being deleted only once a later request's since acknowledges it.
//   - /keys/upload, /keys/query, /keys/claim (a one-time key first, in upload order, then the
//     fallback key, which is marked used so that the next response reports []),
//     /sendToDevice (queued per device, deduplicated by transaction ID),
//     PUT /rooms/{id}/send (the same transaction ID from the same device gives the same event
//     ID, unless Options.NoTxnDedup makes it store a second event as Dendrite does after a
//     lost answer; Options.SendFault can store a send and then lose its answer), /join,
//     /rooms/{id}/join, /rooms/{id}/members, /rooms/{id}/messages (backwards, from a token or
//     the end), GET /rooms/{id}/state/{type}/{key}, /login (the bot's password), /account/whoami and /versions. The sender of an
//     event sees its transaction ID in unsigned.transaction_id, in the sync timeline and in
//     /messages, as the client-server API specifies.
//
// Positions encode what the connection has seen (the server's stream position and how many
// of the generated rooms were sent), so the server keeps no per-connection state: a bot that
// restarts from an older committed pos gets everything after it again, which makes the
// server usable by a harness that kills the bot at any moment. A pos from the future (another
// server run) gets M_UNKNOWN_POS, one it cannot parse 400 M_UNKNOWN "Invalid stream token".
//
// A [Peer] is another user's device with a real mautrix OlmMachine (goolm) on its own SQLite
// file, whose client talks to the server over HTTP like any client: it creates encrypted
// rooms, shares room keys with the bot's device, sends encrypted messages, claims the bot's
// keys, adds devices (the bot sees device_lists.changed) and decrypts the bot's replies.
//
// The server is safe for concurrent use. Room IDs, names and members follow Options.Seed;
// only the Olm key material is random. The observation methods ([Server.KeyCounts],
// [Server.Uploads], [Server.Queries], [Server.Decrypted], ...) and [Server.WaitFor] let a
// script or a test follow what the bot does.
package demohs
