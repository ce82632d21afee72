package slidingsync

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strings"

	"maunium.net/go/mautrix"
)

// originOf names the dialect and server of an endpoint, as stored with a connection's pos:
// "msc4186 https://matrix.example.org".
func originOf(ep Endpoint, homeserver *url.URL) string {
	return ep.Protocol.String() + " " + serverOf(ep, homeserver)
}

// serverOf is the endpoint's base URL without a trailing slash.
func serverOf(ep Endpoint, homeserver *url.URL) string {
	base := ep.BaseURL
	if base == nil {
		base = homeserver
	}
	if base == nil {
		return ""
	}
	u := *base
	u.RawQuery, u.Fragment, u.User = "", "", nil
	return strings.TrimSuffix(u.String(), "/")
}

// endpointURL is the endpoint's base URL, for messages.
func (c *Conn) endpointURL(ep Endpoint) string { return serverOf(ep, c.cli.HomeserverURL) }

// adoptEndpoint makes the discovered endpoint the connection's origin. A pos is only valid
// where it was issued (Synapse answers another server's pos with 400 "Invalid stream
// token"), so when the stored pos came from another dialect or server the connection starts
// afresh. On the same server the extensions keep their state, as after M_UNKNOWN_POS (the
// to-device cursor stays valid); on another server they start from nothing, since their
// cursors mean nothing there (a to-device since sent to the wrong server would acknowledge
// messages never received). An origin unknown to the store (a store written before origins
// were kept) is taken to be this endpoint.
func (c *Conn) adoptEndpoint(ctx context.Context, ep Endpoint) {
	origin := originOf(ep, c.cli.HomeserverURL)
	c.stateMu.Lock()
	stored := c.origin
	c.origin, c.originDirty = origin, stored != origin
	c.stateMu.Unlock()
	if stored == "" || stored == origin {
		return
	}
	_, storedServer, _ := strings.Cut(stored, " ")
	sameServer := storedServer == serverOf(ep, c.cli.HomeserverURL)
	c.log(ctx).Info().Str("stored_origin", stored).Str("origin", origin).Bool("same_server", sameServer).
		Msg("The stored connection belongs to another endpoint, starting a new one")
	c.reset()
	if !sameServer {
		c.stateMu.Lock()
		c.checkpts = make(map[string]json.RawMessage)
		c.stateMu.Unlock()
	}
}

func (c *Conn) discover(ctx context.Context) (Endpoint, error) {
	if c.cfg.Protocol != ProtocolAuto {
		ep := Endpoint{Protocol: c.cfg.Protocol}
		if c.cfg.BaseURL != "" {
			u, err := parseBaseURL(c.cfg.BaseURL)
			if err != nil {
				return Endpoint{}, err
			}
			ep.BaseURL = u
		} else if ep.Protocol == ProtocolMSC3575 {
			// MSC3575 is mostly served by a proxy, which .well-known names.
			return c.retryDiscovery(ctx, func() (Endpoint, error) { return discoverProxy(ctx, c.cli) })
		}
		return ep, nil
	}
	return c.retryDiscovery(ctx, func() (Endpoint, error) { return Discover(ctx, c.cli, ProtocolAuto) })
}

// retryDiscovery runs a discovery until it succeeds or fails for good: transient failures
// (network, 5xx, 429) are retried with backoff, definite answers are not.
func (c *Conn) retryDiscovery(ctx context.Context, discover func() (Endpoint, error)) (Endpoint, error) {
	for failures := 0; ; failures++ {
		ep, err := discover()
		if err == nil {
			if _, _, err := EncodeRequest(ep.Protocol, c.snapshotRequest("")); err != nil {
				return Endpoint{}, err
			}
			c.log(ctx).Info().Str("protocol", ep.Protocol.String()).Str("url", c.endpointURL(ep)).Msg("Discovered sliding sync")
			return ep, nil
		}
		if ctx.Err() != nil {
			return Endpoint{}, ctx.Err()
		}
		if errors.Is(err, mautrix.MUnknownToken) {
			return Endpoint{}, fmt.Errorf("slidingsync: access token rejected: %w", err)
		}
		if !hasTransientCause(err) {
			// The server answered: it has no sliding sync. Retrying will not change that.
			return Endpoint{}, err
		}
		wait := c.backoff(failures)
		c.log(ctx).Warn().Err(err).Dur("retry_in", wait).Msg("Sliding sync discovery failed")
		if err := sleep(ctx, wait); err != nil {
			return Endpoint{}, err
		}
	}
}

// checkTransport refuses plain HTTP to a host that is not on this machine, unless the
// configuration allows it.
func (c *Conn) checkTransport(u *url.URL) error {
	if c.cfg.AllowInsecureHTTP {
		return nil
	}
	return CheckTransport(u)
}

// hasTransientCause reports whether a discovery error includes a failure that may pass
// (network errors, 5xx, 429) rather than only definite answers.
func hasTransientCause(err error) bool {
	var joined interface{ Unwrap() []error }
	if !errors.As(err, &joined) {
		return false
	}
	for _, e := range joined.Unwrap() {
		if errors.Is(e, ErrNotAdvertised) {
			continue
		}
		var httpErr mautrix.HTTPError
		if !errors.As(e, &httpErr) || httpErr.Response == nil {
			return true
		}
		if st := httpErr.Response.StatusCode; st >= 500 || st == http.StatusTooManyRequests {
			return true
		}
	}
	return false
}

// reset forgets pos after M_UNKNOWN_POS. Room and list state are kept: the fresh response
// replaces rooms with initial entries and lists with SYNC ops. Extensions learn it from the
// next request's empty RequestInfo.Pos.
func (c *Conn) reset() {
	c.stateMu.Lock()
	c.pos = ""
	c.stateMu.Unlock()
	c.mu.Lock()
	c.unsubs, c.dellists = nil, nil // a new connection has nothing to undo
	c.mu.Unlock()
}
