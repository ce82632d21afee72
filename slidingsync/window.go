package slidingsync

import (
	"errors"

	"maunium.net/go/mautrix/id"
)

// List is one list of a Conn: what every request asks for (the embedded ListConfig, the wire
// settings) and how the Conn moves the list's window between requests (Window, a client-side
// policy that is never sent).
type List struct {
	ListConfig
	// Window moves the window. The zero Window is fixed: ListConfig.Ranges are sent as they
	// are. With Grow or Scan, the Conn sets the ranges and ListConfig.Ranges is ignored.
	Window Window
}

// Window is a client-side policy for a list's window: fixed ranges (the zero Window), Grow or
// Scan.
type Window struct {
	kind  windowKind
	batch int // rooms added per step
	head  int // rooms kept at the top once every room is known (Scan)
}

type windowKind uint8

const (
	windowFixed windowKind = iota
	windowGrow
	windowScan
)

// Grow returns a window that starts as [0, batch-1] and grows by batch rooms after every
// processed response, without long-polling in between, until it covers every room of the
// list; then it follows the count. Every response repeats the rooms of the window on servers
// that list every room ID of the requested ranges (Synapse), so a growing window costs a
// quadratic number of room IDs: 2.7 MB of them at 10 000 rooms. batch must be positive.
func Grow(batch int) Window { return Window{kind: windowGrow, batch: batch} }

// Scan returns a window that sees every room once and then keeps only the top head rooms of
// the list: every room is then known and stored, and a server that repeats the window's room
// IDs in every response no longer sends thousands of them on every long-poll.
//
// While rooms remain unseen it asks for [0, head-1] plus a range of batch rooms that moves
// down the list (reaching back batch/20 rooms, as rooms with activity push the others down),
// so that a server repeating the window's room IDs sends each about once. A dialect that takes
// one range per list (v4), or a head that is not below batch, grows the window instead (as
// Grow) before keeping the head. With an activity order a room with anything new moves to
// the top of the list and so into the window; when the window's last room has new activity
// (a bump stamp beyond the known one), more rooms than the window holds may have had some:
// the Conn then probes at once, doubling the window (by batch at most) until a window ends
// with a room without news, and shrinks back. State changes that do not bump a room (a name,
// a member) in rooms past the window arrive when the room next moves up. Positions past the
// window are dropped from ListState.Rooms. batch and head must be positive.
func Scan(batch, head int) Window { return Window{kind: windowScan, batch: batch, head: head} }

func (w Window) managed() bool { return w.kind != windowFixed }

// check refuses a window that cannot move.
func (w Window) check() error {
	switch {
	case w.kind != windowFixed && w.batch <= 0:
		return errors.New("window batch must be positive")
	case w.kind == windowScan && w.head <= 0:
		return errors.New("window head must be positive")
	}
	return nil
}

// scans reports whether the window scans with a kept head in dialect p rather than growing.
func (w Window) scans(p Protocol) bool {
	return w.kind == windowScan && w.head < w.batch && p != ProtocolV4
}

// growth is where a managed window is. The first window is [0, batch-1]. While rooms remain
// unseen, a scanning window is the head [0, head-1] plus a range that moves down the list by
// batch rooms; a growing one grows. Once every room has been seen the window is the head alone
// (shrunk, Scan), or stays over every room (Grow). The head probes (doubles) while its last
// room has new activity.
type growth struct {
	head     int   // the window [0, head]
	scan     Range // the scan range, while scanning
	scanning bool
	shrunk   bool // every room has been seen and the window is the head
}

// scanFrom returns the scan range that starts at position next: batch rooms, reaching back
// batch/20 into the previous range so that rooms moving down a little between two requests
// are not skipped, and ending at the list's last position at most.
func (w Window) scanFrom(next, last int) Range {
	return Range{Start: max(next-w.batch/20, 0), End: min(next+w.batch-1, last)}
}

// ranges returns the ranges to request. g may be nil: the first window.
func (w Window) ranges(g *growth) []Range {
	if g == nil {
		return []Range{{Start: 0, End: w.batch - 1}}
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

// advance moves the window after a processed response that left the list as ls, news being
// the rooms with new activity, and reports whether the next window must be requested at once
// (a room not yet seen, or a probe). g must not be nil.
func (w Window) advance(g *growth, p Protocol, ls ListState, news map[id.RoomID]bool) bool {
	last := ls.Count - 1
	switch {
	case g.shrunk || g.scanning:
		more := false
		// Probe past the head until a window ends with a room that has nothing new: the head
		// doubles, by batch at most, so that a small burst costs few IDs.
		if g.head < last && overflowed(ls, news, g.head) {
			g.head = min(2*g.head+1, g.head+w.batch, last)
			more = true
		} else {
			g.head = w.head - 1
		}
		if g.scanning {
			if g.scan.End >= last {
				g.scanning, g.shrunk = false, true
			} else {
				g.scan = w.scanFrom(g.scan.End+1, last)
				more = true
			}
		}
		return more
	case g.head < last:
		if w.scans(p) {
			g.scanning = true
			g.scan = w.scanFrom(g.head+1, last)
			g.head = w.head - 1
		} else {
			g.head = min(g.head+w.batch, last)
		}
		return true
	case w.kind == windowScan && ls.Count > w.head:
		// Every room is known: keep only the top of the list in the window.
		g.head = w.head - 1
		g.shrunk = true
	}
	return false
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

// growWindows moves the windows of managed lists after a processed response and reports
// whether one must be requested at once. Caller holds c.mu.
func (c *Conn) growWindows(p Protocol, lists map[string]ListState, news map[id.RoomID]bool) bool {
	more := false
	for name, ls := range lists {
		l, ok := c.lists[name]
		if !ok || !l.Window.managed() {
			continue
		}
		g := c.growth[name]
		if g == nil {
			g = &growth{head: l.Window.batch - 1}
			if c.growth == nil {
				c.growth = make(map[string]*growth)
			}
			c.growth[name] = g
		}
		if l.Window.advance(g, p, ls, news) {
			more = true
		}
	}
	return more
}
