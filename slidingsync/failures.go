package slidingsync

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"strconv"
	"strings"
	"time"

	"maunium.net/go/mautrix"
)

// Failure describes a failed sync cycle that Run retries: a request that failed (network,
// 5xx, 429, an undecodable body) or a response whose processing failed. It is a report for
// Config.OnFailure, not an error: Err is the error.
type Failure struct {
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
// failures, at debug level for the repeats), reports it to Config.OnFailure and waits.
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
	if c.cfg.OnFailure != nil {
		c.cfg.OnFailure(ctx, Failure{Err: err, Repeats: f.repeats, Since: f.since, RetryIn: wait})
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

var errFatal = errors.New("slidingsync: fatal")

// classify decides whether an error is retried and after how long.
func (c *Conn) classify(err error, failures int) (time.Duration, bool) {
	if errors.Is(err, errFatal) {
		return 0, false
	}
	if errors.Is(err, ErrInvalidResponse) {
		return c.backoff(failures), true
	}
	var httpErr mautrix.HTTPError
	if errors.As(err, &httpErr) && httpErr.Response != nil {
		status := httpErr.Response.StatusCode
		switch {
		case status == http.StatusTooManyRequests:
			if wait, ok := retryAfter(httpErr); ok {
				return min(wait, 10*time.Minute), true
			}
			return c.backoff(failures), true
		case status >= 500:
			return c.backoff(failures), true
		case status >= 400:
			return 0, false
		}
		// A 2xx whose body could not be read, or an odd status: treat as transient.
		return c.backoff(failures), true
	}
	// Network errors, timeouts and body read errors.
	return c.backoff(failures), true
}

func retryAfter(httpErr mautrix.HTTPError) (time.Duration, bool) {
	if httpErr.RespError != nil {
		if ms, ok := httpErr.RespError.ExtraData["retry_after_ms"].(float64); ok && ms >= 0 {
			return time.Duration(ms) * time.Millisecond, true
		}
	}
	if h := httpErr.Response.Header.Get("Retry-After"); h != "" {
		if secs, err := strconv.Atoi(h); err == nil && secs >= 0 {
			return time.Duration(secs) * time.Second, true
		}
	}
	return 0, false
}

// backoff returns the wait after the given number of consecutive failures: exponential from
// MinBackoff, capped at MaxBackoff, with jitter in [d/2, d].
func (c *Conn) backoff(failures int) time.Duration {
	lo, hi := c.cfg.MinBackoff, c.cfg.MaxBackoff
	d := lo
	for i := 0; i < failures && d < hi; i++ {
		d *= 2
	}
	d = min(d, hi)
	return d/2 + rand.N(d/2+1)
}

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
