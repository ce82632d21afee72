// Package slidingsynctest provides a fake sliding sync server for tests, in the spirit of
// net/http/httptest: tests of this SDK, and tests of bots built on it, script what the server
// answers and then check what the client asked.
//
// A [Server] speaks one dialect (Options.Protocol, MSC4186 by default). It serves that
// dialect's sync path, /_matrix/client/versions (advertising org.matrix.simplified_msc3575 for
// MSC4186) and /.well-known/matrix/client (naming Options.ProxyURL as an MSC3575 proxy), so
// [slidingsync.Discover] works against it. Everything else is 404 M_UNRECOGNIZED. It is an
// http.Handler, so it can also sit behind httptest.NewServer, but [Server.NewClient] and
// [HandlerTransport](srv) call it in-process, without sockets, which makes it usable inside
// testing/synctest bubbles: a long-poll of 30 s then takes no real time.
//
// # Scripting
//
// A test queues answers with [Server.Push] (a 200 response, given a pos if it has none),
// [Server.PushIdle] (the answer to a long-poll that ran out, or a 200 response with the pos
// of the request it answers), [Server.PushError] (a Matrix error, such as
// slidingsync.MUnknownPos) and [Server.PushJSON] (any status and any bytes, served
// verbatim). Each sync request is answered with the next one. What a request gets is what was
// queued, which lets a test serve expired positions, replays or malformed bodies at will.
// With nothing queued, a responder ([Server.SetResponder]) may compute the answer.
//
// Before the script is consulted a request is checked like a real server would: a wrong HTTP
// method gets 405 M_UNRECOGNIZED, a missing or wrong access token 401 M_UNKNOWN_TOKEN, a body
// that is not a sliding sync request 400 M_BAD_JSON, a bad timeout 400 M_INVALID_PARAM, and
// after [Server.Close] everything gets 503. The personality adds its own checks. None of
// these consumes a queued answer.
//
// # Personalities
//
// Beyond the dialect, Options.Personality decides how the server behaves. The default is
// [PersonalitySynapse] on MSC4186 and [PersonalityPolite] on MSC3575 and v4.
//
// [PersonalityPolite] keeps no connection state and does not look at pos: any pos is
// accepted, every answer carries a fresh pos, and an empty long-poll answer is {"pos": "N"}
// and nothing else.
//
// [PersonalitySynapse] behaves as Synapse serves MSC4186 (element-hq/synapse 1.157), so that
// a client's tests hold it to what most of its users' servers do:
//
//   - Positions. An answer the server computes because nothing happened (a long-poll that
//     ran out, a timeout=0 request with nothing queued and no responder answer, PushIdle(nil))
//     carries exactly the pos the request sent; only a request without pos gets a fresh one.
//     Such an answer is a normal response, with the e2ee section of the request.
//   - Pos checks. A pos the server never served (nor was given by [Server.IssuePos]) gets
//     400 M_UNKNOWN "Invalid stream token", as a pos of another server does; a pos forgotten
//     by [Server.ExpirePositions], or served on another conn_id, gets 400 M_UNKNOWN_POS,
//     every time.
//   - Request model. A body that is not JSON gets 400 M_NOT_JSON. More than 100 lists, a
//     list name over 64 characters or a timeline_limit over 1000 get 400 M_BAD_JSON. A list
//     or room subscription without required_state or timeline_limit gets 400: M_MISSING_PARAM
//     when that is the only problem, else M_BAD_JSON, as Synapse picks.
//   - Filters. A list with filters.spaces or filters.room_name_like (present, even empty) gets
//     500 M_UNKNOWN, every time: Synapse accepts them and then fails.
//   - Lists. Computed answers echo each requested range in its list's SYNC op (a range wider
//     than the list is fine) with the room IDs inside it. When the only range starts at 0
//     and covers the whole list, Synapse does not sort; the fake then lists the rooms in room
//     ID order, which is not activity order. A list without ranges gets its count only, no
//     ops. The server learns each list's count and rooms from the answers it serves (pushed
//     or computed by a responder) and repeats them; a list it never served has count 0.
//     [SynapseListResponse] builds lists the same way for a responder.
//   - Shape. A computed answer always has rooms and extensions, and lists only when the
//     request has lists. In a responder's rooms a null name or avatar is left out, and is_dm
//     is sent only when true, as Synapse never sends them otherwise.
//   - Extensions. An answer carries e2ee, to_device, account_data, receipts or typing only if
//     the request enabled it. The e2ee section always has device_one_time_keys_count (with
//     signed_curve25519, 0 when none) and device_unused_fallback_key_types, and has
//     device_lists (possibly empty) only when the request has a pos. The values are those of
//     [Server.SetE2EE], replaced by every count map or fallback list the server serves, so
//     computed answers repeat the last values a client was told; the zero [E2EEState] is a
//     device without keys. A computed answer's to_device section has no events and
//     next_batch the request's since (else the last one served, else "0").
//
// Which rules apply to what the server sends:
//
//   - Every request, whatever is queued: the pos checks, the request model and the filters.
//     A request they refuse consumes nothing.
//   - Answers the server computes (long-poll timeouts, timeout=0 with nothing to serve,
//     PushIdle(nil)): every rule.
//   - Responder answers: the shape and extension rules, and no ops on a list without ranges.
//     The pos is the one the responder set, else a fresh one: a responder with nothing new
//     sets resp.Pos to the request's pos, as Synapse would. Ranges are the responder's to
//     echo (SynapseListResponse does).
//   - Pushed answers (Push, PushIdle with a response, PushError, PushJSON) are served as
//     scripted, so a test can still serve any shape; a pushed response without pos gets a
//     fresh one (Push) or the request's (PushIdle). Their positions become valid and their lists and e2ee
//     values are learned.
//
// # Building a fuller fake
//
// A test that needs more endpoints than sync (keys, sends, joins) can route the sync path
// to a Server, or compute answers with a responder from its own room model, and serve the
// rest with its own handlers: [HandlerTransport] calls any http.Handler in-process, as
// [Server.NewClient]'s client does, [WantsState] selects required_state as Synapse does, and
// [SynapseListResponse] builds a list's ops.
//
// # Guarantees
//
//   - FIFO: answers go out in the order they were queued, one per request. When several
//     requests wait, the one that arrived first gets the next answer.
//   - Positions: a pushed response without pos gets the next of "1", "2", ... when it is
//     served; an answer to a long-poll that ran out takes a pos from the same counter when
//     it needs a fresh one.
//   - Long-poll: with an empty queue a request waits until something is queued or until its
//     timeout runs out, then gets the personality's empty answer. The timeout comes from the
//     query on MSC4186 and MSC3575, from the body on v4; absent means 0, except on MSC3575
//     where it means 10 s, as on the proxy.
//   - Cancellation: a request whose context ends before it is answered returns at once and
//     consumes nothing; an answer handed to it at that same moment goes back to the head of
//     the queue. Only a request that is answered consumes an answer.
//   - Recording: every sync request is recorded on arrival ([Server.Requests],
//     [Server.WaitRequests]) with its decoded form, and marked answered (with the time and
//     the answer's pos) before the answer is written, so [Server.InFlight] and
//     [Server.MaxInFlight] can prove that a client never has two requests in flight, and the
//     gap between an answer and the next request shows whether a client paused.
//   - Time: the server uses the real clock (time.NewTimer), which testing/synctest fakes, and
//     creates its channels in the goroutines that wait on them, so a bubble sees it durably
//     blocked while a request long-polls. Use a server either inside one bubble or outside
//     any: a bubble's channels may not be touched from outside it.
package slidingsynctest
