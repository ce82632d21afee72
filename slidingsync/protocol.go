package slidingsync

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"strings"

	"maunium.net/go/mautrix"
)

// Protocol names one of the sliding sync wire dialects a server may speak.
type Protocol string

const (
	// ProtocolAuto asks [Discover] (and [New]) to find the dialect.
	ProtocolAuto Protocol = ""
	// ProtocolMSC3575 is the original proposal as served by the sliding sync proxy:
	// ranges, sort, tuple required_state, list ops, txn_id.
	ProtocolMSC3575 Protocol = "msc3575"
	// ProtocolMSC4186 is simplified sliding sync as Synapse serves it on its unstable path:
	// pos and timeout in the query string, required_state and timeline_limit on every list.
	ProtocolMSC4186 Protocol = "msc4186"
	// ProtocolV4 is the merged MSC4186 text on /_matrix/client/v4/sync: pos, timeout and
	// conn_id in the body, one range per list, required_state as include/exclude objects and
	// MSC4543-prefixed extension keys.
	ProtocolV4 Protocol = "v4"
)

// protocols lists the concrete dialects, in the order Discover prefers them.
var protocols = []Protocol{ProtocolMSC4186, ProtocolMSC3575, ProtocolV4}

// ParseProtocol parses a protocol name as used on command lines ("auto", "msc4186", "msc3575", "v4").
func ParseProtocol(s string) (Protocol, error) {
	switch p := Protocol(strings.ToLower(strings.TrimSpace(s))); p {
	case "auto", "":
		return ProtocolAuto, nil
	case ProtocolMSC3575, ProtocolMSC4186, ProtocolV4:
		return p, nil
	default:
		return "", fmt.Errorf("slidingsync: unknown protocol %q (want auto, msc4186, msc3575 or v4)", s)
	}
}

// String returns the protocol's command-line name.
func (p Protocol) String() string {
	if p == ProtocolAuto {
		return "auto"
	}
	return string(p)
}

// Path returns the URL path of the sync endpoint for the protocol.
func (p Protocol) Path() string {
	switch p {
	case ProtocolMSC3575:
		return "/_matrix/client/unstable/org.matrix.msc3575/sync"
	case ProtocolMSC4186:
		return "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync"
	case ProtocolV4:
		return "/_matrix/client/v4/sync"
	default:
		return ""
	}
}

// valid reports whether p names a concrete dialect.
func (p Protocol) valid() bool {
	return p == ProtocolMSC3575 || p == ProtocolMSC4186 || p == ProtocolV4
}

// posInQuery reports whether pos and timeout travel as query parameters (MSC3575 and
// Synapse) rather than in the request body (v4).
func (p Protocol) posInQuery() bool { return p != ProtocolV4 }

// Endpoint is where and how a connection talks sliding sync.
type Endpoint struct {
	// Protocol is the wire dialect.
	Protocol Protocol
	// BaseURL is the server that serves it: the homeserver itself, or a proxy named by
	// .well-known. Nil means the client's HomeserverURL.
	BaseURL *url.URL
}

// requestURL returns the full sync URL for the endpoint with the given query, falling back to the
// homeserver URL when BaseURL is nil.
func (e Endpoint) requestURL(homeserver *url.URL, query url.Values) (string, error) {
	base := e.BaseURL
	if base == nil {
		base = homeserver
	}
	if base == nil || base.Scheme == "" || base.Host == "" {
		return "", errors.New("slidingsync: no base URL for the sync endpoint")
	}
	if !e.Protocol.valid() {
		return "", fmt.Errorf("slidingsync: endpoint has no concrete protocol (%q)", e.Protocol)
	}
	u := *base
	u.Path = strings.TrimSuffix(u.Path, "/") + e.Protocol.Path()
	u.RawPath = ""
	u.RawQuery = query.Encode()
	return u.String(), nil
}

// featureSimplified is the /versions unstable feature by which a homeserver says it serves
// the MSC4186 dialect natively (Synapse and the conduwuit family).
var featureSimplified = mautrix.UnstableFeature{UnstableFlag: "org.matrix.simplified_msc3575"}

// wellKnownProxyKey is the .well-known/matrix/client key that names an MSC3575 proxy.
const wellKnownProxyKey = "org.matrix.msc3575.proxy"

// ErrNotAdvertised is returned by Discover (and Run, with discovery) when the homeserver
// advertises no sliding sync: a bot can fall back to /sync, or force a Protocol.
var ErrNotAdvertised = errors.New("slidingsync: the homeserver advertises no sliding sync (no org.matrix.simplified_msc3575 in /versions, no org.matrix.msc3575.proxy in .well-known); set Config.Protocol to force one")

// Discover finds how to talk sliding sync to the client's homeserver. An explicit protocol
// (anything but ProtocolAuto) always wins and is returned without a network call, based at
// the homeserver. Otherwise /versions is asked for the simplified dialect, then
// .well-known/matrix/client for an MSC3575 proxy. When neither is found the error wraps
// ErrNotAdvertised.
func Discover(ctx context.Context, cli *mautrix.Client, override Protocol) (Endpoint, error) {
	if override != ProtocolAuto {
		if !override.valid() {
			return Endpoint{}, fmt.Errorf("slidingsync: unknown protocol %q", override)
		}
		return Endpoint{Protocol: override}, nil
	}
	if cli == nil || cli.HomeserverURL == nil {
		return Endpoint{}, mautrix.ErrClientHasNoHomeserver
	}
	var errs []error
	versions, err := cli.Versions(ctx)
	if err != nil {
		errs = append(errs, fmt.Errorf("/versions: %w", err))
	} else if versions.Supports(featureSimplified) {
		return Endpoint{Protocol: ProtocolMSC4186}, nil
	}
	if ctx.Err() != nil {
		return Endpoint{}, ctx.Err()
	}
	proxy, err := wellKnownProxy(ctx, cli)
	if err != nil {
		errs = append(errs, fmt.Errorf(".well-known: %w", err))
	} else if proxy != nil {
		return Endpoint{Protocol: ProtocolMSC3575, BaseURL: proxy}, nil
	}
	if len(errs) == 2 && allUnreachable(errs) {
		// Neither question got an answer: nothing is known about sliding sync yet.
		return Endpoint{}, fmt.Errorf("slidingsync: cannot reach the homeserver %s: %w", cli.HomeserverURL.Redacted(), errors.Join(errs...))
	}
	return Endpoint{}, errors.Join(append([]error{ErrNotAdvertised}, errs...)...)
}

// allUnreachable reports whether every error is a failure to get an answer at all (no HTTP
// response: the network, a refused connection, a timeout).
func allUnreachable(errs []error) bool {
	for _, err := range errs {
		var httpErr mautrix.HTTPError
		if errors.As(err, &httpErr) && httpErr.Response != nil {
			return false
		}
	}
	return true
}

// discoverProxy finds where an MSC3575 connection goes: the proxy .well-known names, or the
// homeserver itself when it names none (servers that serve MSC3575 natively).
func discoverProxy(ctx context.Context, cli *mautrix.Client) (Endpoint, error) {
	if cli == nil || cli.HomeserverURL == nil {
		return Endpoint{}, mautrix.ErrClientHasNoHomeserver
	}
	proxy, err := wellKnownProxy(ctx, cli)
	if err != nil {
		return Endpoint{}, errors.Join(fmt.Errorf("slidingsync: finding the MSC3575 proxy: .well-known: %w", err))
	}
	return Endpoint{Protocol: ProtocolMSC3575, BaseURL: proxy}, nil
}

func wellKnownProxy(ctx context.Context, cli *mautrix.Client) (*url.URL, error) {
	u := *cli.HomeserverURL
	u.Path = "/.well-known/matrix/client"
	u.RawPath, u.RawQuery = "", ""
	var body map[string]any
	_, err := cli.MakeFullRequest(ctx, mautrix.FullRequest{
		Method:            "GET",
		URL:               u.String(),
		ResponseJSON:      &body,
		MaxAttempts:       1,
		ResponseSizeLimit: 64 * 1024,
	})
	if err != nil {
		if httpErr := (mautrix.HTTPError{}); errors.As(err, &httpErr) && httpErr.IsStatus(404) {
			return nil, nil
		}
		return nil, err
	}
	entry, _ := body[wellKnownProxyKey].(map[string]any)
	raw, _ := entry["url"].(string)
	if raw == "" {
		return nil, nil
	}
	proxy, err := url.Parse(raw)
	if err != nil || proxy.Scheme == "" || proxy.Host == "" {
		return nil, fmt.Errorf("invalid proxy URL %q in %s", raw, wellKnownProxyKey)
	}
	return proxy, nil
}

func parseBaseURL(raw string) (*url.URL, error) {
	u, err := url.Parse(raw)
	if err != nil || u.Scheme == "" || u.Host == "" {
		return nil, fmt.Errorf("slidingsync: invalid base URL %q", raw)
	}
	return u, nil
}
