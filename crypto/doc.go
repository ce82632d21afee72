// Package crypto connects the sliding sync extensions of package e2ee to mautrix's
// OlmMachine (maunium.net/go/mautrix/crypto), so that a bot on a [slidingsync.Conn] can
// decrypt and encrypt.
//
// A [Machine] is built from the mautrix client, an OlmMachine on a SQLCryptoStore and a
// [Config]. It is the [e2ee.Consumer] of the e2ee extension, and [Machine.HandleToDevice] is
// the [e2ee.Config.ToDevice] handler of the to_device extension. [Machine.Run] owns the
// network work.
//
// A bot on package bot (crypto/bot) needs neither this package nor mautrix's crypto: its
// Config names this package's Config as bot.CryptoConfig. Code that uses both packages here
// imports mautrix's as mcrypto, as below, since both are called crypto.
//
// Keep the crypto store, this package's tables and the sliding sync store (sqlstore) in one
// database, so that what the Step of HandleE2EE records commits or rolls back with pos:
//
//	db, _ := dbopen.Open(path, dbopen.Config{})
//	cs := mcrypto.NewSQLCryptoStore(db, nil, "", cli.DeviceID, pickleKey)
//	_ = cs.DB.Upgrade(ctx)
//	olm := mcrypto.NewOlmMachine(cli, &log, cs, stateStore)
//	_ = olm.Load(ctx)
//	mach, _ := crypto.New(cli, olm, crypto.Config{})
//	_ = mach.Upgrade(ctx)
//	exts, release, _ := e2ee.New(cli.UserID, cli.DeviceID, e2ee.Config{Consumer: mach, ToDevice: mach.HandleToDevice})
//	defer release()
//	conn, _ := slidingsync.New(cli, slidingsync.Config{Store: store, Extensions: exts})
//	go mach.Run(ctx)
//
// # Guarantees
//
//   - Device lists: the Step.Commit that HandleE2EE returns runs inside the commit transaction
//     and makes no network call.
//     Changed users that mautrix tracks are marked outdated, on a gap every tracked user is,
//     and Left users are untracked (their row in crypto_tracked_user is deleted; their devices
//     stay stored, and the next ShareGroupSession that needs them queries them again, as
//     mautrix does for any untracked user). So a device-list change is recorded if and only if
//     pos advances past it. The transaction gets two statements per 500 changed users and one
//     per tracked one, and no query: those run later, in Run.
//
//   - Run queries outdated users with OlmMachine.FetchKeys, retrying failures with
//     exponential backoff. A change that arrives while a user's query is in flight is not lost
//     although FetchKeys clears the outdated flag when it stores the answer: every mark bumps a
//     durable generation, and a user whose generation moved during the query is marked again
//     and queried again. Before a change is settled, the outbound megolm sessions of the
//     rooms shared with the user are discarded (mautrix does it only when the query finds
//     new devices, which a query repeated after a crash does not), so a new device always
//     receives the next room key.
//
//   - One-time keys: counts are acted on only once a response carried them; unknown counts
//     are never taken for 0. Run uploads keys when the committed count of signed_curve25519
//     keys is below half of what the account keeps (50 with goolm), up to that half, through
//     OlmMachine.ShareKeys (the threshold of OlmMachine.HandleOTKCounts, which is not used
//     because it logs failures instead of returning them, so they could not be retried); the
//     server thus never holds more one-time keys than the account
//     keeps private keys for. A count is acted on once: a stale repetition of the same counts
//     after an upload does not upload again, and a count that a negative report would push
//     below 0 is taken as 0. When the last upload came less than a minute before a low count,
//     ShareKeys first asks the server for its real count with an empty /keys/upload. Servers
//     that send counts only when they change cannot report a count the homeserver left out
//     (the MSC3575 proxy over Dendrite never reports 0): once responses come without counts
//     and the last count is Config.KeyCountCheck old (1 min), Run asks the server the same
//     way and tops up from its answer, at most once per period and only while responses
//     arrive. A server that sends counts in every response (Synapse) is never asked. A new
//     device uploads its device keys (and one-time keys) on the first Run, whatever the server
//     reported. An upload that failed (a timeout after which the server may have stored it) is
//     retried with exactly the same keys before any new key is generated, so the server never
//     receives a key ID twice with different keys.
//
//   - To-device: HandleToDevice decrypts each Olm message and stores what it carries in one
//     transaction, which commits only if the room key it carried is in the crypto store. If
//     not (a failing database), the hash that marks the message as seen and the Olm session
//     state roll back and HandleToDevice returns an error, so the batch is not acknowledged
//     and the re-delivered message decrypts again; mautrix alone would only log the failure
//     and lose the key. A message from an acknowledged batch is recognised by mautrix's
//     message hashes and skipped. A message that does not decrypt (bad ciphertext, unknown
//     session) or carries an unusable key is logged and skipped, so one peer cannot block the
//     queue; when mautrix finds the Olm session with its sender wedged, Run opens a new one
//     (an m.dummy on it) under the lock every other use of the Olm account holds (New sets
//     the OlmMachine's NeedsUnwedgeCallback unless the caller set one). Each message is decrypted twice, once to learn which key it carries (mautrix
//     does not return it), then for real. Once the transaction that stored a room key has
//     committed, [Machine.RoomKeyCommitted] is closed ([Machine.WaitForRoomKey] waits on it):
//     mautrix's own session-received signal fires inside that transaction, and for the
//     rolled-back first decryption, so a reader it wakes may not find the key yet.
//
//   - Fallback keys (mautrix has no support; this package drives goolm's account, so New
//     fails with ErrFallbackNeedsGoolm on another backend unless Config.DisableFallbackKeys):
//     whether the server lacks an unused signed_curve25519 fallback key is recorded durably
//     in the commit transaction of a response whose fallback key types change it (Synapse
//     repeats them in every response: a repeated report writes nothing), and on the first
//     setup of a device; Run then generates a key, saves the account, uploads it
//     signed like a one-time key ({"key", "fallback": true, "signatures"}) and clears the
//     record. A failed upload is retried with the same key. Rotations are at least
//     Config.FallbackKeyRotation apart, so stale reports after an upload churn nothing; the
//     previous private key is kept for Config.FallbackKeyGrace after a rotation, then
//     forgotten. A server that never sends the field gets the first key and no other.
//
//   - The Olm account and sessions are used under one lock by HandleToDevice, Run's uploads
//     and EncryptRoomEvent, which mautrix would otherwise run on several goroutines without a
//     common lock. An upload or a key share thus delays the handling of to-device events
//     until it returns. Share room keys through EncryptRoomEvent, not the OlmMachine's
//     ShareGroupSession, which would bypass the lock.
//
// # Room state
//
// mautrix's OlmMachine learns which rooms are encrypted and whom to share room keys with from
// its state store. [Machine.HandleRooms] feeds the state events of a response into it and lets
// the OlmMachine discard a room's outbound session when the timeline shows a membership or
// history visibility change. Call it from the Step.Commit that slidingsync.Config.OnResponse
// returns, so that the state commits or rolls back with pos in one transaction (as package
// bot does), or from OnResponse itself. [RequiredState] is the required state a bot should
// ask for.
//
// To send, [Machine.EncryptRoomEvent] makes sure of the recipients before sharing the room key:
// it fetches the room's member list once per Machine and again after a limited timeline (which
// may hide membership changes), and queries the members whose device lists are outdated, so a
// device added since the last message receives the key.
package crypto
