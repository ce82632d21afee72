// Package slidingsynctest provides a fake sliding sync server for tests, in the spirit of
// net/http/httptest: tests of this SDK, and tests of bots built on it, script what the server
// answers and then check what the client asked.
//
// A [Server] speaks one dialect (Options.Protocol, MSC4186 by default). It serves that
// dialect's sync path, /_matrix/client/versions (advertising org.matrix.simplified_msc3575 for
// MSC4186) and /.well-known/matrix/client (naming Options.ProxyURL as an MSC3575 proxy), so
// [slidingsync.Discover] works against it. Everything else is 404 M_UNRECOGNIZED. It is an
// http.Handler, so it can also sit behind httptest.NewServer, but [Server.Transport] and
// [Server.NewClient] call it in-process, without sockets, which makes it usable inside
// testing/synctest bubbles: a long-poll of 30 s then takes no real time.
//
// # Scripting
//
// A test queues answers with [Server.Push] (a 200 response, given a pos if it has none),
// [Server.PushError] and [Server.PushUnknownPos] (Matrix errors) and [Server.PushJSON] (any
// status and any bytes, served verbatim). Each sync request is answered with the next one.
// The server keeps no connection state of its own and does not look at pos: what a request
// gets is what was queued, which lets a test serve expired positions, replays or malformed
// bodies at will.
//
// Before the script is consulted a request is checked like a real server would: a wrong HTTP
// method gets 405 M_UNRECOGNIZED, a missing or wrong access token 401 M_UNKNOWN_TOKEN, a body
// that is not a sliding sync request 400 M_BAD_JSON, a bad timeout 400 M_INVALID_PARAM, and
// after [Server.Close] everything gets 503. None of these consumes a queued answer.
//
// # Guarantees
//
//   - FIFO: answers go out in the order they were queued, one per request. When several
//     requests wait, the one that arrived first gets the next answer.
//   - Positions: a pushed response without pos gets the next of "1", "2", ... when it is
//     served; an answer to a long-poll that ran out takes a pos from the same counter.
//   - Long-poll: with an empty queue a request waits until something is queued or until its
//     timeout runs out, then answers {"pos": "N"} and nothing else. The timeout comes from the
//     query on MSC4186 and MSC3575, from the body on v4; absent means 0, except on MSC3575
//     where it means 10 s, as on the proxy.
//   - Cancellation: a request whose context ends before it is answered returns at once and
//     consumes nothing; an answer handed to it at that same moment goes back to the head of
//     the queue. Only a request that is answered consumes an answer.
//   - Recording: every sync request is recorded on arrival ([Server.Requests],
//     [Server.WaitRequests]) with its decoded form, and marked answered before the answer is
//     written, so [Server.InFlight] and [Server.MaxInFlight] can prove that a client never
//     has two requests in flight.
//   - Time: the server uses the real clock (time.NewTimer), which testing/synctest fakes, and
//     creates its channels in the goroutines that wait on them, so a bubble sees it durably
//     blocked while a request long-polls. Use a server either inside one bubble or outside
//     any: a bubble's channels may not be touched from outside it.
package slidingsynctest
