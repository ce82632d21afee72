package bot

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
	"maunium.net/go/mautrix/sqlstatestore"
)

// stateStore is mautrix's SQL state store with an IsEncrypted that never guesses: a room
// whose encryption the synced state does not show yet (a room just joined, whose state the
// next response brings) is asked of the server, so that a send never goes out in clear to a
// room that is encrypted.
type stateStore struct {
	*sqlstatestore.SQLStateStore
	cli *mautrix.Client

	mu    sync.Mutex
	plain map[id.RoomID]bool // rooms the server said are not encrypted
}

func (s *stateStore) IsEncrypted(ctx context.Context, roomID id.RoomID) (bool, error) {
	if enc, err := s.SQLStateStore.IsEncrypted(ctx, roomID); enc || err != nil {
		return enc, err
	}
	s.mu.Lock()
	plain := s.plain[roomID]
	s.mu.Unlock()
	if plain {
		return false, nil
	}
	var content event.EncryptionEventContent
	err := s.cli.StateEvent(ctx, roomID, event.StateEncryption, "", &content)
	switch {
	case errors.Is(err, mautrix.MNotFound):
		s.mu.Lock()
		s.plain[roomID] = true
		s.mu.Unlock()
		return false, nil
	case err != nil:
		return false, fmt.Errorf("bot: ask the server whether %s is encrypted: %w", roomID, err)
	}
	if err := s.SetEncryptionEvent(ctx, roomID, &content); err != nil {
		return false, err
	}
	return content.Algorithm != "", nil
}
