package slidingsync

import (
	"context"
	"encoding/json"
)

// RequestInfo tells an extension about the request being built.
type RequestInfo struct {
	// Key identifies the connection: the account it syncs and its conn_id.
	Key ConnKey
	// Protocol is the dialect the request is sent in.
	Protocol Protocol
	// Pos is the position the request carries; empty means the connection starts afresh, so the
	// server knows nothing of what was sent before (for e2ee: device-list changes may be lost).
	Pos string
}

// Extension contributes one entry to the request's "extensions" object and consumes the
// matching entry of the response. The core knows no extension by name.
//
// Request is called for every request, as the client keeps stickiness: the body must be the
// complete configuration. A nil body leaves the extension out of that request.
//
// Process is called once per processed response, before rooms are merged and before the
// response handler, with the extension's part of the response; raw is nil when the server left
// it out. An error aborts the cycle: nothing is committed, checkpointing extensions are restored
// to the last commit, and the same pos is requested again after a backoff.
type Extension interface {
	Name() string
	Request(ctx context.Context, info RequestInfo) (any, error)
	Process(ctx context.Context, info RequestInfo, raw json.RawMessage) error
}

// WireKeyer is implemented by extensions whose key under "extensions" depends on the dialect
// (the v4 dialect prefixes some keys). Without it the key is Name().
type WireKeyer interface {
	WireKey(p Protocol) string
}

// Checkpointer is implemented by extensions with state that must be committed in the same
// transaction as pos, such as a to-device cursor. Checkpoint is called after a successful
// Process; Restore is called when a connection starts (with nil if nothing was stored) and
// after a failed cycle, with the last committed checkpoint.
type Checkpointer interface {
	Checkpoint(ctx context.Context) (json.RawMessage, error)
	Restore(ctx context.Context, checkpoint json.RawMessage) error
}

// Resetter is implemented by extensions that must react when the server forgets the
// connection (M_UNKNOWN_POS) and the next request goes out without pos.
type Resetter interface {
	Reset(ctx context.Context) error
}

// MorePender is implemented by extensions that know the server holds more data for them (a
// full to-device batch). When any reports true after a processed response, the next request
// does not long-poll.
type MorePender interface {
	MorePending() bool
}

func wireKey(ext Extension, p Protocol) string {
	if wk, ok := ext.(WireKeyer); ok {
		return wk.WireKey(p)
	}
	return ext.Name()
}

// TxnCommitter is implemented by extensions that write to other tables of the store's
// database: CommitTxn runs inside the transaction that commits the response, so those writes
// land together with pos or not at all.
type TxnCommitter interface {
	CommitTxn(ctx context.Context) error
}

// TxnSkipper is implemented by TxnCommitters that can tell, after Process and before the
// commit, that CommitTxn would write nothing for the response being processed. The Conn then
// leaves CommitTxn out, so that a response changing nothing but pos (an idle long-poll) can be
// committed without a transaction where the store allows it.
type TxnSkipper interface {
	SkipTxn() bool
}

// AfterCommitter is implemented by extensions with work that must wait until the response is
// durably committed, such as network calls whose intent was recorded in the commit (a key
// query for users marked outdated). AfterCommit runs on Run's goroutine right after the
// commit; it should hand long work to a goroutine the extension owns and return.
type AfterCommitter interface {
	AfterCommit(ctx context.Context)
}

// Staller is implemented by extensions that can tell the server is not making progress for
// them (a cursor that does not advance while data keeps coming). When any reports true after
// a processed response, the loop backs off before the next request, as it does for a pos that
// does not advance, instead of polling again at once.
type Staller interface {
	Stalled() bool
}
