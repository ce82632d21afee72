package slidingsync

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"time"

	"maunium.net/go/mautrix"
)

// roundTrip builds the complete request, sends it and decodes the response. It returns the
// configuration generation the request was built from.
func (c *Conn) roundTrip(ctx context.Context, ep Endpoint, info RequestInfo, timeout time.Duration) (*Response, uint64, error) {
	req, gen, reqCtx, cancel := c.buildRequest(ctx, info)
	defer cancel()
	if ep.Protocol != ProtocolV4 {
		for name, lc := range req.Lists {
			if len(lc.Ranges) == 0 {
				lc.Ranges = everyRoom
				req.Lists[name] = lc
			}
		}
	}
	timeoutMS := timeout.Milliseconds()
	req.Timeout = &timeoutMS
	var err error
	if req.Extensions, err = c.extensionBodies(ctx, info); err != nil {
		return nil, gen, err
	}
	if ep.Protocol == ProtocolMSC3575 {
		c.txnCounter++
		req.TxnID = strconv.FormatUint(c.txnCounter, 10)
	}
	query, body, err := EncodeRequest(ep.Protocol, req)
	if err != nil {
		return nil, gen, fmt.Errorf("%w: %w", errFatal, err)
	}
	url, err := ep.requestURL(c.cli.HomeserverURL, query)
	if err != nil {
		return nil, gen, fmt.Errorf("%w: %w", errFatal, err)
	}
	httpCtx, httpCancel := context.WithTimeout(reqCtx, c.httpTimeout(timeout))
	defer httpCancel()
	data, err := c.cli.MakeFullRequest(httpCtx, mautrix.FullRequest{
		Method:            http.MethodPost,
		URL:               url,
		RequestBytes:      body,
		MaxAttempts:       1,
		ResponseSizeLimit: c.cfg.MaxResponseSize,
	})
	if reqCtx.Err() != nil && ctx.Err() == nil {
		return nil, gen, errConfigChanged
	}
	if err != nil {
		return nil, gen, err
	}
	resp, err := DecodeResponse(data)
	if err != nil {
		return nil, gen, err
	}
	return resp, gen, nil
}

func (c *Conn) buildRequest(ctx context.Context, info RequestInfo) (*Request, uint64, context.Context, context.CancelFunc) {
	c.mu.Lock()
	defer c.mu.Unlock()
	req := c.snapshotRequest(info.Pos)
	reqCtx, cancel := context.WithCancel(ctx)
	c.cancelRq = cancel
	return req, c.gen, reqCtx, func() {
		cancel()
		c.mu.Lock()
		c.cancelRq = nil
		c.mu.Unlock()
	}
}

func (c *Conn) configGen() uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.gen
}

var errConfigChanged = errors.New("slidingsync: configuration changed during the request")

// httpTimeout is the HTTP timeout of a request that asks the server to wait up to timeout.
func (c *Conn) httpTimeout(timeout time.Duration) time.Duration {
	if timeout == 0 {
		return c.cfg.NoPollTimeout
	}
	return timeout + c.cfg.TimeoutMargin
}

// extensionInfo is info as extension ext sees it: with its last committed checkpoint.
func (c *Conn) extensionInfo(info RequestInfo, ext Extension) RequestInfo {
	c.stateMu.RLock()
	info.Checkpoint = c.checkpts[ext.Name()]
	c.stateMu.RUnlock()
	return info
}

// extensionBodies asks every extension for its request body, by wire key; nil when none sends
// one.
func (c *Conn) extensionBodies(ctx context.Context, info RequestInfo) (map[string]json.RawMessage, error) {
	var bodies map[string]json.RawMessage
	for _, ext := range c.exts {
		body, err := ext.Request(ctx, c.extensionInfo(info, ext))
		if err == nil && body != nil {
			var raw json.RawMessage
			if raw, err = json.Marshal(body); err == nil {
				if bodies == nil {
					bodies = make(map[string]json.RawMessage, len(c.exts))
				}
				bodies[ext.WireKey(info.Protocol)] = raw
			}
		}
		if err != nil {
			return nil, fmt.Errorf("slidingsync: extension %s request: %w", ext.Name(), err)
		}
	}
	return bodies, nil
}
