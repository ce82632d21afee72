package main

import (
	"fmt"
	"sync"

	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/sliding-e2ee/sdk/slidingsync"
)

// demoWorld is the embedded demo homeserver's account: a fixed set of rooms served through
// slidingsynctest, honouring the window the client asks for.
type demoWorld struct {
	mu    sync.Mutex
	rooms []id.RoomID
	sent  map[id.RoomID]bool
}

func newDemoWorld(n int) *demoWorld {
	w := &demoWorld{sent: make(map[id.RoomID]bool, n)}
	for i := range n {
		w.rooms = append(w.rooms, id.RoomID(fmt.Sprintf("!room%05d:demo.invalid", i)))
	}
	return w
}

func stateEvent(evtType, stateKey string, content map[string]any) *event.Event {
	return &event.Event{
		Type:     event.Type{Type: evtType, Class: event.StateEventType},
		StateKey: &stateKey,
		Sender:   "@demo-admin:demo.invalid",
		Content:  event.Content{Raw: content},
	}
}

// respond answers a request with every room of the window not yet sent on this connection,
// or nil (long-poll) when there is nothing new. Called by the server with its lock held.
func (w *demoWorld) respond(req *slidingsync.Request) *slidingsync.Response {
	w.mu.Lock()
	defer w.mu.Unlock()
	if req.Pos == "" {
		clear(w.sent) // a new connection knows nothing
	}
	lc, ok := req.Lists["all"]
	if !ok || len(lc.Ranges) == 0 {
		return nil
	}
	r := lc.Ranges[0]
	end := min(r.End, len(w.rooms)-1)
	resp := &slidingsync.Response{Rooms: map[id.RoomID]*slidingsync.RoomResponse{}}
	for i := r.Start; i <= end; i++ {
		roomID := w.rooms[i]
		if w.sent[roomID] {
			continue
		}
		w.sent[roomID] = true
		rr := &slidingsync.RoomResponse{
			Initial:     true,
			Name:        slidingsync.Some(fmt.Sprintf("Demo room %d", i)),
			JoinedCount: slidingsync.Some(3),
			BumpStamp:   slidingsync.Some(int64(len(w.rooms) - i)),
			RequiredState: []*event.Event{
				stateEvent("m.room.create", "", map[string]any{"room_version": "10"}),
				stateEvent("m.room.name", "", map[string]any{"name": fmt.Sprintf("Demo room %d", i)}),
			},
		}
		if i%2 == 0 {
			rr.RequiredState = append(rr.RequiredState, stateEvent("m.room.encryption", "", map[string]any{"algorithm": "m.megolm.v1.aes-sha2"}))
		}
		resp.Rooms[roomID] = rr
	}
	if len(resp.Rooms) == 0 && req.Pos != "" {
		return nil
	}
	ids := append([]id.RoomID(nil), w.rooms[r.Start:end+1]...)
	resp.Lists = map[string]slidingsync.ListResponse{"all": {
		Count: slidingsync.Some(len(w.rooms)),
		Ops:   []slidingsync.ListOp{{Op: slidingsync.ListOpSync, Range: &slidingsync.Range{Start: r.Start, End: r.End}, RoomIDs: ids}},
	}}
	return resp
}

// message returns a response carrying one new text message in a room.
func (w *demoWorld) message(roomIdx int, sender id.UserID, body string) *slidingsync.Response {
	roomID := w.rooms[roomIdx]
	return &slidingsync.Response{Rooms: map[id.RoomID]*slidingsync.RoomResponse{roomID: {
		Timeline: []*event.Event{{
			Type:    event.EventMessage,
			Sender:  sender,
			ID:      id.EventID(fmt.Sprintf("$demo-%d", roomIdx)),
			Content: event.Content{Raw: map[string]any{"msgtype": "m.text", "body": body}},
		}},
		BumpStamp: slidingsync.Some(int64(len(w.rooms) + 1)),
	}}}
}
