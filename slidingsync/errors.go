package slidingsync

import (
	"errors"
	"net/http"

	"maunium.net/go/mautrix"
)

// MUnknownPos is the error a server returns when it no longer knows the connection's pos.
// Match it with errors.Is; it is matched by errcode, never by HTTP status alone.
var MUnknownPos = mautrix.RespError{ErrCode: "M_UNKNOWN_POS", StatusCode: http.StatusBadRequest}

// ErrAlreadyRunning is returned by Run when the Conn is already running.
var ErrAlreadyRunning = errors.New("slidingsync: Run already in progress")

// ErrInvalidResponse wraps every error about a response body the client cannot use (bad JSON,
// impossible list ops). Such responses are never applied; Run retries with backoff.
var ErrInvalidResponse = errors.New("slidingsync: invalid response")

// ErrInsecureHTTP is returned by Run when the homeserver or the discovered proxy is reached
// over plain http:// on a host that is not a loopback address (see Config.AllowInsecureHTTP).
var ErrInsecureHTTP = errors.New("slidingsync: refusing plain HTTP to a non-loopback host")
