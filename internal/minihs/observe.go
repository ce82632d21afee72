package minihs

import (
	"time"

	"maunium.net/go/mautrix/id"
)

// Kind says what an [Event] reports.
type Kind string

// Kinds of [Event].
const (
	KindSyncRequest  Kind = "sync_request"  // a sync request arrived (Token: its pos or since)
	KindSyncResponse Kind = "sync_response" // a sync response was written (Token: the new one)
	KindKeysUpload   Kind = "keys_upload"
	KindKeysQuery    Kind = "keys_query" // Users: who was queried
	KindKeysClaim    Kind = "keys_claim"
	KindSendToDevice Kind = "send_to_device"
	KindRoomSend     Kind = "room_send" // RoomID, EventType
	KindJoin         Kind = "join"
	KindOther        Kind = "other" // an endpoint the server does not serve (Path, Status)
)

// Event reports one request to Options.Observer.
type Event struct {
	Kind Kind
	At   time.Time
	// BytesIn and BytesOut are the server's totals on the wire (headers included) when the
	// event happened.
	BytesIn, BytesOut int64
	// Token is the pos or since a sync request carried, or the one a response returned.
	Token string
	// Timeout is a sync request's long-poll timeout in milliseconds (-1 when absent).
	Timeout int64
	// Idle is set on a sync response that carried nothing new: on sliding sync, one that
	// repeats the request's pos.
	Idle bool
	// AllKnown is set on a sync response after which the client knows every room: v2 always,
	// sliding sync once every room of the bot's list was sent on the connection.
	AllKnown bool
	// Rooms is how many room entries a sync response carried; BodyBytes its body size.
	Rooms, BodyBytes int
	// Users: device_lists.changed of a sync response, the users of a key query, or the
	// recipients of a sendToDevice.
	Users []id.UserID
	// DeviceKeys, OTKs and Fallback describe a key upload.
	DeviceKeys bool
	OTKs       int
	Fallback   bool
	RoomID     id.RoomID // room send and join
	EventType  string    // room send and sendToDevice
	Path       string    // KindOther
	Status     int       // KindOther: the status answered
}

// observe reports ev to the observer, if any, with the byte counters now. The caller must not
// hold s.mu.
func (s *Server) observe(ev Event) {
	if s.opts.Observer == nil {
		return
	}
	if ev.At.IsZero() {
		ev.At = time.Now()
	}
	ev.BytesIn, ev.BytesOut = s.Bytes()
	s.opts.Observer(ev)
}

// observePtr reports ev unless it is nil (a request that was refused).
func (s *Server) observePtr(ev *Event) {
	if ev != nil {
		s.observe(*ev)
	}
}
