// Package minihs is the fake homeserver of this module's demo, of the tests that run a bot
// against a server (as a separate process or in-process), of crypto's tests and of the
// side-by-side benchmark of a sliding sync bot and a classic /sync bot. It serves one bot
// device on 127.0.0.1 (or, with Options.NoListener, only in-process through
// [Server.Handler], inside a testing/synctest bubble if need be), a generated account,
// scripted peers, devices registered with [Server.SetToken], rooms added with
// [Server.AddRoom], and the endpoints the SDK's crypto flow needs.
//
// [Generate] builds an [Account] from a seed: rooms (every other one encrypted, unless
// GenConfig.Plain) with their state and a recent event, a pool of users, peers with real
// signed Olm device keys and one-time keys, and to-device messages queued for the bot. Only
// the Olm key material is random. [NewServer] loads an account (or generates a plain one)
// and serves, per Options.API, either of:
//
//   - Sliding sync, through a slidingsynctest.Server with its Synapse personality and a
//     Responder, behind a long-poll that waits until the bot has something new or its
//     timeout (at most Options.IdleHold) ends. An answer without news keeps the request's
//     pos and carries the e2ee counts and fallback key types, as Synapse does; requests are
//     checked against Synapse's request model. The list is in order of recent activity; its
//     ranges are echoed in the SYNC ops, a list without ranges is only counted;
//     required_state and timeline_limit are honoured, invites carry invite_state, a room the
//     bot joined is sent again as initial. The server remembers, per conn_id, in which answer
//     each room was sent in full, so a bot that resumes from an older committed pos gets the
//     rooms sent after it again, which makes it usable by a harness that kills the bot at any
//     moment. A pos from the future (another server run) gets M_UNKNOWN_POS, one it cannot
//     parse 400 M_UNKNOWN "Invalid stream token". The e2ee extension carries
//     device_lists.changed when the request has a pos; the to_device extension deletes a
//     message only once a later request's since acknowledges it.
//   - The classic /sync (initial and incremental) with the e2ee fields Synapse always sends,
//     and a filter endpoint.
//
// Both serve /keys/upload, /keys/query, /keys/claim (a one-time key first, in upload order,
// then the fallback key, which is then reported used), /sendToDevice (queued per device,
// deduplicated by transaction ID), PUT /rooms/{id}/send (the same transaction ID from the same
// device gives the same event ID, unless Options.NoTxnDedup makes it store a second event as
// Dendrite does after a lost answer; Options.SendFault can store a send and then lose its
// answer), joins, members, joined members, /messages (backwards), state, /login (the bot's
// password), /logout, /account/whoami and /versions. The sender of an event sees its
// transaction ID in unsigned.transaction_id, as the client-server API specifies.
//
// A [Peer] is another user's device with a real mautrix OlmMachine (goolm) on its own SQLite
// file, whose client talks to the server over HTTP: it creates rooms, shares room keys with
// the bot's device, sends encrypted messages, claims the bot's keys, adds devices (the bot
// sees device_lists.changed) and decrypts the bot's replies.
//
// Bytes are counted on the connections in both directions, and every request of interest is
// reported to Options.Observer with the counters at that moment, so a harness can measure a
// bot as a black box. The observation methods ([Server.KeyCounts], [Server.Uploads],
// [Server.Queries], [Server.SyncRequests], ...) and [Server.WaitFor] let a script or a test
// follow what the bot does. The server is safe for concurrent use.
package minihs
