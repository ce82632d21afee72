package minihs

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"

	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/sliding-e2ee/sdk/slidingsync"
	"github.com/sliding-e2ee/sdk/slidingsync/slidingsynctest"
)

// Wire keys of the extensions in the MSC4186 dialect.
const (
	extE2EE     = "e2ee"
	extToDevice = "to_device"
)

// maxToDeviceLimit is Synapse's cap on to-device events per response.
const maxToDeviceLimit = 100

// position is what a pos says: everything up to stream was seen, and the answers with news up
// to seq. fresh is a request without pos. An answer without news keeps the request's pos, as
// Synapse does.
type position struct {
	stream int64
	seq    int64
	fresh  bool
}

func (p position) String() string { return fmt.Sprintf("%d_%d", p.stream, p.seq) }

// ssConn is what the server remembers of one sliding sync connection, as Synapse does: the
// answer (seq) in which each room was sent in full. A room is known at a pos when it was sent
// at or before the pos's seq, so a client that resumes from an older pos gets again the rooms
// sent after it.
type ssConn struct {
	sent map[id.RoomID]int64
}

func (c *ssConn) knows(roomID id.RoomID, at position) bool {
	if c == nil || at.fresh {
		return false
	}
	seq, ok := c.sent[roomID]
	return ok && seq <= at.seq
}

// parsePosLocked reads a pos; ok is false for one this server never gave. Caller holds s.mu.
func (s *Server) parsePosLocked(pos string) (position, bool) {
	if pos == "" {
		return position{fresh: true}, true
	}
	a, b, found := strings.Cut(pos, "_")
	stream, err1 := strconv.ParseInt(a, 10, 64)
	seq, err2 := strconv.ParseInt(b, 10, 64)
	if !found || err1 != nil || err2 != nil || stream < 0 || stream > s.stream || seq < 0 || seq > s.posSeq {
		return position{}, false
	}
	return position{stream: stream, seq: seq}, true
}

// isPosForm reports whether pos has the form of this server's positions, whatever its
// numbers.
func isPosForm(pos string) bool {
	a, b, found := strings.Cut(pos, "_")
	_, err1 := strconv.ParseInt(a, 10, 64)
	_, err2 := strconv.ParseInt(b, 10, 64)
	return found && err1 == nil && err2 == nil
}

// serveSync long-polls until the request has something new (or its timeout ends), then lets
// the slidingsynctest server, with its Synapse personality, answer it through respond.
// Requests it cannot read, that lack the bot's token, or whose pos it cannot parse go
// straight to slidingsynctest, which refuses them as Synapse does. A pos of this server's
// form past what it has issued (another server run) gets M_UNKNOWN_POS.
func (s *Server) serveSync(w http.ResponseWriter, r *http.Request) {
	rec := &syncRecorder{ResponseWriter: w, s: s, idx: s.noteSync(r), reqPos: r.URL.Query().Get("pos")}
	defer rec.done()
	w = rec
	body, err := io.ReadAll(io.LimitReader(r.Body, 16<<20))
	if err != nil {
		writeError(w, http.StatusBadRequest, "M_BAD_JSON", "Unreadable body.")
		return
	}
	token, _ := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	if req, err := slidingsync.DecodeRequest(r.URL.Query(), body); err == nil && token == AccessToken {
		rec.connID = req.ConnID
		timeout := int64(-1)
		if req.Timeout != nil {
			timeout = *req.Timeout
		}
		s.observe(Event{Kind: KindSyncRequest, Token: req.Pos, Timeout: timeout})
		s.mu.Lock()
		_, ok := s.parsePosLocked(req.Pos)
		s.mu.Unlock()
		switch {
		case !ok && isPosForm(req.Pos):
			writeError(w, http.StatusBadRequest, "M_UNKNOWN_POS", "Unknown position")
			return
		case ok && req.Pos != "":
			// Every pos of this run is valid: it says what the connection has seen.
			s.ss.IssuePos(req.ConnID, req.Pos)
		}
		if ok && !s.longPoll(r, req) {
			return
		}
	}
	// slidingsynctest checks the token and the body and records the request.
	r.Body = io.NopCloser(bytes.NewReader(body))
	s.ss.ServeHTTP(w, r)
}

// SyncRequest is one sliding sync request as the server saw it.
type SyncRequest struct {
	// Arrived is when the request reached the server, before its long-poll.
	Arrived time.Time
	// Answered is when the answer was written; zero if the request was cancelled first.
	Answered time.Time
	// Status is the answer's HTTP status, 0 if none.
	Status int
	// Pos is the request's pos, AnswerPos the pos of a 200 answer.
	Pos, AnswerPos string
}

// SyncRequests returns the sliding sync requests so far, in arrival order: when each arrived
// (before its long-poll), when it was answered and the positions on both sides.
func (s *Server) SyncRequests() []SyncRequest {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.syncs)
}

// noteSync records the arrival of a sync request and returns its index.
func (s *Server) noteSync(r *http.Request) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.syncs = append(s.syncs, SyncRequest{Arrived: time.Now(), Pos: r.URL.Query().Get("pos")})
	return len(s.syncs) - 1
}

// syncRecorder passes a sync answer through, records when it was written and its pos, and
// reports it to the observer.
type syncRecorder struct {
	http.ResponseWriter
	s              *Server
	idx            int
	reqPos, connID string
	status         int
	at             time.Time
	body           bytes.Buffer
}

func (w *syncRecorder) WriteHeader(status int) {
	if w.status == 0 {
		w.status, w.at = status, time.Now()
	}
	w.ResponseWriter.WriteHeader(status)
}

func (w *syncRecorder) Write(p []byte) (int, error) {
	if w.status == 0 {
		w.WriteHeader(http.StatusOK)
	}
	w.body.Write(p)
	return w.ResponseWriter.Write(p)
}

// done stores what was answered and reports it.
func (w *syncRecorder) done() {
	var answer struct {
		Pos        string                        `json:"pos"`
		Rooms      map[id.RoomID]json.RawMessage `json:"rooms"`
		Extensions struct {
			E2EE struct {
				DeviceLists struct {
					Changed []id.UserID `json:"changed"`
				} `json:"device_lists"`
			} `json:"e2ee"`
		} `json:"extensions"`
	}
	if w.status == http.StatusOK {
		_ = json.Unmarshal(w.body.Bytes(), &answer)
	}
	w.s.mu.Lock()
	rec := &w.s.syncs[w.idx]
	rec.Answered, rec.Status, rec.AnswerPos = w.at, w.status, answer.Pos
	conn := w.s.conns[w.connID]
	allKnown := conn != nil && len(conn.sent) >= len(w.s.list)
	w.s.mu.Unlock()
	if w.status != http.StatusOK {
		return
	}
	if f, ok := w.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
	w.s.observe(Event{Kind: KindSyncResponse, Token: answer.Pos, Idle: w.reqPos != "" && answer.Pos == w.reqPos,
		AllKnown: allKnown, Rooms: len(answer.Rooms), BodyBytes: w.body.Len(), Users: answer.Extensions.E2EE.DeviceLists.Changed})
}

// longPoll waits until req would get something new. It returns false when the request was
// cancelled.
func (s *Server) longPoll(r *http.Request, req *slidingsync.Request) bool {
	var timeout time.Duration
	if req.Timeout != nil {
		timeout = min(time.Duration(max(*req.Timeout, 0))*time.Millisecond, s.opts.IdleHold)
	}
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	for {
		s.mu.Lock()
		_, news := s.buildLocked(req)
		ch, closed, held := s.changed, s.closed, s.held > 0
		s.mu.Unlock()
		if (news && !held) || closed {
			return true
		}
		select {
		case <-r.Context().Done():
			return false
		case <-timer.C:
			return true
		case <-ch:
		}
	}
}

// respond is the slidingsynctest Responder: it never returns nil, the long-poll happened in
// serveSync. An answer without news keeps the request's pos; one with news records the rooms
// it sent in full on the connection.
func (s *Server) respond(req *slidingsync.Request) *slidingsync.Response {
	s.mu.Lock()
	defer s.mu.Unlock()
	resp, news := s.buildLocked(req)
	if !news && req.Pos != "" {
		resp.Pos = req.Pos
		return resp
	}
	s.posSeq++
	conn := s.conns[req.ConnID]
	if conn == nil || req.Pos == "" {
		conn = &ssConn{sent: map[id.RoomID]int64{}}
		s.conns[req.ConnID] = conn
	}
	for roomID, rr := range resp.Rooms {
		if rr.Initial {
			conn.sent[roomID] = s.posSeq
		}
	}
	return resp
}

// buildLocked computes the answer to req from what its pos says the connection has seen, and
// whether it carries anything new. A to-device batch acknowledged by req's since is deleted.
// Caller holds s.mu.
func (s *Server) buildLocked(req *slidingsync.Request) (*slidingsync.Response, bool) {
	base, ok := s.parsePosLocked(req.Pos)
	if !ok {
		base = position{fresh: true}
	}
	conn := s.conns[req.ConnID]
	resp := &slidingsync.Response{Lists: map[string]slidingsync.ListResponse{}, Rooms: map[id.RoomID]*slidingsync.RoomResponse{}}
	for _, name := range slices.Sorted(maps.Keys(req.Lists)) {
		lc := req.Lists[name]
		// As Synapse: the ranges echoed, a list asked for in full not sorted, and a list
		// without ranges only counted.
		lr := slidingsynctest.SynapseListResponse(lc, s.list)
		for _, op := range lr.Ops {
			for _, roomID := range op.RoomIDs {
				if _, done := resp.Rooms[roomID]; done {
					continue
				}
				rm := s.rooms[roomID]
				initial := !conn.knows(roomID, base) || rm.botStream > base.stream
				if rr := s.roomEntryLocked(rm, lc, base, initial); rr != nil {
					resp.Rooms[roomID] = rr
				}
			}
		}
		resp.Lists[name] = lr
	}
	news := base.fresh || len(resp.Rooms) > 0
	resp.Extensions = map[string]json.RawMessage{}
	if enabled(req.Extensions[extE2EE]) {
		body, n := s.e2eeLocked(base)
		resp.Extensions[extE2EE] = body
		news = news || n
	}
	if raw := req.Extensions[extToDevice]; enabled(raw) {
		body, n := s.toDeviceLocked(raw)
		resp.Extensions[extToDevice] = body
		news = news || n
	}
	resp.Pos = position{stream: s.stream, seq: s.posSeq + 1}.String()
	return resp, news
}

// enabled reports whether an extension's request body has "enabled": true.
func enabled(raw json.RawMessage) bool {
	var body struct {
		Enabled bool `json:"enabled"`
	}
	return raw != nil && json.Unmarshal(raw, &body) == nil && body.Enabled
}

// roomEntryLocked returns the room's entry, or nil when nothing changed. Caller holds s.mu.
func (s *Server) roomEntryLocked(rm *room, lc slidingsync.ListConfig, base position, initial bool) *slidingsync.RoomResponse {
	name := ""
	if e, ok := rm.state[[2]string{event.StateRoomName.Type, ""}]; ok {
		name = contentString(e.evt, "name")
	}
	switch rm.membership(BotUserID) {
	case event.MembershipInvite:
		if !initial {
			return nil
		}
		var stripped []*event.Event
		for _, key := range rm.order {
			e := rm.state[key].evt
			if key[0] == event.StateMember.Type && key[1] != BotUserID.String() && key[1] != e.Sender.String() {
				continue
			}
			stripped = append(stripped, &event.Event{Type: e.Type, StateKey: e.StateKey, Sender: e.Sender, Content: e.Content})
		}
		return &slidingsync.RoomResponse{Initial: true, Name: slidingsync.Some(name), InviteState: slidingsync.Some(stripped)}
	case event.MembershipJoin:
	default:
		return nil
	}
	events := rm.timeline
	if !initial {
		i := len(events)
		for i > 0 && events[i-1].stream > base.stream {
			i--
		}
		events = events[i:]
		if len(events) == 0 {
			return nil
		}
	}
	rr := &slidingsync.RoomResponse{Initial: initial, BumpStamp: slidingsync.Some(rm.changed)}
	if initial {
		rr.Name = slidingsync.Some(name)
	}
	if limit := max(lc.TimelineLimit, 0); len(events) > limit {
		rr.Limited = true
		events = events[len(events)-limit:]
		if len(events) > 0 {
			// Back-pagination (/messages) from here reaches the events left out.
			rr.PrevBatch = slidingsync.Some(fmt.Sprintf("s%d", events[0].stream))
		}
	}
	senders := map[id.UserID]bool{} // $LAZY: the members of the timeline's senders, as Synapse sends them
	for _, e := range events {
		rr.Timeline = append(rr.Timeline, s.viewLocked(e.evt, bot))
		senders[e.evt.Sender] = true
	}
	var joined, invited int
	for _, key := range rm.order {
		if key[0] == event.StateMember.Type {
			switch rm.membership(id.UserID(key[1])) {
			case event.MembershipJoin:
				joined++
			case event.MembershipInvite:
				invited++
			}
		}
		if st := rm.state[key]; (initial || st.stream > base.stream) && slidingsynctest.WantsState(lc.RequiredState, BotUserID, key[0], key[1], senders) {
			rr.RequiredState = append(rr.RequiredState, st.evt)
		}
	}
	rr.JoinedCount, rr.InvitedCount = slidingsync.Some(joined), slidingsync.Some(invited)
	return rr
}

// e2eeLocked returns the e2ee section for the bot's device: counts and fallback key types on
// every response, device-list changes after base when the request had a pos. news says
// whether the counts or device lists changed since base. Caller holds s.mu.
func (s *Server) e2eeLocked(base position) (json.RawMessage, bool) {
	d := s.devices[BotUserID][BotDeviceID]
	out := map[string]any{
		"device_one_time_keys_count":       map[string]int{string(id.KeyAlgorithmSignedCurve25519): len(d.otks)},
		"device_unused_fallback_key_types": d.unusedFallbackTypes(),
	}
	news := !base.fresh && s.keysAt > base.stream
	if !base.fresh {
		if changed := s.changedSinceLocked(base.stream); len(changed) > 0 {
			out["device_lists"] = map[string]any{"changed": changed, "left": []id.UserID{}}
			news = true
		}
	}
	body, _ := json.Marshal(out)
	return body, news
}

// changedSinceLocked returns the users whose devices changed after stream. Caller holds s.mu.
func (s *Server) changedSinceLocked(stream int64) []id.UserID {
	changed := []id.UserID{}
	for _, c := range s.devLists {
		if c.stream > stream && !slices.Contains(changed, c.user) {
			changed = append(changed, c.user)
		}
	}
	return changed
}

// toDeviceLocked returns the to_device section for the bot's device. Messages up to the
// request's since were processed by the client and are deleted first. Caller holds s.mu.
func (s *Server) toDeviceLocked(raw json.RawMessage) (json.RawMessage, bool) {
	var req struct {
		Since string `json:"since"`
		Limit int    `json:"limit"`
	}
	_ = json.Unmarshal(raw, &req)
	since, _ := strconv.ParseInt(req.Since, 10, 64)
	events, next := s.botToDeviceLocked(since, req.Limit)
	body, _ := json.Marshal(map[string]any{"next_batch": strconv.FormatInt(next, 10), "events": events})
	return body, len(events) > 0
}

// botToDeviceLocked deletes the bot's to-device messages up to since and returns up to limit
// of the others (Synapse's cap when limit is not in 1..100) with the next batch token.
// Caller holds s.mu.
func (s *Server) botToDeviceLocked(since int64, limit int) ([]json.RawMessage, int64) {
	if limit <= 0 || limit > maxToDeviceLimit {
		limit = maxToDeviceLimit
	}
	d := s.devices[BotUserID][BotDeviceID]
	d.ack(since)
	events := []json.RawMessage{}
	next := since
	for _, m := range d.toDevice {
		if len(events) == limit || s.toDeviceHeld > 0 {
			break
		}
		events = append(events, m.raw)
		next = m.seq
	}
	return events, next
}
