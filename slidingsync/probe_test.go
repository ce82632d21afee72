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
