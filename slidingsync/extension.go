package slidingsync

import (
	"context"
	"encoding/json"
)

// RequestInfo tells an extension about the request being built, or the one a response
// answers.
type RequestInfo struct {
	// Key identifies the connection: the account it syncs and its conn_id.
	Key ConnKey
	// Protocol is the dialect the request is sent in.
	Protocol Protocol
	// Pos is the position the request carries; empty means the connection starts afresh, so the
	// server knows nothing of what was sent before (for e2ee: device-list changes may be lost).
	Pos string
	// Checkpoint is the extension's checkpoint as last committed (the Step.Checkpoint of the
	// last committed response that set one), nil when none is stored: a new connection, or
	// one that moved to another server, where cursors mean nothing.
	Checkpoint json.RawMessage
}

// Extension contributes one entry to the request's "extensions" object and consumes the
// matching entry of the response. The core knows no extension by name.
//
// The Conn keeps an extension's durable state for it: the checkpoint each Step returns is
// committed with pos and handed back in RequestInfo.Checkpoint, so an extension needs no
// bookkeeping of its own for what is staged and what is committed, and a failed cycle leaves
// nothing to undo.
type Extension interface {
	// Name identifies the extension; its checkpoint is stored under it on every dialect.
	Name() string
	// WireKey is the extension's key under "extensions" in dialect p (the v4 dialect
	// prefixes some keys); most extensions return Name().
	WireKey(p Protocol) string
	// Request returns the extension's body for every request, as the client keeps
	// stickiness: the body must be the complete configuration. A nil body leaves the
	// extension out of that request.
	Request(ctx context.Context, info RequestInfo) (any, error)
	// Process is called once per processed response, before rooms are merged and before
	// the response handler, with the extension's part of the response (nil when the server
	// left it out), and says in its Step what the response produced. An error aborts the
	// cycle: nothing is committed and the same pos is requested again after a backoff.
	Process(ctx context.Context, info RequestInfo, raw json.RawMessage) (Step, error)
}

// Step is what processing one response produced, for an extension (Extension.Process) or
// the response handler (Config.OnResponse). The Conn commits the Steps of one response
// together with its pos, in one transaction, or none of them; the zero Step asks for
// nothing.
type Step struct {
	// Checkpoint, when not nil, is the extension's new checkpoint (a cursor, say), committed
	// with pos and passed back in RequestInfo.Checkpoint from then on; nil keeps the last
	// one. The response handler's is ignored.
	Checkpoint json.RawMessage
	// Commit, when not nil, runs inside the transaction that commits pos, with its context,
	// so that writes to other tables of the store's database (mautrix's crypto store, say)
	// commit or roll back with pos. An error aborts the commit. A response whose Steps have
	// no Commit and that changes nothing but pos is committed without a transaction where the
	// store allows it (an idle long-poll: one statement with sqlstore).
	Commit func(ctx context.Context) error
	// After, when not nil, runs on Run's goroutine once the commit is durable (and only
	// then), for work that must wait for it, such as network calls whose intent the commit
	// recorded. It should hand long work to a goroutine it owns and return.
	After func(ctx context.Context)
	// More says the server holds more data (a full to-device batch): the next request does
	// not long-poll.
	More bool
	// Stalled says the server is not making progress (a cursor that does not advance while
	// data keeps coming): the loop backs off before the next request instead of polling at
	// once.
	Stalled bool
}
