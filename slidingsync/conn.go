package slidingsync

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/id"
)

// Defaults for the zero values of Config.
const (
	DefaultPollTimeout     = 30 * time.Second
	DefaultTimeoutMargin   = 15 * time.Second
	DefaultNoPollTimeout   = 2 * time.Minute
	DefaultMinBackoff      = time.Second
	DefaultMaxBackoff      = 30 * time.Second
	DefaultMaxResponseSize = 256 << 20
)

// Config holds the settings of a Conn. The zero value of every field is usable.
type Config struct {
	// Protocol forces a dialect. ProtocolAuto (the zero value) discovers it when Run starts.
	Protocol Protocol
	// BaseURL is where sliding sync is served when it is not the homeserver (an MSC3575 proxy).
	// Empty means the homeserver, or what discovery finds; setting it needs an explicit Protocol.
	BaseURL string
	// ConnID separates concurrent connections of one device. Empty is the default connection.
	ConnID string
	// Lists and RoomSubscriptions are the initial configuration; change them later with
	// SetList, RemoveList, Subscribe and Unsubscribe.
	Lists             map[string]ListConfig          // lists by name
	RoomSubscriptions map[id.RoomID]RoomSubscription // subscriptions by room
	// Extensions are sent with every request, keyed by their wire key.
	Extensions []Extension
	// Store persists state. Nil means a new MemoryStore.
	Store Store
	// OnResponse is called once per processed response, after extensions and the merge and
	// before the commit. An error aborts the cycle (nothing is committed, the same pos is
	// retried after a backoff), so delivery is at least once.
	OnResponse func(ctx context.Context, res *Result) error
	// PollTimeout is the long-poll time asked of the server. Zero means DefaultPollTimeout.
	PollTimeout time.Duration
	// TimeoutMargin is added to the poll timeout for the HTTP request's own timeout, so that a
	// response sent at the end of the poll is not lost. Zero means DefaultTimeoutMargin.
	TimeoutMargin time.Duration
	// NoPollTimeout is the HTTP timeout of a request that asks the server not to wait
	// (timeout=0: the first request of a Run, window steps, catch-up after a full to-device
	// batch). The server computes such a response at once, which for a large window on a
	// loaded server can take long, and Synapse keeps computing after the client gives up.
	// Zero means DefaultNoPollTimeout.
	NoPollTimeout time.Duration
	// OnSyncError, if set, is called from Run for every failed cycle that Run retries, before
	// the wait: the application learns that syncing is failing (and how long it has been
	// failing the same way) while Run keeps retrying. It must not block.
	OnSyncError func(ctx context.Context, se SyncError)
	// MinBackoff and MaxBackoff bound the exponential backoff after retryable errors (5xx,
	// network, undecodable responses). Zero means DefaultMinBackoff and DefaultMaxBackoff.
	MinBackoff, MaxBackoff time.Duration
	// TimelineCap is how many timeline events are kept per room. Zero means DefaultTimelineCap.
	TimelineCap int
	// MaxResponseSize bounds a response body. Zero means DefaultMaxResponseSize.
	MaxResponseSize int64
	// CompactState keeps the events of the state model (RoomState.State, Timeline and
	// InviteState) with their content as raw JSON only: Content.VeryRaw is set, Raw and Parsed
	// are nil. Read one by parsing a copy of its content (c := evt.Content;
	// c.ParseRaw(evt.Type)), as the state is shared. It roughly halves the memory the state
	// model takes and makes commits cheaper; the events of Result.Response are not affected.
	// False keeps them decoded.
	CompactState bool
	// RoomCache bounds how many rooms' merged state the Conn keeps in memory. Zero keeps every
	// room. A positive value keeps at most that many, those most recently touched by a
	// response; the Store must then implement RoomLoader: Run loads the checkpoint without its
	// rooms and reads a room from the store when a response touches it and it is not in
	// memory. Room and Rooms then see only the rooms in memory; LoadRoom reads any. Use it
	// when the state model of every room would cost too much memory (about 4 to 7 KB a room).
	RoomCache int
	// AllowInsecureHTTP allows plain http:// to a homeserver or proxy that is not on a
	// loopback address. False (the default) makes Run refuse before sending the access token.
	AllowInsecureHTTP bool
}

// Result is what OnResponse receives for one processed response.
type Result struct {
	// Response is the decoded response.
	Response *Response
	// Rooms holds the merged state of every room in the response.
	Rooms map[id.RoomID]*RoomState
	// Lists holds the merged state of every list in the response.
	Lists map[string]ListState
	// Initial is true when the request carried no pos.
	Initial bool
}

// Conn is one sliding sync connection of one device. Its methods are safe for concurrent use;
// Run may run only once at a time.
type Conn struct {
	cli   *mautrix.Client
	cfg   Config
	store Store
	key   ConnKey
	exts  []Extension

	running atomic.Bool

	mu       sync.Mutex
	lists    map[string]ListConfig
	subs     map[id.RoomID]RoomSubscription
	unsubs   []id.RoomID
	dellists []string // lists removed since the last processed response (MSC3575 keeps lists)
	gen      uint64
	growth   map[string]*growth // window of each growing list (ListConfig.GrowBatch)
	cancelRq context.CancelFunc
	endpoint Endpoint

	stateMu     sync.RWMutex
	pos         string
	origin      string // the endpoint that issued pos (originOf)
	originDirty bool   // origin is not stored yet
	rooms       map[id.RoomID]*RoomState
	roomUsed    map[id.RoomID]uint64 // when a response last touched a room in rooms; RoomCache only
	roomTick    uint64
	listStates  map[string]ListState
	loaded      bool
	checkpts    map[string]json.RawMessage
	txnCounter  uint64
}

// New returns a connection for the client's logged-in device. It makes no network call.
func New(cli *mautrix.Client, cfg Config) (*Conn, error) {
	if cli == nil {
		return nil, mautrix.ErrClientIsNil
	}
	if cli.UserID == "" || cli.DeviceID == "" {
		return nil, errors.New("slidingsync: client has no user ID or device ID")
	}
	if !cfg.AllowInsecureHTTP {
		if err := CheckTransport(cli.HomeserverURL); err != nil {
			return nil, err
		}
	}
	if cfg.Protocol != ProtocolAuto && !cfg.Protocol.valid() {
		return nil, fmt.Errorf("slidingsync: unknown protocol %q", cfg.Protocol)
	}
	if len(cfg.ConnID) > 16 {
		return nil, fmt.Errorf("slidingsync: conn_id %q is longer than 16 characters", cfg.ConnID)
	}
	seen := make(map[string]bool, len(cfg.Extensions))
	for _, ext := range cfg.Extensions {
		if ext == nil {
			return nil, errors.New("slidingsync: nil extension")
		}
		if seen[ext.Name()] {
			return nil, fmt.Errorf("slidingsync: extension %q configured twice", ext.Name())
		}
		seen[ext.Name()] = true
	}
	c := &Conn{
		cli:   cli,
		cfg:   cfg,
		store: cfg.Store,
		key:   ConnKey{UserID: cli.UserID, DeviceID: cli.DeviceID, ConnID: cfg.ConnID},
		exts:  slices.Clone(cfg.Extensions),
		lists: maps.Clone(cfg.Lists),
		subs:  maps.Clone(cfg.RoomSubscriptions),
	}
	if c.store == nil {
		c.store = NewMemoryStore()
	}
	if cfg.RoomCache < 0 {
		return nil, fmt.Errorf("slidingsync: negative RoomCache %d", cfg.RoomCache)
	}
	if _, ok := c.store.(RoomLoader); cfg.RoomCache > 0 && !ok {
		return nil, errors.New("slidingsync: RoomCache needs a Store that implements RoomLoader")
	}
	if c.lists == nil {
		c.lists = make(map[string]ListConfig)
	}
	if c.subs == nil {
		c.subs = make(map[id.RoomID]RoomSubscription)
	}
	if cfg.BaseURL != "" {
		if cfg.Protocol == ProtocolAuto {
			return nil, errors.New("slidingsync: BaseURL needs an explicit Protocol")
		}
	}
	// Encode once to reject configurations the dialect cannot express before Run.
	if cfg.Protocol != ProtocolAuto {
		if _, _, err := EncodeRequest(cfg.Protocol, c.snapshotRequest("")); err != nil {
			return nil, err
		}
	}
	return c, nil
}

// Key returns the connection's store key.
func (c *Conn) Key() ConnKey { return c.key }

// SetList adds or replaces a list. An in-flight request is cancelled and its response is
// never processed. A list with GrowBatch starts again from its first window. A list the
// connection's dialect cannot serve (once it is known: Config.Protocol or discovery) is
// refused with an error and changes nothing.
func (c *Conn) SetList(name string, lc ListConfig) error {
	return c.changeConfig(func() error {
		lists := maps.Clone(c.lists)
		lists[name] = lc
		if err := c.checkDialect(&Request{Lists: lists, RoomSubscriptions: c.subs}); err != nil {
			return err
		}
		c.lists[name] = lc
		c.dellists = slices.DeleteFunc(c.dellists, func(n string) bool { return n == name })
		delete(c.growth, name) // another list: its window starts again
		return nil
	})
}

// RemoveList removes a list.
func (c *Conn) RemoveList(name string) {
	_ = c.changeConfig(func() error {
		if _, ok := c.lists[name]; ok {
			delete(c.lists, name)
			delete(c.growth, name)
			c.dellists = append(c.dellists, name)
		}
		return nil
	})
}

// Subscribe adds or replaces a room subscription. Like SetList, it refuses a subscription
// the dialect cannot serve.
func (c *Conn) Subscribe(roomID id.RoomID, sub RoomSubscription) error {
	return c.changeConfig(func() error {
		subs := maps.Clone(c.subs)
		subs[roomID] = sub
		if err := c.checkDialect(&Request{Lists: c.lists, RoomSubscriptions: subs}); err != nil {
			return err
		}
		c.subs[roomID] = sub
		c.unsubs = slices.DeleteFunc(c.unsubs, func(r id.RoomID) bool { return r == roomID })
		return nil
	})
}

// Unsubscribe removes a room subscription.
func (c *Conn) Unsubscribe(roomID id.RoomID) {
	_ = c.changeConfig(func() error {
		if _, ok := c.subs[roomID]; ok {
			delete(c.subs, roomID)
			c.unsubs = append(c.unsubs, roomID)
		}
		return nil
	})
}

// checkDialect encodes a configuration for the dialect in use, if it is known yet, to refuse
// what it cannot express or its servers refuse. Caller holds c.mu.
func (c *Conn) checkDialect(req *Request) error {
	p := cmp.Or(c.endpoint.Protocol, c.cfg.Protocol)
	if p == ProtocolAuto {
		return nil
	}
	_, _, err := EncodeRequest(p, req)
	return err
}

func (c *Conn) changeConfig(fn func() error) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := fn(); err != nil {
		return err
	}
	c.gen++
	if c.cancelRq != nil {
		c.cancelRq()
	}
	return nil
}

// Pos returns the pos of the last processed response.
func (c *Conn) Pos() string {
	c.stateMu.RLock()
	defer c.stateMu.RUnlock()
	return c.pos
}

// Room returns the merged state of a room in memory (every known room unless
// Config.RoomCache is set). The returned value must not be modified.
func (c *Conn) Room(roomID id.RoomID) (*RoomState, bool) {
	c.stateMu.RLock()
	defer c.stateMu.RUnlock()
	rs, ok := c.rooms[roomID]
	return rs, ok
}

// Rooms returns a copy of the map of the rooms in memory: every known room unless
// Config.RoomCache is set. The RoomState values must not be modified.
func (c *Conn) Rooms() map[id.RoomID]*RoomState {
	c.stateMu.RLock()
	defer c.stateMu.RUnlock()
	return maps.Clone(c.rooms)
}

// LoadRoom returns the merged state of a known room, from memory or, with Config.RoomCache
// set, from the store. The returned value must not be modified.
func (c *Conn) LoadRoom(ctx context.Context, roomID id.RoomID) (*RoomState, bool, error) {
	c.stateMu.RLock()
	rs, ok := c.rooms[roomID]
	c.stateMu.RUnlock()
	if ok || c.cfg.RoomCache == 0 {
		return rs, ok, nil
	}
	loaded, err := c.store.(RoomLoader).LoadRooms(ctx, c.key, []id.RoomID{roomID})
	if err != nil {
		return nil, false, fmt.Errorf("slidingsync: load room %s: %w", roomID, err)
	}
	rs, ok = loaded[roomID]
	if ok && c.cfg.CompactState {
		rs = CompactRoom(rs)
	}
	return rs, ok, nil
}

// List returns the merged state of a list.
func (c *Conn) List(name string) (ListState, bool) {
	c.stateMu.RLock()
	defer c.stateMu.RUnlock()
	ls, ok := c.listStates[name]
	return ls, ok
}

// Endpoint returns the endpoint in use, once Run has discovered it.
func (c *Conn) Endpoint() Endpoint {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.endpoint
}

func (c *Conn) log(ctx context.Context) *zerolog.Logger {
	log := zerolog.Ctx(ctx)
	if log.GetLevel() == zerolog.Disabled || log == zerolog.DefaultContextLogger {
		return &c.cli.Log
	}
	return log
}

// snapshotRequest copies the configuration into a request. Caller holds c.mu or owns c.
func (c *Conn) snapshotRequest(pos string) *Request {
	req := &Request{ConnID: c.cfg.ConnID, Pos: pos}
	if len(c.lists) > 0 {
		req.Lists = maps.Clone(c.lists)
		for name, lc := range req.Lists {
			if lc.GrowBatch > 0 {
				lc.Ranges = c.growth[name].ranges(lc)
				req.Lists[name] = lc
			}
		}
	}
	if len(c.subs) > 0 {
		req.RoomSubscriptions = maps.Clone(c.subs)
	}
	req.UnsubscribeRooms = slices.Clone(c.unsubs)
	req.DeletedLists = slices.Clone(c.dellists)
	return req
}

var errConfigChanged = errors.New("slidingsync: configuration changed during the request")

// httpTimeout is the HTTP timeout of a request that asks the server to wait up to timeout.
func (c *Conn) httpTimeout(timeout time.Duration) time.Duration {
	if timeout == 0 {
		return cmp.Or(max(c.cfg.NoPollTimeout, 0), DefaultNoPollTimeout)
	}
	return timeout + cmp.Or(max(c.cfg.TimeoutMargin, 0), DefaultTimeoutMargin)
}

func (c *Conn) pollTimeout() time.Duration {
	if c.cfg.PollTimeout > 0 {
		return c.cfg.PollTimeout
	}
	return DefaultPollTimeout
}

func (c *Conn) load(ctx context.Context) error {
	c.stateMu.Lock()
	defer c.stateMu.Unlock()
	if c.loaded {
		return nil
	}
	var cp *Checkpoint
	var err error
	if c.cfg.RoomCache > 0 {
		cp, err = c.store.(RoomLoader).LoadHead(ctx, c.key)
	} else {
		cp, err = c.store.Load(ctx, c.key)
	}
	if err != nil {
		return fmt.Errorf("slidingsync: load state: %w", err)
	}
	for _, ext := range c.exts {
		if ck, ok := ext.(Checkpointer); ok {
			if err := ck.Restore(ctx, cp.Extensions[ext.Name()]); err != nil {
				return fmt.Errorf("slidingsync: restore extension %s: %w", ext.Name(), err)
			}
		}
	}
	c.pos, c.origin = cp.Pos, cp.Origin
	c.rooms = cp.Rooms
	if c.cfg.CompactState {
		for roomID, rs := range c.rooms {
			c.rooms[roomID] = CompactRoom(rs)
		}
	}
	c.listStates = cp.Lists
	c.checkpts = cp.Extensions
	if c.rooms == nil {
		c.rooms = make(map[id.RoomID]*RoomState)
	}
	if c.listStates == nil {
		c.listStates = make(map[string]ListState)
	}
	if c.checkpts == nil {
		c.checkpts = make(map[string]json.RawMessage)
	}
	c.loaded = true
	return nil
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
		if errors.Is(e, ErrNoSlidingSync) {
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

// reset forgets pos after M_UNKNOWN_POS and tells the extensions. Room and list state are
// kept: the fresh response replaces rooms with initial entries and lists with SYNC ops.
func (c *Conn) reset(ctx context.Context) error {
	c.stateMu.Lock()
	c.pos = ""
	c.stateMu.Unlock()
	c.mu.Lock()
	c.unsubs, c.dellists = nil, nil // a new connection has nothing to undo
	c.mu.Unlock()
	for _, ext := range c.exts {
		if r, ok := ext.(Resetter); ok {
			if err := r.Reset(ctx); err != nil {
				return fmt.Errorf("slidingsync: reset extension %s: %w", ext.Name(), err)
			}
		}
	}
	return nil
}

// roundTrip builds the complete request, sends it and decodes the response. It returns the
// configuration generation the request was built from.
func (c *Conn) roundTrip(ctx context.Context, ep Endpoint, info RequestInfo, timeout time.Duration) (*Response, uint64, error) {
	req, gen, reqCtx, cancel := c.buildRequest(ctx, info)
	defer cancel()
	if ep.Protocol != ProtocolV4 {
		for name, lc := range req.Lists {
			if len(lc.Ranges) == 0 && lc.GrowBatch <= 0 {
				lc.Ranges = everyRoom
				req.Lists[name] = lc
			}
		}
	}
	timeoutMS := timeout.Milliseconds()
	req.Timeout = &timeoutMS
	extBodies := make(map[string]json.RawMessage, len(c.exts))
	for _, ext := range c.exts {
		body, err := ext.Request(ctx, info)
		if err != nil {
			return nil, gen, fmt.Errorf("slidingsync: extension %s request: %w", ext.Name(), err)
		}
		if body == nil {
			continue
		}
		raw, err := json.Marshal(body)
		if err != nil {
			return nil, gen, fmt.Errorf("slidingsync: extension %s request: %w", ext.Name(), err)
		}
		extBodies[wireKey(ext, ep.Protocol)] = raw
	}
	if len(extBodies) > 0 {
		req.Extensions = extBodies
	}
	if ep.Protocol == ProtocolMSC3575 {
		c.txnCounter++
		req.TxnID = strconv.FormatUint(c.txnCounter, 10)
	}
	query, body, err := EncodeRequest(ep.Protocol, req)
	if err != nil {
		return nil, gen, fmt.Errorf("%w: %w", errFatal, err)
	}
	url, err := ep.URL(c.cli.HomeserverURL, query)
	if err != nil {
		return nil, gen, fmt.Errorf("%w: %w", errFatal, err)
	}
	httpCtx, httpCancel := context.WithTimeout(reqCtx, c.httpTimeout(timeout))
	defer httpCancel()
	limit := c.cfg.MaxResponseSize
	if limit <= 0 {
		limit = DefaultMaxResponseSize
	}
	data, err := c.cli.MakeFullRequest(httpCtx, mautrix.FullRequest{
		Method:            http.MethodPost,
		URL:               url,
		RequestBytes:      body,
		MaxAttempts:       1,
		ResponseSizeLimit: limit,
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
	if lo <= 0 {
		lo = DefaultMinBackoff
	}
	if hi <= 0 {
		hi = DefaultMaxBackoff
	}
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

// missingRooms returns the rooms of a response that are not in memory but may be in the store
// (RoomCache only). Caller holds stateMu.
func (c *Conn) missingRooms(rooms map[id.RoomID]*RoomResponse) []id.RoomID {
	if c.cfg.RoomCache == 0 {
		return nil
	}
	var missing []id.RoomID
	for roomID := range rooms {
		if _, ok := c.rooms[roomID]; !ok {
			missing = append(missing, roomID)
		}
	}
	return missing
}

// evictRooms marks the rooms of a processed response as used and, once more than RoomCache
// rooms are in memory, drops the least recently used down to 7/8 of it (so that eviction is
// not paid on every response). Caller holds stateMu for writing.
func (c *Conn) evictRooms(touched map[id.RoomID]*RoomState) {
	limit := c.cfg.RoomCache
	if limit == 0 {
		return
	}
	if c.roomUsed == nil {
		c.roomUsed = make(map[id.RoomID]uint64, limit)
	}
	c.roomTick++
	for roomID := range touched {
		c.roomUsed[roomID] = c.roomTick
	}
	if len(c.rooms) <= limit {
		return
	}
	type used struct {
		id   id.RoomID
		tick uint64
	}
	all := make([]used, 0, len(c.rooms))
	for roomID := range c.rooms {
		all = append(all, used{roomID, c.roomUsed[roomID]})
	}
	slices.SortFunc(all, func(a, b used) int { return cmp.Compare(a.tick, b.tick) })
	keep := max(limit-limit/8, 1)
	for _, u := range all[:len(all)-keep] {
		delete(c.rooms, u.id)
		delete(c.roomUsed, u.id)
	}
}

// growth is the window of a list with GrowBatch. The first window is [0, GrowBatch-1]. While
// rooms remain unseen, a dialect with several ranges per list and a ShrinkTo below GrowBatch
// scans: the head [0, ShrinkTo-1] plus a range that moves down the list by GrowBatch, so that
// a server repeating the window's room IDs sends each ID about once (a window growing over
// every room makes it send a quadratic number of them). Otherwise the window itself grows.
// Once every room has been seen the window is the head alone (shrunk), or stays over every room
// without ShrinkTo. The head probes (doubles) while its last room has new activity.
type growth struct {
	head     int   // the window [0, head]
	scan     Range // the scan range, while scanning
	scanning bool
	shrunk   bool // every room has been seen and the window is the head
}

// scanFrom returns the scan range that starts at position next: GrowBatch rooms, reaching back
// GrowBatch/20 into the previous range so that rooms moving down a little between two
// requests are not skipped, and ending at the list's last position at most.
func scanFrom(lc ListConfig, next, last int) Range {
	return Range{Start: max(next-lc.GrowBatch/20, 0), End: min(next+lc.GrowBatch-1, last)}
}

// ranges returns the ranges to request. g may be nil: the first window.
func (g *growth) ranges(lc ListConfig) []Range {
	if g == nil {
		return []Range{{Start: 0, End: lc.GrowBatch - 1}}
	}
	if !g.scanning {
		return []Range{{Start: 0, End: g.head}}
	}
	if g.scan.Start <= g.head+1 {
		return []Range{{Start: 0, End: max(g.head, g.scan.End)}}
	}
	return []Range{{Start: 0, End: g.head}, g.scan}
}

// trimEnd returns the last position ListState.Rooms keeps: the head's, once the window no
// longer covers everything from the top. g may be nil.
func (g *growth) trimEnd() (int, bool) {
	if g == nil || !(g.shrunk || g.scanning) {
		return 0, false
	}
	return g.head, true
}

// growWindows moves the windows of growing lists after a processed response and reports
// whether one must be requested at once (a room not yet seen, or a probe). Caller holds c.mu.
func (c *Conn) growWindows(proto Protocol, lists map[string]ListState, news map[id.RoomID]bool) bool {
	more := false
	for name, ls := range lists {
		lc, ok := c.lists[name]
		if !ok || lc.GrowBatch <= 0 {
			continue
		}
		g := c.growth[name]
		if g == nil {
			g = &growth{head: lc.GrowBatch - 1}
			if c.growth == nil {
				c.growth = make(map[string]*growth)
			}
			c.growth[name] = g
		}
		last := ls.Count - 1
		switch {
		case g.shrunk || g.scanning:
			// Probe past the head until a window ends with a room that has nothing new: the
			// head doubles, by GrowBatch at most, so that a small burst costs few IDs.
			if g.head < last && overflowed(ls, news, g.head) {
				g.head = min(2*g.head+1, g.head+lc.GrowBatch, last)
				more = true
			} else {
				g.head = lc.ShrinkTo - 1
			}
			if g.scanning {
				if g.scan.End >= last {
					g.scanning, g.shrunk = false, true
				} else {
					g.scan = scanFrom(lc, g.scan.End+1, last)
					more = true
				}
			}
		case g.head < last:
			if lc.ShrinkTo > 0 && lc.ShrinkTo < lc.GrowBatch && proto != ProtocolV4 {
				g.scanning = true
				g.scan = scanFrom(lc, g.head+1, last)
				g.head = lc.ShrinkTo - 1
			} else {
				g.head = min(g.head+lc.GrowBatch, last)
			}
			more = true
		case lc.ShrinkTo > 0 && ls.Count > lc.ShrinkTo:
			// Every room is known: keep only the top of the list in the window.
			g.head = lc.ShrinkTo - 1
			g.shrunk = true
		}
	}
	return more
}

// overflowed reports whether rooms past a window ending at end may have activity the response
// did not carry. In an activity order the rooms with new activity come first, so if the
// window's last room had some, more rooms than the window holds may have had some and the
// ones past the window were left out; if it had none, no room past it had any. Without the
// window's room IDs (the v4 dialect), a response with news in as many rooms as the window
// holds counts as an overflow.
func overflowed(ls ListState, news map[id.RoomID]bool, end int) bool {
	if end < len(ls.Rooms) && ls.Rooms[end] != "" {
		return news[ls.Rooms[end]]
	}
	return len(news) > end
}

// hasNews reports whether a room entry carries new activity: a bump stamp beyond the one
// known (a room never seen counts), else live timeline events. A server that sends a room
// again without activity (as it enters a window) then starts no probe.
func hasNews(old *RoomState, rr *RoomResponse) bool {
	switch {
	case rr.BumpStamp.HasValue():
		return old == nil || rr.BumpStamp.Val > old.BumpStamp
	case rr.NumLive.HasValue():
		return rr.NumLive.Val > 0
	default:
		return len(rr.Timeline) > 0 && !rr.Initial
	}
}

func (c *Conn) stalled() bool {
	for _, ext := range c.exts {
		if s, ok := ext.(Staller); ok && s.Stalled() {
			return true
		}
	}
	return false
}

func (c *Conn) restoreExtensions(ctx context.Context) error {
	c.stateMu.RLock()
	checkpts := c.checkpts
	c.stateMu.RUnlock()
	var errs []error
	for _, ext := range c.exts {
		if ck, ok := ext.(Checkpointer); ok {
			if err := ck.Restore(ctx, checkpts[ext.Name()]); err != nil {
				errs = append(errs, fmt.Errorf("restore extension %s: %w", ext.Name(), err))
			}
		}
	}
	return errors.Join(errs...)
}
