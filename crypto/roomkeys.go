package crypto

import (
	"context"
	"errors"
	"time"

	mcrypto "maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/id"
)

// RoomKeyCommitted returns a channel that is closed once a room key (m.room_key or
// m.forwarded_room_key) that [Machine.HandleToDevice] received after this call is committed to
// the crypto store. Unlike mautrix's session-received signal, which fires inside the
// transaction that stores the key (and for the first, rolled-back decryption of every Olm
// message), a reader woken by this channel finds the key. Call it again for the next key.
func (m *Machine) RoomKeyCommitted() <-chan struct{} {
	m.keyMu.Lock()
	defer m.keyMu.Unlock()
	return m.keyNext
}

func (m *Machine) roomKeyCommitted() {
	m.keyMu.Lock()
	close(m.keyNext)
	m.keyNext = make(chan struct{})
	m.keyMu.Unlock()
}

// hasRoomKey reports whether the crypto store holds the inbound megolm session sessionID of
// roomID (a withheld session counts as absent).
func (m *Machine) hasRoomKey(ctx context.Context, roomID id.RoomID, sessionID id.SessionID) (bool, error) {
	igs, err := m.store.GetGroupSession(ctx, roomID, sessionID)
	if errors.Is(err, mcrypto.ErrGroupSessionWithheld) {
		return false, nil
	} else if err != nil {
		return false, err
	}
	return igs != nil, nil
}

// WaitForRoomKey waits until the crypto store holds the inbound megolm session sessionID of
// roomID, for at most timeout, and reports whether it does. It looks again only when a room
// key has been committed ([Machine.RoomKeyCommitted]), so it neither polls nor wakes before
// the key can be read.
func (m *Machine) WaitForRoomKey(ctx context.Context, roomID id.RoomID, sessionID id.SessionID, timeout time.Duration) bool {
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	for {
		next := m.RoomKeyCommitted()
		if ok, err := m.hasRoomKey(ctx, roomID, sessionID); ok || err != nil {
			return ok
		}
		select {
		case <-next:
		case <-timer.C:
			return false
		case <-ctx.Done():
			return false
		}
	}
}
