package slidingsync

import (
	"context"
	"encoding/json"
	"maps"
	"sync"

	"maunium.net/go/mautrix/id"
)

// ConnKey identifies a connection's persisted state: one account (user and device) and one
// conn_id.
type ConnKey struct {
	UserID   id.UserID   // the account
	DeviceID id.DeviceID // the account's device
	ConnID   string      // the connection; empty is the default one
}

// Checkpoint is everything a connection persisted: the pos of the last processed response and
// the state that goes with it.
type Checkpoint struct {
	Pos        string                     // pos of the last processed response; empty if none
	Origin     string                     // the endpoint that issued Pos (see Update.Origin); empty if unknown
	Lists      map[string]ListState       // every list's state
	Rooms      map[id.RoomID]*RoomState   // every room's merged state
	Extensions map[string]json.RawMessage // every checkpointing extension's checkpoint, by name
}

// Update is what one processed response changed. A Store applies it atomically: after a crash,
// a Load returns either the state before the update or after it, never a mix.
type Update struct {
	// Pos is the new position.
	Pos string
	// Origin, when not empty, replaces the stored origin: the dialect and server that issued
	// Pos, so that a later Run against another endpoint knows the pos is not valid there.
	// Empty keeps the stored one (the Conn sets it on the first commit of a connection).
	Origin string
	// Lists holds every list the response changed, in full; a list it left as it was is not
	// written again.
	Lists map[string]ListState
	// Rooms holds every room the response touched, merged, in full.
	Rooms map[id.RoomID]*RoomState
	// Extensions holds the checkpoint of every checkpointing extension whose checkpoint
	// changed; a store keeps the last one written for the others.
	Extensions map[string]json.RawMessage
	// TxnHooks run inside the commit's transaction, before it commits; a SQL store passes
	// them the transaction's context so that writes to other tables of the same database
	// (mautrix's crypto store, say) commit or roll back with the update. An error from a hook
	// aborts the commit. An update with nothing but Pos may be written without a
	// transaction (one statement).
	TxnHooks []func(ctx context.Context) error
}

// Store persists connection state. Implementations must make Commit atomic and must not keep
// references to maps of the Update that they do not own (RoomState values are immutable and may
// be kept).
type Store interface {
	// Load returns the stored checkpoint, or an empty one (never nil) if none exists.
	Load(ctx context.Context, key ConnKey) (*Checkpoint, error)
	// Commit applies an update in one transaction.
	Commit(ctx context.Context, key ConnKey, upd *Update) error
}

// RoomLoader is a Store that reads rooms one by one. A Conn with Config.RoomCache set needs it:
// it loads the checkpoint without its rooms and reads a room only when a response touches it
// and it is not in memory. A Conn calls these between its own commits, so the reads need not
// share a transaction. MemoryStore and sqlstore.Store implement it.
type RoomLoader interface {
	Store
	// LoadHead is Load without the rooms: the returned checkpoint's Rooms is nil.
	LoadHead(ctx context.Context, key ConnKey) (*Checkpoint, error)
	// LoadRooms returns the stored state of those of roomIDs that are stored; the others are
	// absent from the map. It returns an empty map (never nil) for no room IDs.
	LoadRooms(ctx context.Context, key ConnKey, roomIDs []id.RoomID) (map[id.RoomID]*RoomState, error)
}

// MemoryStore is a Store that keeps everything in memory. It is safe for concurrent use.
// Its zero value is not usable; call NewMemoryStore.
type MemoryStore struct {
	mu    sync.Mutex
	conns map[ConnKey]*Checkpoint
}

var _ RoomLoader = (*MemoryStore)(nil)

// NewMemoryStore returns an empty MemoryStore.
func NewMemoryStore() *MemoryStore {
	return &MemoryStore{conns: make(map[ConnKey]*Checkpoint)}
}

// Load implements Store. The returned maps are copies.
func (s *MemoryStore) Load(_ context.Context, key ConnKey) (*Checkpoint, error) {
	return s.load(key, true), nil
}

// LoadHead implements RoomLoader. The returned maps are copies.
func (s *MemoryStore) LoadHead(_ context.Context, key ConnKey) (*Checkpoint, error) {
	return s.load(key, false), nil
}

func (s *MemoryStore) load(key ConnKey, withRooms bool) *Checkpoint {
	s.mu.Lock()
	defer s.mu.Unlock()
	cp := s.conns[key]
	if cp == nil {
		return &Checkpoint{}
	}
	out := &Checkpoint{Pos: cp.Pos, Origin: cp.Origin, Lists: maps.Clone(cp.Lists), Extensions: maps.Clone(cp.Extensions)}
	if withRooms {
		out.Rooms = maps.Clone(cp.Rooms)
	}
	return out
}

// LoadRooms implements RoomLoader.
func (s *MemoryStore) LoadRooms(_ context.Context, key ConnKey, roomIDs []id.RoomID) (map[id.RoomID]*RoomState, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make(map[id.RoomID]*RoomState, len(roomIDs))
	if cp := s.conns[key]; cp != nil {
		for _, roomID := range roomIDs {
			if rs, ok := cp.Rooms[roomID]; ok {
				out[roomID] = rs
			}
		}
	}
	return out, nil
}

// Commit implements Store.
func (s *MemoryStore) Commit(ctx context.Context, key ConnKey, upd *Update) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, hook := range upd.TxnHooks {
		if err := hook(ctx); err != nil {
			return err
		}
	}
	cp := s.conns[key]
	if cp == nil {
		cp = &Checkpoint{
			Lists:      make(map[string]ListState),
			Rooms:      make(map[id.RoomID]*RoomState),
			Extensions: make(map[string]json.RawMessage),
		}
		s.conns[key] = cp
	}
	cp.Pos = upd.Pos
	if upd.Origin != "" {
		cp.Origin = upd.Origin
	}
	maps.Copy(cp.Lists, upd.Lists)
	maps.Copy(cp.Rooms, upd.Rooms)
	for name, raw := range upd.Extensions {
		cp.Extensions[name] = append(json.RawMessage(nil), raw...)
	}
	return nil
}
