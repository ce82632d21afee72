package slidingsync

import (
	"context"
	"encoding/json"
	"fmt"
	"net/url"
	"strings"
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
func (c *Conn) adoptEndpoint(ctx context.Context, ep Endpoint) error {
	origin := originOf(ep, c.cli.HomeserverURL)
	c.stateMu.Lock()
	stored := c.origin
	c.origin, c.originDirty = origin, stored != origin
	c.stateMu.Unlock()
	if stored == "" || stored == origin {
		return nil
	}
	_, storedServer, _ := strings.Cut(stored, " ")
	sameServer := storedServer == serverOf(ep, c.cli.HomeserverURL)
	c.log(ctx).Info().Str("stored_origin", stored).Str("origin", origin).Bool("same_server", sameServer).
		Msg("The stored connection belongs to another endpoint, starting a new one")
	if err := c.reset(ctx); err != nil {
		return err
	}
	if sameServer {
		return nil
	}
	c.stateMu.Lock()
	c.checkpts = make(map[string]json.RawMessage)
	c.stateMu.Unlock()
	for _, ext := range c.exts {
		if ck, ok := ext.(Checkpointer); ok {
			if err := ck.Restore(ctx, nil); err != nil {
				return fmt.Errorf("slidingsync: restore extension %s: %w", ext.Name(), err)
			}
		}
	}
	return nil
}
