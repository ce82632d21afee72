package crypto

import (
	"context"
	"errors"
	"fmt"
	"slices"

	"github.com/rs/zerolog"
	"maunium.net/go/mautrix"
	mcrypto "maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/sliding-e2ee/sdk/slidingsync"
)

// HandleRooms feeds the room data of a committed or about-to-commit response into the
// crypto layer. It applies the state events to the OlmMachine's state store (timeline state
// events first, then required_state, which is current; stubs without content are skipped),
// and, for
// state events of the timeline (changes that happened, not snapshots), lets the OlmMachine
// react as mautrix's own sync loop would: a membership change or a history visibility change
// in an encrypted room discards the room's outbound megolm session, so that the next message
// goes out under a new session shared with the current members. A limited timeline may hide
// membership changes, so the room's member list is fetched again before the next
// encryption. Call it from the Step.Commit of slidingsync.Config.OnResponse (the writes then
// commit with pos, when the state store lives in the same database), or from OnResponse.
func (m *Machine) HandleRooms(ctx context.Context, res *slidingsync.Result) {
	if res == nil || res.Response == nil {
		return
	}
	if store, ok := m.olm.StateStore.(mautrix.StateStore); ok {
		updateStateStore(ctx, store, res)
	}
	for roomID, room := range res.Response.Rooms {
		if room == nil {
			continue
		}
		if room.Limited {
			m.markMembersStale(roomID)
		}
		for _, evt := range room.Timeline {
			if evt == nil || evt.StateKey == nil {
				continue
			}
			cp := *evt
			cp.RoomID = roomID
			cp.Type.Class = event.StateEventType
			if cp.Content.Parsed == nil {
				_ = cp.Content.ParseRaw(cp.Type)
			}
			switch cp.Type {
			case event.StateMember:
				m.olm.HandleMemberEvent(ctx, &cp)
			case event.StateHistoryVisibility:
				// mautrix dereferences the session even when reading it failed: only call it
				// when there is a session to check.
				if sess, err := m.olm.CryptoStore.GetOutboundGroupSession(ctx, roomID); err == nil && sess != nil {
					m.olm.HandleHistoryVisibility(ctx, &cp)
				}
			}
		}
	}
}

func (m *Machine) markMembersStale(roomID id.RoomID) {
	m.mu.Lock()
	delete(m.membersFresh, roomID)
	m.mu.Unlock()
}

func (m *Machine) membersAreFresh(roomID id.RoomID) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	_, ok := m.membersFresh[roomID]
	return ok
}

// EncryptRoomEvent encrypts content for roomID with megolm, sharing the room key first with
// every device of the room's joined and invited members when the current outbound session
// has not reached them. Before sharing it makes sure of whom to share with:
//
//   - the room's member list is fetched from the homeserver (/members) once per Machine and
//     again after a limited timeline (see [Machine.HandleRooms]), because sliding sync may have
//     sent only some members;
//   - members whose device lists are outdated (a device_lists change, or a gap) are queried
//     first, with the same generation bookkeeping as Run, so a new device of a member
//     receives the key.
//
// Send the result as an m.room.encrypted event.
func (m *Machine) EncryptRoomEvent(ctx context.Context, roomID id.RoomID, evtType event.Type, content any) (*event.EncryptedEventContent, error) {
	members, err := m.roomMembers(ctx, roomID)
	if err != nil {
		return nil, err
	}
	if err := m.refreshMembersDevices(ctx, members); err != nil {
		return nil, fmt.Errorf("crypto: refresh the devices of %s's members: %w", roomID, err)
	}
	// Olm encryption ratchets the sessions HandleToDevice may restore after a failed batch:
	// both run under the account lock.
	m.acctMu.Lock()
	defer m.acctMu.Unlock()
	if err := m.olm.ShareGroupSession(ctx, roomID, members); err != nil {
		return nil, fmt.Errorf("crypto: share the room key of %s: %w", roomID, err)
	}
	enc, err := m.olm.EncryptMegolmEvent(ctx, roomID, evtType, content)
	if errors.Is(err, mcrypto.ErrNoGroupSession) || errors.Is(err, mcrypto.SessionExpired) || errors.Is(err, mcrypto.SessionNotShared) {
		// The session was discarded (a member changed) between sharing and encrypting.
		zerolog.Ctx(ctx).Debug().Err(err).Stringer("room_id", roomID).Msg("Sharing the room key again before encrypting")
		if err = m.olm.ShareGroupSession(ctx, roomID, members); err != nil {
			return nil, fmt.Errorf("crypto: share the room key of %s: %w", roomID, err)
		}
		enc, err = m.olm.EncryptMegolmEvent(ctx, roomID, evtType, content)
	}
	if err != nil {
		return nil, fmt.Errorf("crypto: encrypt for %s: %w", roomID, err)
	}
	return enc, nil
}

// roomMembers returns the joined and invited members of roomID, fetching the member list from
// the homeserver first when it is not known to be complete.
func (m *Machine) roomMembers(ctx context.Context, roomID id.RoomID) ([]id.UserID, error) {
	store, ok := m.olm.StateStore.(mautrix.StateStore)
	if !ok {
		return nil, fmt.Errorf("crypto: the OlmMachine's state store (%T) does not keep members", m.olm.StateStore)
	}
	if !m.membersAreFresh(roomID) {
		resp, err := m.cli.Members(ctx, roomID)
		if err != nil {
			return nil, fmt.Errorf("crypto: fetch the members of %s: %w", roomID, err)
		}
		if m.cli.StateStore != store {
			// Client.Members updated the client's store; the OlmMachine reads this one.
			if err := store.ReplaceCachedMembers(ctx, roomID, resp.Chunk); err != nil {
				return nil, fmt.Errorf("crypto: store the members of %s: %w", roomID, err)
			}
		}
		m.mu.Lock()
		m.membersFresh[roomID] = struct{}{}
		m.mu.Unlock()
	}
	members, err := store.GetRoomJoinedOrInvitedMembers(ctx, roomID)
	if err != nil {
		return nil, fmt.Errorf("crypto: read the members of %s: %w", roomID, err)
	}
	return members, nil
}

// refreshMembersDevices queries the devices of the users among members that are marked
// outdated, or were changed during a query that has not settled yet.
func (m *Machine) refreshMembersDevices(ctx context.Context, members []id.UserID) error {
	owed, gens, err := m.owed(ctx)
	if err != nil {
		return err
	}
	var users []id.UserID
	for _, u := range members {
		if _, ok := owed[u]; ok {
			users = append(users, u)
		}
	}
	// A member whose devices keep changing while they are queried is given three rounds; the
	// background fetcher goes on with them.
	for round := 0; len(users) > 0 && round < 3; round++ {
		again, err := m.queryInChunks(ctx, users, gens)
		if err != nil {
			return err
		}
		if !again {
			break
		}
		// A member changed again while they were queried: query the ones still unsettled.
		if gens, err = m.generations(ctx); err != nil {
			return err
		}
		users = slices.DeleteFunc(users, func(u id.UserID) bool { _, ok := gens[u]; return !ok })
	}
	return nil
}
