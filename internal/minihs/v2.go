package minihs

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strconv"

	"maunium.net/go/mautrix/id"
)

type v2Response struct {
	NextBatch        string         `json:"next_batch"`
	Rooms            *v2Rooms       `json:"rooms,omitempty"`
	ToDevice         *v2Events      `json:"to_device,omitempty"`
	DeviceLists      *deviceLists   `json:"device_lists,omitempty"`
	OTKCount         map[string]int `json:"device_one_time_keys_count"`
	FallbackUnstable []string       `json:"org.matrix.msc2732.device_unused_fallback_key_types"`
	Fallback         []string       `json:"device_unused_fallback_key_types"`
}

type v2Rooms struct {
	Join map[id.RoomID]*v2RoomOut `json:"join"`
}

type v2Events struct {
	Events []json.RawMessage `json:"events"`
}

type v2Timeline struct {
	Events    []json.RawMessage `json:"events"`
	Limited   bool              `json:"limited"`
	PrevBatch string            `json:"prev_batch"`
}

type v2RoomOut struct {
	Summary             map[string]any `json:"summary"`
	State               v2Events       `json:"state"`
	Timeline            v2Timeline     `json:"timeline"`
	Ephemeral           v2Events       `json:"ephemeral"`
	AccountData         v2Events       `json:"account_data"`
	UnreadNotifications map[string]int `json:"unread_notifications"`
}

// parseV2Token reads "s<stream>_<to-device>".
func parseV2Token(tok string) (stream, toDev int64, ok bool) {
	if _, err := fmt.Sscanf(tok, "s%d_%d", &stream, &toDev); err != nil || stream < 0 || toDev < 0 {
		return 0, 0, false
	}
	return stream, toDev, true
}

func (s *Server) serveV2(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	since := q.Get("since")
	timeout := int64(-1)
	if q.Has("timeout") {
		t, err := strconv.ParseInt(q.Get("timeout"), 10, 64)
		if err != nil {
			writeError(w, http.StatusBadRequest, "M_INVALID_PARAM", "timeout")
			return
		}
		timeout = t
	}
	s.observe(Event{Kind: KindSyncRequest, Token: since, Timeout: timeout})
	s.mu.Lock()
	resp, info, err := s.v2Locked(since)
	if err == nil && info.idle && timeout > 0 {
		wake := s.wake
		s.mu.Unlock()
		s.waitForChange(r.Context(), wake, timeout)
		s.mu.Lock()
		resp, info, err = s.v2Locked(since)
	}
	s.mu.Unlock()
	if err != nil {
		writeError(w, http.StatusBadRequest, "M_UNKNOWN", "Invalid stream token")
		return
	}
	s.finishSync(w, resp, info)
}

func (s *Server) v2Locked(since string) (*v2Response, syncInfo, error) {
	var stream, ack int64
	if since != "" {
		var ok bool
		if stream, ack, ok = parseV2Token(since); !ok || stream > s.stream {
			return nil, syncInfo{}, errUnknownPos
		}
	}
	events, next := s.toDeviceLocked(ack, 100)
	fb := s.fallbackTypes()
	resp := &v2Response{
		NextBatch:        fmt.Sprintf("s%d_%d", s.stream, next),
		OTKCount:         map[string]int{"signed_curve25519": s.otkCount},
		FallbackUnstable: fb,
		Fallback:         fb,
	}
	join := map[id.RoomID]*v2RoomOut{}
	for _, idx := range s.order {
		if since != "" && s.roomStream[idx] <= stream {
			continue
		}
		join[s.acct.Rooms[idx].ID] = s.v2RoomLocked(idx, since == "", stream)
	}
	if len(join) > 0 {
		resp.Rooms = &v2Rooms{Join: join}
	}
	if len(events) > 0 {
		resp.ToDevice = &v2Events{Events: events}
	}
	info := syncInfo{token: resp.NextBatch, rooms: len(join), allKnown: true}
	if since != "" {
		if info.changed = s.changedSinceLocked(stream); len(info.changed) > 0 {
			resp.DeviceLists = &deviceLists{Changed: info.changed, Left: []id.UserID{}}
		}
	}
	info.idle = since != "" && len(join) == 0 && len(events) == 0 && len(info.changed) == 0
	return resp, info, nil
}

func (s *Server) v2RoomLocked(idx int, initial bool, since int64) *v2RoomOut {
	rm := &s.acct.Rooms[idx]
	out := &v2RoomOut{
		Summary:             map[string]any{},
		State:               v2Events{Events: []json.RawMessage{}},
		Ephemeral:           v2Events{Events: []json.RawMessage{}},
		AccountData:         v2Events{Events: []json.RawMessage{}},
		UnreadNotifications: map[string]int{"notification_count": 0, "highlight_count": 0},
		Timeline:            v2Timeline{Events: []json.RawMessage{}, PrevBatch: fmt.Sprintf("t%d_%d", idx, s.stream)},
	}
	if initial {
		heroes := []id.UserID{}
		for _, m := range rm.Members[1:min(len(rm.Members), 6)] {
			heroes = append(heroes, m)
		}
		out.Summary = map[string]any{"m.heroes": heroes, "m.joined_member_count": len(rm.Members), "m.invited_member_count": 0}
		for _, ev := range rm.State {
			out.State.Events = append(out.State.Events, ev.JSON)
		}
		for _, ev := range rm.Timeline {
			out.Timeline.Events = append(out.Timeline.Events, ev.JSON)
		}
		out.Timeline.Limited = true
	}
	for _, le := range s.live[idx] {
		if initial || le.stream > since {
			out.Timeline.Events = append(out.Timeline.Events, le.raw)
		}
	}
	return out
}
