package slidingsync

import (
	"fmt"
	"unicode/utf8"
)

// What Synapse, the server of the MSC4186 dialect, refuses with 400 M_BAD_JSON.
const (
	msc4186MaxLists         = 100
	msc4186MaxListName      = 64 // characters
	msc4186MaxTimelineLimit = 1000
)

// checkServable refuses a configuration that no server of dialect p can serve, so that New,
// Run (once discovery has chosen the dialect) and SetList report it instead of the first
// request failing (400) or failing on every retry (500).
func checkServable(p Protocol, req *Request) error {
	if p != ProtocolMSC4186 {
		return nil
	}
	if len(req.Lists) > msc4186MaxLists {
		return fmt.Errorf("slidingsync: %d lists, but %s servers (Synapse) take at most %d", len(req.Lists), p, msc4186MaxLists)
	}
	for name, lc := range req.Lists {
		if utf8.RuneCountInString(name) > msc4186MaxListName {
			return fmt.Errorf("slidingsync: list name %q is longer than the %d characters %s servers (Synapse) take", name, msc4186MaxListName, p)
		}
		if lc.TimelineLimit > msc4186MaxTimelineLimit {
			return fmt.Errorf("slidingsync: list %q: TimelineLimit %d is more than the %d %s servers (Synapse) take", name, lc.TimelineLimit, msc4186MaxTimelineLimit, p)
		}
		if f := lc.Filters; f != nil && len(f.Spaces) > 0 {
			return fmt.Errorf("slidingsync: list %q: Filters.Spaces is not served by %s (Synapse answers every such request with HTTP 500)", name, p)
		}
		if f := lc.Filters; f != nil && f.RoomNameLike != "" {
			return fmt.Errorf("slidingsync: list %q: Filters.RoomNameLike is not served by %s (Synapse answers every such request with HTTP 500)", name, p)
		}
	}
	for roomID, sub := range req.RoomSubscriptions {
		if sub.TimelineLimit > msc4186MaxTimelineLimit {
			return fmt.Errorf("slidingsync: subscription %s: TimelineLimit %d is more than the %d %s servers (Synapse) take", roomID, sub.TimelineLimit, msc4186MaxTimelineLimit, p)
		}
	}
	return nil
}

// everyRoom is the range asked for a list without ranges on the dialects that take ranges:
// Synapse sends no room at all for a list without one.
var everyRoom = []Range{{Start: 0, End: maxWindowIndex - 1}}
