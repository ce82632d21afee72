// Package bot gives a mautrix bot end-to-end encryption on sliding sync in one call:
//
//	h, err := bot.New(cli, bot.Config{DB: "bot.db", PickleKey: pickleKey, AutoJoin: true})
//	if err != nil {
//		return err
//	}
//	cli.Crypto = h // the client's sends encrypt in encrypted rooms
//	h.OnEventType(event.EventMessage, func(ctx context.Context, evt *event.Event) {
//		// evt is decrypted; this send happens exactly once, even across crashes
//		cli.SendText(ctx, evt.RoomID, "echo: "+evt.Content.AsMessage().Body)
//	})
//	return h.Run(ctx)
//
// [Helper.Run] does what a bot on sliding sync needs and returns one error: it opens and
// upgrades every store in one database (the session, the sliding sync store, mautrix's state
// and crypto stores, the crypto Machine's tables and this package's inbox and outbox), logs in
// once with Config.LoginAs when the database holds no session and keeps the session, takes
// the device's lease (a second process waits in standby), and runs the sliding sync
// connection (every room, scanned then windowed, with the e2ee and to_device extensions), the
// crypto Machine's key work and the dispatcher of events. Handlers are mautrix's: register
// them with [Helper.OnEventType], or on the client's *mautrix.DefaultSyncer, which the Helper
// dispatches to (Config.Syncer), so handlers written for mautrix's cryptohelper on /sync work
// unchanged.
//
// # Delivery
//
// Every timeline event of a joined room (except the bot's own, and events older than the
// bot's first start) and every invite is written to the inbox in the transaction that
// commits the response it came in, together with pos and the room state (mautrix's state
// store sees a room's state exactly when pos passes it). A limited timeline is first filled
// from /messages back to the events already queued. The dispatcher, one goroutine, hands the
// committed events to the handlers in commit order once the device keys are on the server,
// and marks each one handled after its handlers returned. So an event is dispatched at least
// once: a crash before the mark dispatches it again after the restart. An event that cannot
// be decrypted yet (its room key has not arrived) waits without holding back the others; it
// is tried again each time a room key is committed (crypto.Machine.RoomKeyCommitted: never
// before the key can be read, so no retry timer is involved) and given up after
// Config.KeyWait, counted from its commit or from the start of the Run, whichever is later
// (the to-device backlog of a bot that was stopped may still hold the key). When the key has not come after Config.KeyRequestDelay, the bot asks the
// device that sent the event for it (m.room_key_request, once per key and Run), so a key
// whose to-device message was lost is forwarded by a sender that shared it with the bot.
//
// # Exactly-once sends
//
// A handler's room sends through the client (SendMessageEvent, SendText, SendReaction,
// RedactEvent, ...) are exactly once, on every server. Each one gets a transaction ID derived
// from the event being handled ([IdempotencyKey]) and the send's position in the handler, and
// the outbox records it before the first attempt. When the handler runs again after a crash,
// a send the outbox knows happened is answered with its event ID without a request; a send
// that was attempted but whose answer never came is looked for among the room's events (the
// bot's own events carry their transaction ID in unsigned.transaction_id, in timelines and
// in /messages) and sent only when it is not there. The server's deduplication of
// transaction IDs is not relied on: Dendrite, for one, accepts a transaction ID again after
// a lost answer. A send whose outcome is unknown (a network error, a 5xx) is looked for and
// retried with backoff inside the handler's call, up to 8 attempts; a refusal (4xx) is
// returned at once. For this to hold, a handler must make the same sends in the same order
// when it runs again, from its own goroutine. [WithIdempotencyKey] gives code outside
// handlers the same guarantee, and [IdempotencyKey] gives handlers a key for side effects of
// their own.
//
// # Encryption
//
// The Helper implements mautrix.CryptoHelper: with cli.Crypto set to it, the client encrypts
// sends to encrypted rooms with crypto.Machine.EncryptRoomEvent, which fetches the room's
// members and queries outdated device lists before sharing the room key. Decryption, key
// uploads, fallback keys and device lists are package crypto's, with its guarantees.
//
// # Concurrency and shutdown
//
// Run owns three goroutines (the connection, the crypto Machine, the dispatcher) and returns
// only after all have stopped; the first to fail stops the others. The Machine of a new
// device starts when the first sync response arrives, so a bot that cannot sync uploads
// nothing. A Helper runs
// once at a time ([slidingsync.ErrAlreadyRunning]). Handlers run one at a time on the dispatcher; a
// handler that panics is logged and its event counts as handled. When ctx ends during a
// handler, the event is dispatched again by the next Run.
//
// # Security
//
// Unless Config.AllowInsecureHTTP, a homeserver on plain http:// that is not a loopback
// address is refused before the first request (the login included), and the client's
// transport refuses every such request. mautrix logs request bodies (req_body: the plain
// text of sends to unencrypted rooms): give the client a logger that drops them, such as
// zerolog.New(slidingsync.RedactRequestBodies(os.Stderr)). The database holds the access
// token and, without Config.PickleKey, the key of the Olm account: dbopen creates SQLite
// files readable by their owner only.
//
// # What is persisted
//
// In the database of Config.DB: the session (ssbot_session), the inbox of events to
// dispatch and the outbox of sends (ssbot_inbox, ssbot_outbox), the sliding sync connection
// (package sqlstore), mautrix's state and crypto stores and package crypto's tables. The
// database driver packages are registered by importing this package (it opens paths with
// dbopen).
//
// The inbox and outbox stay bounded. A handled event keeps only its key, and the dispatcher
// (when Run starts, then at most hourly) deletes each room's handled events beyond its newest
// 50: a server sends a room's newest events again only up to the bot's timeline limit of 5
// (a connection that starts afresh, a room back in the window), and a limited timeline is
// filled back to the newest event the inbox knows, so a deleted event is never dispatched
// again. Outbox rows are deleted 7 days after their first attempt unless their event is
// still pending; so WithIdempotencyKey's guarantee lasts 7 days.
package bot
