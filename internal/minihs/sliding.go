package minihs

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strconv"
	"strings"

	"maunium.net/go/mautrix/id"

	"github.com/sliding-e2ee/sdk/slidingsync"
)

type ssResponse struct {
	Pos        string                `json:"pos"`
	Lists      map[string]ssList     `json:"lists"`
	Rooms      map[id.RoomID]*ssRoom `json:"rooms"`
	Extensions map[string]any        `json:"extensions"`
}

type ssList struct {
	Count int    `json:"count"`
	Ops   []ssOp `json:"ops"`
}

type ssOp struct {
	Op      string      `json:"op"`
	Range   [2]int      `json:"range"`
	RoomIDs []id.RoomID `json:"room_ids"`
}

type ssRoom struct {
	BumpStamp         int64             `json:"bump_stamp"`
	Name              string            `json:"name,omitempty"`
	Initial           bool              `json:"initial,omitempty"`
	RequiredState     []json.RawMessage `json:"required_state,omitempty"`
	Timeline          []json.RawMessage `json:"timeline,omitempty"`
	PrevBatch         string            `json:"prev_batch,omitempty"`
	Limited           bool              `json:"limited"`
	NumLive           int               `json:"num_live"`
	JoinedCount       *int              `json:"joined_count,omitempty"`
	InvitedCount      *int              `json:"invited_count,omitempty"`
	NotificationCount int               `json:"notification_count"`
	HighlightCount    int               `json:"highlight_count"`
}

type e2eeSection struct {
	OTKCount    map[string]int `json:"device_one_time_keys_count"`
	Fallback    []string       `json:"device_unused_fallback_key_types"`
	DeviceLists *deviceLists   `json:"device_lists,omitempty"`
}

type deviceLists struct {
	Changed []id.UserID `json:"changed"`
	Left    []id.UserID `json:"left"`
}

type toDeviceSection struct {
	NextBatch string            `json:"next_batch"`
	Events    []json.RawMessage `json:"events"`
}

// syncInfo is what the observer learns about a computed response.
type syncInfo struct {
	token    string
	idle     bool
	allKnown bool
	rooms    int
	changed  []id.UserID
}

func (s *Server) serveSliding(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(io.LimitReader(r.Body, maxBody))
	if err != nil {
		writeError(w, http.StatusBadRequest, "M_BAD_JSON", err.Error())
		return
	}
	req, err := slidingsync.DecodeRequest(r.URL.Query(), body)
	if err != nil {
		writeError(w, http.StatusBadRequest, "M_BAD_JSON", err.Error())
		return
	}
	timeout := int64(-1)
	if req.Timeout != nil {
		timeout = *req.Timeout
	}
	s.observe(Event{Kind: KindSyncRequest, Token: req.Pos, Timeout: timeout})
	s.mu.Lock()
	resp, info, err := s.slidingLocked(req)
	if err == nil && info.idle && timeout > 0 {
		wake := s.wake
		s.mu.Unlock()
		s.waitForChange(r.Context(), wake, timeout)
		s.mu.Lock()
		resp, info, err = s.slidingLocked(req)
	}
	s.mu.Unlock()
	if err != nil {
		writeError(w, http.StatusBadRequest, "M_UNKNOWN_POS", err.Error())
		return
	}
	s.finishSync(w, resp, info)
}

// finishSync writes a sync response, pushes it onto the wire and reports it.
func (s *Server) finishSync(w http.ResponseWriter, resp any, info syncInfo) {
	body, err := json.Marshal(resp)
	if err != nil {
		writeError(w, http.StatusInternalServerError, "M_UNKNOWN", err.Error())
		return
	}
	n := writeBody(w, http.StatusOK, body)
	if f, ok := w.(http.Flusher); ok {
		f.Flush()
	}
	s.observe(Event{Kind: KindSyncResponse, Token: info.token, Idle: info.idle, AllKnown: info.allKnown,
		Rooms: info.rooms, BodyBytes: n, Users: info.changed})
}

// parseSlidingPos reads "<n>/s<stream>".
func parseSlidingPos(pos string) (int64, bool) {
	_, st, ok := strings.Cut(pos, "/s")
	if !ok {
		return 0, false
	}
	v, err := strconv.ParseInt(st, 10, 64)
	return v, err == nil && v >= 0
}

func (s *Server) slidingLocked(req *slidingsync.Request) (*ssResponse, syncInfo, error) {
	var since int64
	conn := s.conns[req.ConnID]
	if req.Pos == "" {
		conn = &ssConn{sent: map[int]bool{}}
		s.conns[req.ConnID] = conn
	} else {
		st, ok := parseSlidingPos(req.Pos)
		if !ok || conn == nil || st > s.stream {
			return nil, syncInfo{}, errUnknownPos
		}
		since = st
	}
	conn.n++
	resp := &ssResponse{
		Pos:        fmt.Sprintf("%d/s%d", conn.n, s.stream),
		Lists:      map[string]ssList{},
		Rooms:      map[id.RoomID]*ssRoom{},
		Extensions: map[string]any{},
	}
	count := len(s.order)
	names := make([]string, 0, len(req.Lists))
	for name := range req.Lists {
		names = append(names, name)
	}
	slices.Sort(names)
	for _, name := range names {
		lc := req.Lists[name]
		lr := ssList{Count: count, Ops: []ssOp{}}
		for _, rg := range lc.Ranges {
			if !rg.Valid() || rg.Start >= count {
				continue
			}
			end := min(rg.End, count-1)
			ids := make([]id.RoomID, 0, end-rg.Start+1)
			for pos := rg.Start; pos <= end; pos++ {
				idx := s.order[pos]
				ids = append(ids, s.acct.Rooms[idx].ID)
				s.roomEntryLocked(conn, idx, lc.TimelineLimit, lc.RequiredState, since, resp.Rooms)
			}
			lr.Ops = append(lr.Ops, ssOp{Op: "SYNC", Range: [2]int{rg.Start, end}, RoomIDs: ids})
		}
		resp.Lists[name] = lr
	}
	for roomID, sub := range req.RoomSubscriptions {
		if idx, ok := s.roomIdx[roomID]; ok {
			s.roomEntryLocked(conn, idx, sub.TimelineLimit, sub.RequiredState, since, resp.Rooms)
		}
	}
	info := syncInfo{token: resp.Pos, rooms: len(resp.Rooms)}
	newData := len(resp.Rooms) > 0
	if enabled(req.Extensions["e2ee"]) {
		sec := e2eeSection{OTKCount: map[string]int{"signed_curve25519": s.otkCount}, Fallback: s.fallbackTypes()}
		if req.Pos != "" {
			info.changed = s.changedSinceLocked(since)
			sec.DeviceLists = &deviceLists{Changed: info.changed, Left: []id.UserID{}}
			newData = newData || len(info.changed) > 0
		}
		resp.Extensions["e2ee"] = sec
	}
	if raw, ok := req.Extensions["to_device"]; ok && enabled(raw) {
		var td struct {
			Limit int    `json:"limit"`
			Since string `json:"since"`
		}
		_ = json.Unmarshal(raw, &td)
		ack, _ := strconv.ParseInt(td.Since, 10, 64)
		if td.Limit <= 0 || td.Limit > 100 {
			td.Limit = 100
		}
		events, next := s.toDeviceLocked(ack, td.Limit)
		resp.Extensions["to_device"] = toDeviceSection{NextBatch: strconv.FormatInt(next, 10), Events: events}
		newData = newData || len(events) > 0
	}
	info.idle = req.Pos != "" && !newData
	if info.idle {
		// As Synapse: a response with nothing new repeats the request's pos.
		resp.Pos, info.token = req.Pos, req.Pos
	}
	info.allKnown = len(conn.sent) >= count
	return resp, info, nil
}

func enabled(raw json.RawMessage) bool {
	var e struct {
		Enabled bool `json:"enabled"`
	}
	return raw != nil && json.Unmarshal(raw, &e) == nil && e.Enabled
}

func (s *Server) fallbackTypes() []string {
	if s.fallback {
		return []string{"signed_curve25519"}
	}
	return []string{}
}

func (s *Server) changedSinceLocked(since int64) []id.UserID {
	out := []id.UserID{}
	for _, c := range s.devChanges {
		if c.stream > since && !slices.Contains(out, c.user) {
			out = append(out, c.user)
		}
	}
	return out
}

// toDeviceLocked drops messages up to ack (the client acknowledged them) and returns up to
// limit of the rest with the next token.
func (s *Server) toDeviceLocked(ack int64, limit int) ([]json.RawMessage, int64) {
	s.toDevice = slices.DeleteFunc(s.toDevice, func(m toDevMsg) bool { return m.seq <= ack })
	events := []json.RawMessage{}
	next := max(ack, s.toDevSeq)
	for i, m := range s.toDevice {
		if i == limit {
			next = s.toDevice[i-1].seq
			break
		}
		events = append(events, m.raw)
	}
	return events, next
}

// roomEntryLocked adds a room to out: in full the first time the connection sees it, then
// only when it changed after since.
func (s *Server) roomEntryLocked(conn *ssConn, idx, limit int, rs slidingsync.RequiredState, since int64, out map[id.RoomID]*ssRoom) {
	rm := &s.acct.Rooms[idx]
	if _, done := out[rm.ID]; done {
		return
	}
	bump := int64(len(s.acct.Rooms)-idx) + s.roomStream[idx]*int64(len(s.acct.Rooms))
	if conn.sent[idx] {
		if s.roomStream[idx] <= since {
			return
		}
		entry := &ssRoom{BumpStamp: bump}
		for _, le := range s.live[idx] {
			if le.stream > since {
				entry.Timeline = append(entry.Timeline, le.raw)
			}
		}
		entry.NumLive = len(entry.Timeline)
		if limit >= 0 && len(entry.Timeline) > limit {
			entry.Timeline = entry.Timeline[len(entry.Timeline)-limit:]
			entry.Limited = true
		}
		out[rm.ID] = entry
		return
	}
	conn.sent[idx] = true
	timeline := make([]json.RawMessage, 0, len(rm.Timeline)+len(s.live[idx]))
	senders := map[id.UserID]bool{}
	for _, ev := range rm.Timeline {
		timeline = append(timeline, ev.JSON)
		senders[ev.Sender] = true
	}
	for _, le := range s.live[idx] {
		timeline = append(timeline, le.raw)
		senders[le.sender] = true
	}
	history := len(rm.State) + len(timeline)
	if limit < len(timeline) {
		timeline = timeline[len(timeline)-max(limit, 0):]
	}
	joined, invited := len(rm.Members), 0
	entry := &ssRoom{
		BumpStamp:    bump,
		Name:         rm.Name,
		Initial:      true,
		Timeline:     timeline,
		PrevBatch:    fmt.Sprintf("t%d_%d", idx, s.stream),
		Limited:      history > len(timeline),
		JoinedCount:  &joined,
		InvitedCount: &invited,
	}
	for _, ev := range rm.currentState() {
		if wanted(ev, rs, senders) {
			entry.RequiredState = append(entry.RequiredState, ev.JSON)
		}
	}
	out[rm.ID] = entry
}

// wanted applies required_state as Synapse reads the tuple form.
func wanted(ev StoredEvent, rs slidingsync.RequiredState, timelineSenders map[id.UserID]bool) bool {
	if ev.StateKey == nil {
		return false
	}
	key := *ev.StateKey
	if rs.LazyMembers && ev.Type == "m.room.member" && timelineSenders[id.UserID(key)] {
		return true
	}
	for _, f := range rs.Include {
		if f.Type != "*" && f.Type != ev.Type {
			continue
		}
		switch f.StateKey {
		case "*":
			return true
		case "$ME":
			if key == BotUserID.String() {
				return true
			}
		case "$LAZY":
			if ev.Type == "m.room.member" && timelineSenders[id.UserID(key)] {
				return true
			}
		default:
			if f.StateKey == key {
				return true
			}
		}
	}
	return false
}
