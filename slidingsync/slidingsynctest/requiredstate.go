package slidingsynctest

import (
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/sliding-e2ee/sdk/slidingsync"
)

// WantsState reports whether rs selects the current state event (evtType, stateKey) of a
// room for the user me, as Synapse reads required_state. A filter matches when its type is
// "*" or evtType and its state key is "*", stateKey, or "$ME" for me's own state. Exclude
// (the v4 dialect) removes what Include selected. With LazyMembers (or a "$LAZY" state key
// on m.room.member), the membership of every sender in timelineSenders is selected too. A
// responder uses it to fill RoomResponse.RequiredState.
func WantsState(rs slidingsync.RequiredState, me id.UserID, evtType, stateKey string, timelineSenders map[id.UserID]bool) bool {
	member := evtType == event.StateMember.Type && timelineSenders[id.UserID(stateKey)]
	if member && rs.LazyMembers {
		return true
	}
	matches := func(filters []slidingsync.StateFilter) bool {
		for _, f := range filters {
			if f.Type != "*" && f.Type != evtType {
				continue
			}
			switch f.StateKey {
			case "*", stateKey:
				return true
			case "$ME":
				if me != "" && stateKey == me.String() {
					return true
				}
			case "$LAZY":
				if member {
					return true
				}
			}
		}
		return false
	}
	return matches(rs.Include) && !matches(rs.Exclude)
}
