package slidingsync

import (
	"context"
	"errors"
	"fmt"
	"time"

	"maunium.net/go/mautrix"
)

// Run syncs until ctx ends or a fatal error occurs, and returns only after everything it
// started has stopped. It returns ctx.Err() on cancellation, an error wrapping
// mautrix.MUnknownToken when the access token is rejected, and a wrapped error for other
// non-retryable failures (4xx responses, a store that cannot load, a configuration the
// dialect cannot express). Retryable failures are retried with backoff forever.
func (c *Conn) Run(ctx context.Context) error {
	if !c.running.CompareAndSwap(false, true) {
		return ErrAlreadyRunning
	}
	defer c.running.Store(false)
	log := c.log(ctx).With().Str("component", "slidingsync").Str("conn_id", c.cfg.ConnID).Logger()
	ctx = log.WithContext(ctx)

	endpoint, err := c.start(ctx)
	if err != nil {
		return err
	}
	l := &loop{c: c, ep: endpoint, noPoll: true}
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := l.cycle(ctx); err != nil {
			return err
		}
	}
}

// start loads the stored state and finds the endpoint, refusing plain HTTP to a remote host
// before any request carries the token.
func (c *Conn) start(ctx context.Context) (Endpoint, error) {
	if err := c.load(ctx); err != nil {
		return Endpoint{}, err
	}
	if err := c.checkTransport(c.cli.HomeserverURL); err != nil {
		return Endpoint{}, err
	}
	endpoint, err := c.discover(ctx)
	if err != nil {
		return Endpoint{}, err
	}
	if err := c.checkTransport(endpoint.BaseURL); err != nil {
		return Endpoint{}, err
	}
	c.mu.Lock()
	c.endpoint = endpoint
	c.mu.Unlock()
	c.adoptEndpoint(ctx, endpoint)
	return endpoint, nil
}

// loop is the state of one Run between cycles. Owned by Run's goroutine.
type loop struct {
	c         *Conn
	ep        Endpoint
	fails     failures
	noPoll    bool // the next request does not wait (the first of a Run, more pending, a reset)
	extStalls int  // consecutive responses after which an extension reported a stall
	resets    int  // M_UNKNOWN_POS resets since a request with pos last succeeded
	early     int  // consecutive long-polls answered at once with the pos they sent
}

// cycle sends one request and processes its response. It returns an error only when Run must
// end; retryable failures are waited out inside.
func (l *loop) cycle(ctx context.Context) error {
	c := l.c
	pos := c.Pos()
	info := RequestInfo{Key: c.key, Protocol: l.ep.Protocol, Pos: pos}
	timeout := c.cfg.PollTimeout
	if l.noPoll || pos == "" {
		timeout = 0
	}
	sent := time.Now()
	resp, gen, err := c.roundTrip(ctx, l.ep, info, timeout)
	if err != nil {
		return l.requestFailed(ctx, pos, err)
	}
	// A response may carry the very pos its request sent: Synapse answers every idle
	// long-poll so, once the poll has run out. It is processed like any other (its
	// extension data is current), and the next request long-polls at once.
	out, err := c.process(ctx, info, resp, gen)
	switch {
	case err == nil:
	case ctx.Err() != nil:
		return ctx.Err()
	case errors.Is(err, errConfigChanged):
		l.noPoll = true
		return nil
	default:
		err = fmt.Errorf("processing a response (nothing was committed): %w", err)
		return c.retryLater(ctx, &l.fails, err, c.backoff(l.fails.n))
	}
	c.recovered(ctx, &l.fails)
	if pos != "" {
		l.resets = 0
	}
	l.noPoll = out.more
	quick := resp.Pos == pos && timeout > 0 && time.Since(sent) < min(timeout/2, time.Second)
	return l.pace(ctx, pos, quick, out.stalled)
}

// pace waits after a processed response when the server must not make the loop spin: an
// answer that repeats pos at once (not an idle server, which waits out the poll, but one that
// answers without moving; a server cutting long-polls to a second or more is not slowed), or
// an extension whose cursor stalls.
func (l *loop) pace(ctx context.Context, pos string, quick, stalled bool) error {
	c := l.c
	if quick {
		l.early++
		wait := c.backoff(l.early - 1)
		if l.early == 1 {
			c.log(ctx).Warn().Str("pos", pos).Dur("retry_in", wait).Msg("Server answers long-polls at once without a new pos")
		}
		if err := sleep(ctx, wait); err != nil {
			return err
		}
	} else {
		l.early = 0
	}
	if !stalled {
		l.extStalls = 0
		return nil
	}
	l.extStalls++
	return sleep(ctx, c.backoff(l.extStalls-1))
}

// requestFailed handles a request that got no usable response: it waits or resets as the
// error asks, and returns an error only when Run must end.
func (l *loop) requestFailed(ctx context.Context, pos string, err error) error {
	c := l.c
	switch {
	case ctx.Err() != nil:
		return ctx.Err()
	case errors.Is(err, errConfigChanged):
		l.noPoll = true
		return nil
	case isUnknownPos(err) && pos == "":
		// There was no pos to forget: a broken server. Back off rather than spin.
		return c.retryLater(ctx, &l.fails, err, c.backoff(l.fails.n))
	case isUnknownPos(err):
		return l.startAfresh(ctx, err)
	case errors.Is(err, mautrix.MUnknownToken):
		return fmt.Errorf("slidingsync: access token rejected: %w", err)
	}
	wait, retry := c.classify(err, l.fails.n)
	if !retry {
		return fmt.Errorf("slidingsync: %s request to %s failed: %w", l.ep.Protocol, c.endpointURL(l.ep), err)
	}
	return c.retryLater(ctx, &l.fails, err, wait)
}

// startAfresh drops pos after the server forgot it, backing off when the pos of the last
// reset was forgotten too: a server that forgets every connection must not make us reset in
// a tight loop.
func (l *loop) startAfresh(ctx context.Context, err error) error {
	c := l.c
	log := c.log(ctx)
	l.resets++
	if l.resets > 1 {
		wait := c.backoff(l.resets - 2)
		log.Warn().Err(err).Dur("retry_in", wait).Int("resets", l.resets).Msg("Server keeps forgetting the connection")
		if err := sleep(ctx, wait); err != nil {
			return err
		}
	} else {
		log.Warn().Err(err).Msg("Server forgot the connection, starting afresh")
	}
	c.reset()
	l.noPoll = true
	return nil
}
