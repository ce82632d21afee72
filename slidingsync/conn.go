package slidingsync

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sync"
	"sync/atomic"

	"github.com/rs/zerolog"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/id"
)

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
	lists    map[string]List
	subs     map[id.RoomID]RoomSubscription
	unsubs   []id.RoomID
	dellists []string // lists removed since the last processed response (MSC3575 keeps lists)
	gen      uint64
	growth   map[string]*growth // where each managed window is (List.Window)
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
	cfg = cfg.withDefaults()
	if err := cfg.check(); err != nil {
		return nil, err
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
	if c.lists == nil {
		c.lists = make(map[string]List)
	}
	if c.subs == nil {
		c.subs = make(map[id.RoomID]RoomSubscription)
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
// never processed. A list with a managed Window starts again from its first window. A list the
// connection's dialect cannot serve (once it is known: Config.Protocol or discovery) is
// refused with an error and changes nothing.
func (c *Conn) SetList(name string, l List) error {
	return c.changeConfig(func() error {
		if err := l.Window.check(); err != nil {
			return fmt.Errorf("slidingsync: list %q: %w", name, err)
		}
		lists := maps.Clone(c.lists)
		lists[name] = l
		if err := c.checkDialect(lists, c.subs); err != nil {
			return err
		}
		c.lists[name] = l
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
		if err := c.checkDialect(c.lists, subs); err != nil {
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
func (c *Conn) checkDialect(lists map[string]List, subs map[id.RoomID]RoomSubscription) error {
	p := cmp.Or(c.endpoint.Protocol, c.cfg.Protocol)
	if p == ProtocolAuto {
		return nil
	}
	_, _, err := EncodeRequest(p, &Request{Lists: wireLists(lists, nil), RoomSubscriptions: subs})
	return err
}

// wireLists returns what the lists ask for, with the ranges of managed windows where growth
// says they are (the first window for a list growth does not know).
func wireLists(lists map[string]List, growth map[string]*growth) map[string]ListConfig {
	if len(lists) == 0 {
		return nil
	}
	out := make(map[string]ListConfig, len(lists))
	for name, l := range lists {
		lc := l.ListConfig
		if l.Window.managed() {
			lc.Ranges = l.Window.ranges(growth[name])
		}
		out[name] = lc
	}
	return out
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
		rs = compactRoom(rs)
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
	req := &Request{ConnID: c.cfg.ConnID, Pos: pos, Lists: wireLists(c.lists, c.growth)}
	if len(c.subs) > 0 {
		req.RoomSubscriptions = maps.Clone(c.subs)
	}
	req.UnsubscribeRooms = slices.Clone(c.unsubs)
	req.DeletedLists = slices.Clone(c.dellists)
	return req
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
	c.pos, c.origin = cp.Pos, cp.Origin
	c.rooms = cp.Rooms
	if c.cfg.CompactState {
		for roomID, rs := range c.rooms {
			c.rooms[roomID] = compactRoom(rs)
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
