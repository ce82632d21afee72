package minihs

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strconv"
	"time"

	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
)

// v2TimelineLimit is how many timeline events a v2 answer carries per room.
const v2TimelineLimit = 20

type v2Response struct {
	NextBatch        string            `json:"next_batch"`
	Rooms            *v2Rooms          `json:"rooms,omitempty"`
	ToDevice         *v2Events         `json:"to_device,omitempty"`
	DeviceLists      map[string]any    `json:"device_lists,omitempty"`
	OTKCount         map[string]int    `json:"device_one_time_keys_count"`
	FallbackUnstable []id.KeyAlgorithm `json:"org.matrix.msc2732.device_unused_fallback_key_types"`
	Fallback         []id.KeyAlgorithm `json:"device_unused_fallback_key_types"`
}

type v2Rooms struct {
	Join map[id.RoomID]*v2Room `json:"join"`
}

type v2Events struct {
	Events []json.RawMessage `json:"events"`
}

type v2Room struct {
	Summary map[string]any `json:"summary"`
	State   struct {
		Events []json.RawMessage `json:"events"`
	} `json:"state"`
	Timeline struct {
		Events    []json.RawMessage `json:"events"`
		Limited   bool              `json:"limited"`
		PrevBatch string            `json:"prev_batch"`
	} `json:"timeline"`
	UnreadNotifications map[string]int `json:"unread_notifications"`
}

// serveV2 answers the classic /sync: "s<stream>_<to-device>" tokens, every joined room on an
// initial sync, the rooms with new events afterwards, and the e2ee fields Synapse always
// sends. A request with since and nothing new is held up to its timeout (at most
// Options.IdleHold).
func (s *Server) serveV2(w http.ResponseWriter, r *http.Request, _ devRef) {
	q := r.URL.Query()
	since := q.Get("since")
	timeout := int64(-1)
	if q.Has("timeout") {
		t, err := strconv.ParseInt(q.Get("timeout"), 10, 64)
		if err != nil {
			writeError(w, http.StatusBadRequest, "M_INVALID_PARAM", "Invalid timeout.")
			return
		}
		timeout = t
	}
	s.observe(Event{Kind: KindSyncRequest, Token: since, Timeout: timeout})
	hold := time.NewTimer(min(time.Duration(max(timeout, 0))*time.Millisecond, s.opts.IdleHold))
	defer hold.Stop()
	for {
		s.mu.Lock()
		resp, idle, err := s.v2Locked(since)
		wake := s.changed
		s.mu.Unlock()
		if err != nil {
			writeError(w, http.StatusBadRequest, "M_UNKNOWN", "Invalid stream token")
			return
		}
		wait := idle && timeout > 0
		if wait {
			select {
			case <-wake:
				continue
			case <-hold.C:
			case <-r.Context().Done():
				return
			}
		}
		n := writeJSON(w, http.StatusOK, resp)
		if f, ok := w.(http.Flusher); ok {
			f.Flush()
		}
		rooms := 0
		if resp.Rooms != nil {
			rooms = len(resp.Rooms.Join)
		}
		changed, _ := resp.DeviceLists["changed"].([]id.UserID)
		s.observe(Event{Kind: KindSyncResponse, Token: resp.NextBatch, Idle: idle, AllKnown: true, Rooms: rooms, BodyBytes: n, Users: changed})
		return
	}
}

// v2Locked computes the answer to a v2 sync from since, and whether it is idle. Caller holds
// s.mu.
func (s *Server) v2Locked(since string) (*v2Response, bool, error) {
	var stream, ack int64
	if since != "" {
		if _, err := fmt.Sscanf(since, "s%d_%d", &stream, &ack); err != nil || stream < 0 || stream > s.stream {
			return nil, false, fmt.Errorf("invalid token %q", since)
		}
	}
	events, next := s.botToDeviceLocked(ack, maxToDeviceLimit)
	d := s.devices[BotUserID][BotDeviceID]
	resp := &v2Response{
		NextBatch:        fmt.Sprintf("s%d_%d", s.stream, next),
		OTKCount:         map[string]int{string(id.KeyAlgorithmSignedCurve25519): len(d.otks)},
		FallbackUnstable: d.unusedFallbackTypes(),
		Fallback:         d.unusedFallbackTypes(),
	}
	join := map[id.RoomID]*v2Room{}
	for _, roomID := range s.list {
		rm := s.rooms[roomID]
		if rm.membership(BotUserID) == event.MembershipJoin && (since == "" || rm.changed > stream) {
			join[roomID] = s.v2RoomLocked(rm, since == "", stream)
		}
	}
	if len(join) > 0 {
		resp.Rooms = &v2Rooms{Join: join}
	}
	if len(events) > 0 {
		resp.ToDevice = &v2Events{Events: events}
	}
	var changed []id.UserID
	if since != "" {
		if changed = s.changedSinceLocked(stream); len(changed) > 0 {
			resp.DeviceLists = map[string]any{"changed": changed, "left": []id.UserID{}}
		}
	}
	return resp, since != "" && len(join) == 0 && len(events) == 0 && len(changed) == 0, nil
}

// v2RoomLocked returns a joined room's v2 entry: in full on an initial sync (state before
// the timeline's last events), else the events after since. Caller holds s.mu.
func (s *Server) v2RoomLocked(rm *room, initial bool, since int64) *v2Room {
	out := &v2Room{Summary: map[string]any{}, UnreadNotifications: map[string]int{"notification_count": 0, "highlight_count": 0}}
	out.State.Events, out.Timeline.Events = []json.RawMessage{}, []json.RawMessage{}
	first := len(rm.timeline)
	for first > 0 && (initial || rm.timeline[first-1].stream > since) {
		first--
	}
	first = max(first, len(rm.timeline)-v2TimelineLimit)
	inTimeline := map[id.EventID]bool{}
	for _, e := range rm.timeline[first:] {
		out.Timeline.Events = append(out.Timeline.Events, s.eventJSONLocked(e.evt))
		inTimeline[e.evt.ID] = true
	}
	out.Timeline.Limited = initial || first > 0 && rm.timeline[first-1].stream > since
	out.Timeline.PrevBatch = fmt.Sprintf("s%d", s.stream)
	if !initial {
		return out
	}
	joined, heroes := 0, []id.UserID{}
	for _, key := range rm.order {
		st := rm.state[key]
		if !inTimeline[st.evt.ID] {
			out.State.Events = append(out.State.Events, s.eventJSONLocked(st.evt))
		}
		if key[0] == event.StateMember.Type && rm.membership(id.UserID(key[1])) == event.MembershipJoin {
			joined++
			if u := id.UserID(key[1]); u != BotUserID && len(heroes) < 5 {
				heroes = append(heroes, u)
			}
		}
	}
	out.Summary = map[string]any{"m.heroes": heroes, "m.joined_member_count": joined, "m.invited_member_count": 0}
	return out
}

// eventJSONLocked returns evt as the bot sees it, encoded. Caller holds s.mu.
func (s *Server) eventJSONLocked(evt *event.Event) json.RawMessage {
	if raw, ok := s.acct.encoded[evt.ID]; ok {
		return raw
	}
	return eventJSON(s.viewLocked(evt, bot))
}

// eventJSON encodes an event. A generated one (content kept encoded, nothing unsigned) is
// written directly: mautrix's encoder costs the server seconds on a large initial sync, which
// would count against the bot being measured.
func eventJSON(evt *event.Event) json.RawMessage {
	if evt.Content.Raw != nil || evt.Content.VeryRaw == nil || !evt.Unsigned.IsEmpty() {
		raw, _ := json.Marshal(evt)
		return raw
	}
	b := make([]byte, 0, 160+len(evt.Content.VeryRaw))
	field := func(name string, v any) {
		raw, _ := json.Marshal(v)
		b = append(append(append(b, ',', '"'), name...), '"', ':')
		b = append(b, raw...)
	}
	field("type", evt.Type.Type)
	field("sender", evt.Sender)
	field("event_id", evt.ID)
	field("room_id", evt.RoomID)
	field("origin_server_ts", evt.Timestamp)
	if evt.StateKey != nil {
		field("state_key", *evt.StateKey)
	}
	b = append(append(b, `,"content":`...), evt.Content.VeryRaw...)
	b[0] = '{'
	return append(b, '}')
}
