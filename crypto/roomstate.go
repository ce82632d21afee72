package crypto

import (
	"context"

	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/sliding-e2ee/sdk/slidingsync"
)

// RequiredState returns the required state a bot needs for encryption, and no more (every
// request repeats it, and every room's entry carries it): m.room.encryption (whether and how a
// room is encrypted) and m.room.history_visibility (which devices receive keys); the room's
// name comes in the entry's own name field. With allMembers, every m.room.member event is asked
// for, which a bot that sends encrypted messages needs: mautrix shares the room key with the
// members its state store knows. Without it, only the members that sent timeline events are
// sent ($LAZY), which is enough to decrypt but not to encrypt for everyone.
func RequiredState(allMembers bool) slidingsync.RequiredState {
	rs := slidingsync.RequiredState{Include: []slidingsync.StateFilter{
		{Type: event.StateEncryption.Type, StateKey: ""},
		{Type: event.StateHistoryVisibility.Type, StateKey: ""},
	}}
	if allMembers {
		rs.Include = append(rs.Include, slidingsync.StateFilter{Type: event.StateMember.Type, StateKey: "*"})
	} else {
		rs.LazyMembers = true
	}
	return rs
}

// updateStateStore feeds the state events of every room of a response into mautrix's state
// store (with mautrix.UpdateStateStore: encryption, members, history visibility, power levels,
// create, join rules), so that the OlmMachine knows which rooms are encrypted and whom to
// share keys with. State events of the timeline are applied first and required_state after
// them, as required_state is the room's current state. Stubs without content (state deleted,
// in the merged MSC) are skipped. The events of res are not modified. mautrix's state store
// reports no errors from these updates; they are logged to the zerolog logger of ctx.
func updateStateStore(ctx context.Context, store mautrix.StateStore, res *slidingsync.Result) {
	if store == nil || res == nil || res.Response == nil {
		return
	}
	for roomID, room := range res.Response.Rooms {
		if room == nil {
			continue
		}
		for _, evt := range room.Timeline {
			if evt != nil && evt.StateKey != nil {
				updateState(ctx, store, roomID, evt)
			}
		}
		for _, evt := range room.RequiredState {
			if evt != nil && evt.StateKey != nil && !slidingsync.IsStateStub(evt) {
				updateState(ctx, store, roomID, evt)
			}
		}
	}
}

func updateState(ctx context.Context, store mautrix.StateStore, roomID id.RoomID, evt *event.Event) {
	cp := *evt
	if cp.RoomID == "" {
		cp.RoomID = roomID
	}
	cp.Type.Class = event.StateEventType
	if cp.Content.Parsed == nil {
		// A failure leaves Parsed nil, which mautrix logs for the types it knows.
		_ = cp.Content.ParseRaw(cp.Type)
	}
	mautrix.UpdateStateStore(ctx, store, &cp)
}
