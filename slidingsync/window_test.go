package slidingsync

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
)

func TestHasNews(t *testing.T) {
	old := &RoomState{ID: "!a:x", BumpStamp: 10}
	msg := []*event.Event{{ID: "$e", Type: event.EventMessage}}
	for _, tc := range []struct {
		name string
		old  *RoomState
		rr   *RoomResponse
		want bool
	}{
		{"bump stamp beyond the known one", old, &RoomResponse{BumpStamp: Some[int64](11)}, true},
		{"same bump stamp (state change, or sent again)", old, &RoomResponse{BumpStamp: Some[int64](10), Name: Some("n")}, false},
		{"bump stamp of a room never seen", nil, &RoomResponse{BumpStamp: Some[int64](1)}, true},
		{"no bump stamp, live events", old, &RoomResponse{NumLive: Some(2), Timeline: msg}, true},
		{"no bump stamp, no live events", old, &RoomResponse{NumLive: Some(0), Timeline: msg}, false},
		{"neither, timeline update", old, &RoomResponse{Timeline: msg}, true},
		{"neither, initial entry", old, &RoomResponse{Initial: true, Timeline: msg}, false},
		{"neither, no timeline", old, &RoomResponse{Name: Some("n")}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			assert.Equal(t, tc.want, hasNews(tc.old, tc.rr))
		})
	}
}

func TestOverflowed(t *testing.T) {
	window := ListState{Count: 100, Rooms: []id.RoomID{"!a:x", "!b:x", "!c:x"}}
	for _, tc := range []struct {
		name string
		ls   ListState
		news map[id.RoomID]bool
		want bool
	}{
		{"last room of the window has news", window, map[id.RoomID]bool{"!c:x": true}, true},
		{"news above the last room only", window, map[id.RoomID]bool{"!a:x": true, "!b:x": true}, false},
		{"no news", window, nil, false},
		{"no room IDs (v4), as many rooms with news as the window", ListState{Count: 100}, map[id.RoomID]bool{"!a:x": true, "!b:x": true, "!c:x": true}, true},
		{"no room IDs (v4), fewer rooms with news", ListState{Count: 100}, map[id.RoomID]bool{"!a:x": true, "!b:x": true}, false},
		{"hole at the window's end", ListState{Count: 100, Rooms: []id.RoomID{"!a:x", "!b:x", ""}}, map[id.RoomID]bool{"!a:x": true, "!b:x": true, "!q:x": true}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			assert.Equal(t, tc.want, overflowed(tc.ls, tc.news, 2))
		})
	}
}

// TestScanCoversEveryPosition drives a Scan window over static lists of many sizes: the ranges
// asked for cover every position, the scan ends shrunk to the head after about count/batch
// steps, and no range leaves the list.
func TestScanCoversEveryPosition(t *testing.T) {
	for _, proto := range []Protocol{ProtocolMSC4186, ProtocolV4} {
		for _, count := range []int{1, 5, 6, 19, 20, 21, 99, 100, 101, 1000, 1234} {
			w := Scan(20, 5)
			c := &Conn{lists: map[string]List{"all": {Window: w}}}
			covered := make([]bool, count)
			steps := 0
			for more := true; more; steps++ {
				if steps > count+10 {
					t.Fatalf("%s, %d rooms: no end after %d steps", proto, count, steps)
				}
				for _, r := range w.ranges(c.growth["all"]) {
					for i := r.Start; i <= min(r.End, count-1); i++ {
						covered[i] = true
					}
				}
				more = c.growWindows(proto, map[string]ListState{"all": {Count: count}}, nil)
			}
			for i, ok := range covered {
				if !ok {
					t.Fatalf("%s, %d rooms: position %d never asked for", proto, count, i)
				}
			}
			g := c.growth["all"]
			if count > 5 {
				assert.True(t, g.shrunk, "%s, %d rooms: shrunk", proto, count)
				assert.Equal(t, []Range{{0, 4}}, w.ranges(g), "%s, %d rooms", proto, count)
			}
			// The first window, then one step per batch (the scan reaches back a little).
			assert.LessOrEqual(t, steps, 2+count/19, "%s, %d rooms: steps", proto, count)
		}
	}
}

// TestWindowSteps holds each policy to the windows it asks for, step by step, over a static
// list of 50 rooms with no news: Grow grows and stays over every room; Scan keeps its head and
// moves a range down the list, then keeps the head alone; on v4, which takes one range, and
// with a head not below the batch, Scan grows before it keeps the head.
func TestWindowSteps(t *testing.T) {
	for _, tc := range []struct {
		name  string
		w     Window
		proto Protocol
		want  [][]Range
	}{
		{"grow", Grow(20), ProtocolMSC4186, [][]Range{
			{{0, 19}}, {{0, 39}}, {{0, 49}}, {{0, 49}},
		}},
		{"scan", Scan(20, 5), ProtocolMSC4186, [][]Range{
			{{0, 19}}, {{0, 4}, {19, 39}}, {{0, 4}, {39, 49}}, {{0, 4}},
		}},
		{"scan on v4 grows", Scan(20, 5), ProtocolV4, [][]Range{
			{{0, 19}}, {{0, 39}}, {{0, 49}}, {{0, 4}},
		}},
		{"scan with a head not below the batch grows", Scan(20, 30), ProtocolMSC3575, [][]Range{
			{{0, 19}}, {{0, 39}}, {{0, 49}}, {{0, 29}},
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ls := ListState{Count: 50}
			var g *growth
			var got [][]Range
			for range tc.want {
				got = append(got, tc.w.ranges(g))
				if g == nil {
					g = &growth{head: tc.w.batch - 1}
				}
				tc.w.advance(g, tc.proto, ls, nil)
			}
			assert.Equal(t, tc.want, got)
		})
	}
}

// TestWindowCheck refuses windows that cannot move; the zero Window is fixed and valid.
func TestWindowCheck(t *testing.T) {
	assert.NoError(t, Window{}.check())
	assert.False(t, Window{}.managed())
	assert.NoError(t, Grow(1).check())
	assert.NoError(t, Scan(500, 5).check())
	assert.Error(t, Grow(0).check())
	assert.Error(t, Scan(0, 5).check())
	assert.Error(t, Scan(500, 0).check())
}
