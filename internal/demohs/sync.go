package demohs

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
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

// position is what a pos says the connection has seen: everything up to stream, and the
// first gen generated rooms. fresh is a request without pos. seq makes the pos of every
// answer with news unique; an answer without news keeps the request's pos, as Synapse does.
type position struct {
	stream int64
	gen    int
	seq    int64
	fresh  bool
}

func (p position) String() string { return fmt.Sprintf("%d_%d_%d", p.stream, p.gen, p.seq) }

// parsePosLocked reads a pos; ok is false for one this server never gave. Caller holds s.mu.
func (s *Server) parsePosLocked(pos string) (position, bool) {
	if pos == "" {
		return position{stream: -1, fresh: true}, true
	}
	parts := strings.Split(pos, "_")
	if len(parts) != 3 {
		return position{}, false
	}
	stream, err1 := strconv.ParseInt(parts[0], 10, 64)
	gen, err2 := strconv.Atoi(parts[1])
	seq, err3 := strconv.ParseInt(parts[2], 10, 64)
	if err1 != nil || err2 != nil || err3 != nil || stream < 0 || stream > s.stream || gen < 0 || gen > len(s.generated) || seq < 0 || seq > s.posSeq {
		return position{}, false
	}
	return position{stream: stream, gen: gen, seq: seq}, true
}

// serveSync long-polls until the request has something new (or its timeout ends), then lets
// the slidingsynctest server, with its Synapse personality, answer it through respond.
// Requests it cannot read, that lack the bot's token, or whose pos it cannot parse go
// straight to slidingsynctest, which refuses them as Synapse does. A pos of this server's
// form past what it has issued (another server run) gets M_UNKNOWN_POS.
func (s *Server) serveSync(w http.ResponseWriter, r *http.Request) {
	rec := &syncRecorder{ResponseWriter: w, s: s, idx: s.noteSync(r)}
	defer rec.done()
	w = rec
	body, err := io.ReadAll(io.LimitReader(r.Body, 1<<20))
	if err != nil {
		writeError(w, http.StatusBadRequest, "M_BAD_JSON", "Unreadable body.")
		return
	}
	token, _ := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	if req, err := slidingsync.DecodeRequest(r.URL.Query(), body); err == nil && token == s.opts.BotToken {
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

// noteSync records the arrival of a sync request and returns its index.
func (s *Server) noteSync(r *http.Request) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.syncs = append(s.syncs, SyncRequest{Arrived: time.Now(), Pos: r.URL.Query().Get("pos")})
	return len(s.syncs) - 1
}

// syncRecorder passes a sync answer through and records when it was written and its pos.
type syncRecorder struct {
	http.ResponseWriter
	s      *Server
	idx    int
	status int
	at     time.Time
	body   bytes.Buffer
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

// done stores what was answered.
func (w *syncRecorder) done() {
	var answer struct {
		Pos string `json:"pos"`
	}
	if w.status == http.StatusOK {
		_ = json.Unmarshal(w.body.Bytes(), &answer)
	}
	w.s.mu.Lock()
	defer w.s.mu.Unlock()
	rec := &w.s.syncs[w.idx]
	rec.Answered, rec.Status, rec.AnswerPos = w.at, w.status, answer.Pos
}

// longPoll waits until req would get something new. It returns false when the request was
// cancelled.
func (s *Server) longPoll(r *http.Request, req *slidingsync.Request) bool {
	var timeout time.Duration
	if req.Timeout != nil {
		timeout = min(time.Duration(max(*req.Timeout, 0))*time.Millisecond, s.opts.PollTimeout)
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
// serveSync. An answer without news keeps the request's pos.
func (s *Server) respond(req *slidingsync.Request) *slidingsync.Response {
	s.mu.Lock()
	defer s.mu.Unlock()
	resp, news := s.buildLocked(req)
	if !news && req.Pos != "" {
		resp.Pos = req.Pos
		return resp
	}
	s.posSeq++
	return resp
}

// isPosForm reports whether pos has the form of this server's positions, whatever its
// numbers.
func isPosForm(pos string) bool {
	parts := strings.Split(pos, "_")
	if len(parts) != 3 {
		return false
	}
	for _, p := range parts {
		if _, err := strconv.ParseInt(p, 10, 64); err != nil {
			return false
		}
	}
	return true
}

// buildLocked computes the answer to req from the state its pos names, and whether it carries
// anything new. A to-device batch acknowledged by req's since is deleted. Caller holds s.mu.
func (s *Server) buildLocked(req *slidingsync.Request) (*slidingsync.Response, bool) {
	base, ok := s.parsePosLocked(req.Pos)
	if !ok {
		base = position{stream: -1, fresh: true}
	}
	resp := &slidingsync.Response{Lists: map[string]slidingsync.ListResponse{}, Rooms: map[id.RoomID]*slidingsync.RoomResponse{}}
	list := s.listLocked()
	gen := base.gen
	names := make([]string, 0, len(req.Lists))
	for name := range req.Lists {
		names = append(names, name)
	}
	slices.Sort(names)
	for _, name := range names {
		lc := req.Lists[name]
		// As Synapse: the ranges echoed, a list asked for in full not sorted, and a list
		// without ranges only counted.
		lr := slidingsynctest.SynapseListResponse(lc, list)
		for _, op := range lr.Ops {
			for _, roomID := range op.RoomIDs {
				rm := s.rooms[roomID]
				if rm.generated >= 0 {
					gen = max(gen, rm.generated+1)
				}
				if _, done := resp.Rooms[roomID]; done {
					continue
				}
				initial := base.fresh || rm.botStream > base.stream ||
					(rm.generated >= 0 && rm.generated >= base.gen) || (rm.generated < 0 && rm.created > base.stream)
				if rr := s.roomEntryLocked(rm, lc, base, initial); rr != nil {
					resp.Rooms[roomID] = rr
				}
			}
		}
		resp.Lists[name] = lr
	}
	news := base.fresh || len(resp.Rooms) > 0 || gen != base.gen
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
	resp.Pos = position{stream: s.stream, gen: gen, seq: s.posSeq + 1}.String()
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
	bot := s.opts.BotUserID
	name, _ := rm.stateEvent(event.StateRoomName.Type, "").Content.Raw["name"].(string)
	switch rm.membership(bot) {
	case event.MembershipInvite:
		if !initial {
			return nil
		}
		var stripped []*event.Event
		for _, key := range rm.order {
			e := rm.state[key].evt
			if key[0] == event.StateMember.Type && key[1] != bot.String() && key[1] != e.Sender.String() {
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
	rr := &slidingsync.RoomResponse{
		Initial:   initial,
		BumpStamp: slidingsync.Some(rm.changed),
	}
	if initial {
		rr.Name = slidingsync.Some(name)
	}
	limit := max(lc.TimelineLimit, 0)
	if len(events) > limit {
		rr.Limited = true
		events = events[len(events)-limit:]
		if len(events) > 0 {
			// Back-pagination (/messages) from here reaches the events left out.
			rr.PrevBatch = slidingsync.Some(fmt.Sprintf("s%d", events[0].stream))
		}
	}
	senders := map[string]bool{} // $LAZY: the members of the timeline's senders, as Synapse sends them
	for _, e := range events {
		rr.Timeline = append(rr.Timeline, s.viewLocked(e.evt, devRef{s.opts.BotUserID, s.opts.BotDeviceID}))
		senders[e.evt.Sender.String()] = true
	}
	var joined, invited int
	for _, key := range rm.order {
		entry := rm.state[key]
		if key[0] == event.StateMember.Type {
			switch rm.membership(id.UserID(key[1])) {
			case event.MembershipJoin:
				joined++
			case event.MembershipInvite:
				invited++
			}
		}
		if !initial && entry.stream <= base.stream {
			continue
		}
		lazy := lc.RequiredState.LazyMembers && key[0] == event.StateMember.Type && senders[key[1]]
		if lazy || wanted(lc.RequiredState.Include, key, bot) {
			rr.RequiredState = append(rr.RequiredState, entry.evt)
		}
	}
	rr.JoinedCount, rr.InvitedCount = slidingsync.Some(joined), slidingsync.Some(invited)
	return rr
}

// stateEvent returns the current state event of a type and state key, or an empty one.
func (r *room) stateEvent(typ, stateKey string) *event.Event {
	if e, ok := r.state[[2]string{typ, stateKey}]; ok {
		return e.evt
	}
	return &event.Event{}
}

// wanted reports whether a required_state filter selects the state key.
func wanted(include []slidingsync.StateFilter, key [2]string, me id.UserID) bool {
	for _, f := range include {
		if f.Type != "*" && f.Type != key[0] {
			continue
		}
		switch f.StateKey {
		case "*", key[1]:
			return true
		case "$ME":
			if key[1] == me.String() {
				return true
			}
		}
	}
	return false
}

// e2eeLocked returns the e2ee section for the bot's device: counts and fallback key types on
// every response, device-list changes after base when the request had a pos. news says
// whether the counts or device lists changed since base. Caller holds s.mu.
func (s *Server) e2eeLocked(base position) (json.RawMessage, bool) {
	d := s.devices[s.opts.BotUserID][s.opts.BotDeviceID]
	out := map[string]any{
		"device_one_time_keys_count":       map[string]int{string(id.KeyAlgorithmSignedCurve25519): len(d.otks)},
		"device_unused_fallback_key_types": d.unusedFallbackTypes(),
	}
	news := s.keysAt > base.stream
	if !base.fresh {
		var changed []id.UserID
		for _, c := range s.devLists {
			if c.stream > base.stream && !slices.Contains(changed, c.user) {
				changed = append(changed, c.user)
			}
		}
		if len(changed) > 0 {
			out["device_lists"] = map[string]any{"changed": changed, "left": []id.UserID{}}
			news = true
		}
	}
	body, _ := json.Marshal(out)
	return body, news
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
	limit := req.Limit
	if limit <= 0 || limit > maxToDeviceLimit {
		limit = maxToDeviceLimit
	}
	d := s.devices[s.opts.BotUserID][s.opts.BotDeviceID]
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
	body, _ := json.Marshal(map[string]any{"next_batch": strconv.FormatInt(next, 10), "events": events})
	return body, len(events) > 0
}
