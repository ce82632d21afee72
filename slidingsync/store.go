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
	Lists      map[string]ListState       // every list's state
	Rooms      map[id.RoomID]*RoomState   // every room's merged state
	Extensions map[string]json.RawMessage // every checkpointing extension's checkpoint, by name
}

// Update is what one processed response changed. A Store applies it atomically: after a crash,
// a Load returns either the state before the update or after it, never a mix.
type Update struct {
	// Pos is the new position.
	Pos string
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
	// aborts the commit.
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

// MemoryStore is a Store that keeps everything in memory. It is safe for concurrent use.
// Its zero value is not usable; call NewMemoryStore.
type MemoryStore struct {
	mu    sync.Mutex
	conns map[ConnKey]*Checkpoint
}

var _ Store = (*MemoryStore)(nil)

// NewMemoryStore returns an empty MemoryStore.
func NewMemoryStore() *MemoryStore {
	return &MemoryStore{conns: make(map[ConnKey]*Checkpoint)}
}

// Load implements Store. The returned maps are copies.
func (s *MemoryStore) Load(_ context.Context, key ConnKey) (*Checkpoint, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	cp := s.conns[key]
	if cp == nil {
		return &Checkpoint{}, nil
	}
	return &Checkpoint{
		Pos:        cp.Pos,
		Lists:      maps.Clone(cp.Lists),
		Rooms:      maps.Clone(cp.Rooms),
		Extensions: maps.Clone(cp.Extensions),
	}, nil
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
	maps.Copy(cp.Lists, upd.Lists)
	maps.Copy(cp.Rooms, upd.Rooms)
	for name, raw := range upd.Extensions {
		cp.Extensions[name] = append(json.RawMessage(nil), raw...)
	}
	return nil
}
