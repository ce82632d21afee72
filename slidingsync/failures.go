package slidingsync

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"

	"maunium.net/go/mautrix"
)

// SyncError describes a failed sync cycle that Run retries: a request that failed (network,
// 5xx, 429, an undecodable body) or a response whose processing failed.
type SyncError struct {
	// Err is the failure.
	Err error
	// Repeats counts the consecutive failures identical to this one, this one included: 1 for
	// the first of a streak. A failure that differs starts a new streak.
	Repeats int
	// Since is when the streak began.
	Since time.Time
	// RetryIn is the wait before the next attempt.
	RetryIn time.Duration
}

// failures tracks consecutive failed cycles, for the backoff and for reporting. Owned by Run.
type failures struct {
	n       int    // consecutive failed cycles, of any kind
	key     string // what the current streak of identical failures fails with
	repeats int    // length of that streak
	since   time.Time
}

// retryLater records a failure, logs it (at error level once per streak of identical
// failures, at debug level for the repeats), reports it to Config.OnSyncError and waits.
func (c *Conn) retryLater(ctx context.Context, f *failures, err error, wait time.Duration) error {
	f.n++
	if key := failureKey(err); key != f.key || f.repeats == 0 {
		f.key, f.repeats, f.since = key, 0, time.Now()
	}
	f.repeats++
	log := c.log(ctx)
	evt := log.Debug()
	if f.repeats == 1 {
		evt = log.Error()
	}
	evt.Err(err).Dur("retry_in", wait).Int("repeats", f.repeats).Msg("Sync failed, retrying")
	if c.cfg.OnSyncError != nil {
		c.cfg.OnSyncError(ctx, SyncError{Err: err, Repeats: f.repeats, Since: f.since, RetryIn: wait})
	}
	return sleep(ctx, wait)
}

// recovered ends a streak of failures after a processed response.
func (c *Conn) recovered(ctx context.Context, f *failures) {
	if f.n == 0 {
		return
	}
	c.log(ctx).Info().Int("failures", f.n).Dur("down_for", time.Since(f.since)).Msg("Sync recovered")
	*f = failures{}
}

// failureKey says which failures are the same: the same HTTP status and Matrix error, or the
// same message for other errors.
func failureKey(err error) string {
	var httpErr mautrix.HTTPError
	if errors.As(err, &httpErr) && httpErr.Response != nil {
		key := fmt.Sprintf("HTTP %d", httpErr.Response.StatusCode)
		if httpErr.RespError != nil {
			key += " " + httpErr.RespError.ErrCode + " " + httpErr.RespError.Err
		}
		return key
	}
	return err.Error()
}

// isUnknownPos reports whether the server rejected the request's pos: M_UNKNOWN_POS, or the
// 400 M_UNKNOWN "Invalid stream token" Synapse answers a pos it cannot parse (one another
// server issued).
func isUnknownPos(err error) bool {
	if errors.Is(err, MUnknownPos) {
		return true
	}
	var httpErr mautrix.HTTPError
	if !errors.As(err, &httpErr) || httpErr.Response == nil || httpErr.RespError == nil {
		return false
	}
	return httpErr.Response.StatusCode == http.StatusBadRequest &&
		httpErr.RespError.ErrCode == mautrix.MUnknown.ErrCode &&
		strings.Contains(strings.ToLower(httpErr.RespError.Err), "invalid stream token")
}
