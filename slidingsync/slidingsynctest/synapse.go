package slidingsynctest

import (
	"encoding/json"
	"fmt"
	"maps"
	"net/http"
	"slices"
	"strconv"

	"maunium.net/go/mautrix/id"

	"github.com/sliding-e2ee/sdk/slidingsync"
)

// Personality is how a Server behaves beyond its wire dialect: which requests it refuses,
// which pos an answer carries and how the answers it computes itself are shaped. See the
// package documentation for the rules of each.
type Personality string

// The personalities of a Server.
const (
	// PersonalityAuto, the zero value, is PersonalitySynapse on MSC4186 and
	// PersonalityPolite on MSC3575 and v4.
	PersonalityAuto Personality = ""
	// PersonalityPolite answers exactly what was scripted: every answer gets a fresh pos,
	// an empty long-poll answer is {"pos": "N"} and nothing else, any pos is accepted and
	// the body is only checked to be a sliding sync request.
	PersonalityPolite Personality = "polite"
	// PersonalitySynapse behaves as Synapse serves MSC4186: an idle long-poll keeps the
	// request's pos, requests are validated as Synapse's request model does, unknown and
	// expired positions are refused, and computed answers have Synapse's shape. It needs
	// the MSC4186 dialect.
	PersonalitySynapse Personality = "synapse"
)

// Synapse's limits on a request (its request model). The Synapse personality refuses a
// request over them with 400 M_BAD_JSON.
const (
	maxListNameLength = 64   // longest list name
	maxLists          = 100  // most lists in one request
	maxTimelineLimit  = 1000 // largest timeline_limit
)

// Wire keys of the extensions Synapse knows. It computes one only when the request enabled
// it, so an answer never carries the others.
const (
	extE2EE     = "e2ee"
	extToDevice = "to_device"
)

var synapseExtensions = []string{extE2EE, extToDevice, "account_data", "receipts", "typing"}

// E2EEState is what the e2ee extension reports about the device in the answers the server
// computes under the Synapse personality. The zero value is a device that holds no keys:
// {"signed_curve25519": 0} and no unused fallback key, which asks a client to upload both.
type E2EEState struct {
	// OneTimeKeyCounts maps an algorithm to how many of the device's one-time keys the
	// server holds. signed_curve25519 is always reported, 0 when missing, as Synapse does.
	OneTimeKeyCounts map[id.KeyAlgorithm]int
	// UnusedFallbackKeyTypes lists the algorithms of the device's unused fallback keys;
	// nil, like empty, is reported as [] (upload a fallback key).
	UnusedFallbackKeyTypes []id.KeyAlgorithm
}

func (st E2EEState) clone() E2EEState {
	return E2EEState{OneTimeKeyCounts: maps.Clone(st.OneTimeKeyCounts), UnusedFallbackKeyTypes: slices.Clone(st.UnusedFallbackKeyTypes)}
}

// counts returns the count map as Synapse sends it: signed_curve25519 always present.
func (st E2EEState) counts() map[id.KeyAlgorithm]int {
	out := maps.Clone(st.OneTimeKeyCounts)
	if out == nil {
		out = map[id.KeyAlgorithm]int{}
	}
	if _, ok := out[id.KeyAlgorithmSignedCurve25519]; !ok {
		out[id.KeyAlgorithmSignedCurve25519] = 0
	}
	return out
}

func (st E2EEState) fallbackTypes() []id.KeyAlgorithm {
	if st.UnusedFallbackKeyTypes == nil {
		return []id.KeyAlgorithm{}
	}
	return slices.Clone(st.UnusedFallbackKeyTypes)
}

// SetE2EE sets what the answers the server computes report about the device's keys, as
// after a key upload or a claim. Answers the server serves also update it: a count map or a
// fallback key list in a served e2ee section replaces the one known, so computed answers
// repeat the last values a client was told.
func (s *Server) SetE2EE(st E2EEState) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.e2ee = st.clone()
}

// ExpirePositions makes the server forget every connection, as Synapse forgets one unused
// for 7 days (or for an hour with more than 100 rooms changed): under the Synapse
// personality a later request with any pos issued so far gets 400 M_UNKNOWN_POS, every time,
// until the client starts afresh without pos. Positions issued afterwards are valid.
func (s *Server) ExpirePositions() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for pos := range s.issued {
		s.expired[pos] = true
	}
	clear(s.issued)
}

// IssuePos records pos as issued by this server on the connection connID ("" for none), as
// by an earlier run of the same server (Synapse keeps connections across restarts): under
// the Synapse personality a client that stored it may resume from it. A test that starts a
// client on a stored pos against a new Server calls it first; without it, a pos the server
// never served gets 400 M_UNKNOWN "Invalid stream token", as a pos of another server does on
// Synapse.
func (s *Server) IssuePos(connID, pos string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.issue(connID, pos)
}

// issue records pos as served on connID. Caller holds s.mu.
func (s *Server) issue(connID, pos string) {
	if s.issued[pos] == nil {
		s.issued[pos] = map[string]bool{}
	}
	s.issued[pos][connID] = true
	delete(s.expired, pos)
}

// posStatus says how the Synapse personality takes a request's pos.
type posStatus int

const (
	posValid   posStatus = iota // none, or known on this connection
	posForeign                  // never issued and not of the server's form: unparseable
	posUnknown                  // parseable, but the connection is unknown or expired
)

// checkPos classifies a request's pos. Caller holds s.mu.
func (s *Server) checkPos(pos, connID string) posStatus {
	if pos == "" {
		return posValid
	}
	if conns, ok := s.issued[pos]; ok {
		if conns[connID] {
			return posValid
		}
		return posUnknown
	}
	if s.expired[pos] {
		return posUnknown
	}
	return posForeign
}

// PushIdle queues the answer of a server whose streams did not move. With resp nil it is
// the answer the server computes when nothing happened, computed when it is served: what a
// long-poll that runs out gets. Under the Synapse personality it keeps the pos of the
// request it answers; under PersonalityPolite it is {"pos": "N"}. With resp, resp is served
// as pushed with the pos of the request it answers (a fresh one if that request has none;
// resp.Pos is ignored), as Synapse answers when only what its streams do not track changed,
// for instance one-time key counts. It panics if resp cannot be encoded.
func (s *Server) PushIdle(resp *slidingsync.Response) {
	if resp == nil {
		s.enqueue(&item{status: http.StatusOK, idle: true})
		return
	}
	cp := *resp
	cp.Pos = ""
	it := itemFor(&cp)
	it.keepPos = true
	s.enqueue(it)
}

// SynapseListResponse returns a list's part of a response as Synapse computes it, given the
// rooms matching the list, most recent activity first: the count, and one SYNC op per
// requested range that echoes the range as requested (wider than the list is fine) with the
// room IDs inside it. When the only range starts at 0 and covers the whole list Synapse does
// not sort the rooms; this function then lists them in room ID order, an order that has
// nothing to do with activity. A list without ranges gets the count only. A responder can
// use it to answer lists the way the Synapse personality does.
func SynapseListResponse(lc slidingsync.ListConfig, rooms []id.RoomID) slidingsync.ListResponse {
	return knownList{count: len(rooms), rooms: rooms}.response(lc.Ranges)
}

// knownList is what the server last told clients about a list: its count and the room at
// each position ("" where unknown).
type knownList struct {
	count int
	rooms []id.RoomID
}

// window returns the room IDs of one range: those at its positions, up to the count, up to
// the first unknown one.
func (l knownList) window(r slidingsync.Range) []id.RoomID {
	out := []id.RoomID{}
	for i := max(r.Start, 0); i <= r.End && i < l.count && i < len(l.rooms) && l.rooms[i] != ""; i++ {
		out = append(out, l.rooms[i])
	}
	return out
}

func (l knownList) response(ranges []slidingsync.Range) slidingsync.ListResponse {
	lr := slidingsync.ListResponse{Count: slidingsync.Some(l.count)}
	if len(ranges) == 1 && ranges[0].Start == 0 && ranges[0].End >= l.count-1 {
		// Synapse does not sort a list asked for in full.
		ids := slices.DeleteFunc(slices.Clone(l.rooms[:min(l.count, len(l.rooms))]), func(r id.RoomID) bool { return r == "" })
		slices.Sort(ids)
		return slidingsync.ListResponse{Count: lr.Count, Ops: []slidingsync.ListOp{syncOp(ranges[0], ids)}}
	}
	for _, r := range ranges {
		lr.Ops = append(lr.Ops, syncOp(r, l.window(r)))
	}
	return lr
}

func syncOp(r slidingsync.Range, ids []id.RoomID) slidingsync.ListOp {
	if ids == nil {
		ids = []id.RoomID{}
	}
	return slidingsync.ListOp{Op: slidingsync.ListOpSync, Range: &slidingsync.Range{Start: r.Start, End: r.End}, RoomIDs: ids}
}

// learn updates a known list from a served list response: the count, and the rooms of each
// SYNC op at their positions.
func (l *knownList) learn(lr slidingsync.ListResponse) {
	if lr.Count.HasValue() && lr.Count.Val >= 0 {
		l.count = lr.Count.Val
	}
	for _, op := range lr.Ops {
		if op.Op != slidingsync.ListOpSync || op.Range == nil || op.Range.Start < 0 || op.Range.End < op.Range.Start {
			continue
		}
		for i := op.Range.Start; i <= op.Range.End && i < l.count; i++ {
			for len(l.rooms) <= i {
				l.rooms = append(l.rooms, "")
			}
			if j := i - op.Range.Start; j < len(op.RoomIDs) {
				l.rooms[i] = op.RoomIDs[j]
			} else {
				l.rooms[i] = ""
			}
		}
	}
	if len(l.rooms) > l.count {
		l.rooms = l.rooms[:l.count]
	}
}

// synapseRequest is what the Synapse personality reads from a request.
type synapseRequest struct {
	pos     string // from the query only, as Synapse reads it
	connID  string
	lists   map[string]slidingsync.ListConfig
	e2ee    bool
	toDev   bool
	since   string
	enabled map[string]bool // Synapse's extensions the request enabled
}

func readSynapseRequest(rec *RecordedRequest) *synapseRequest {
	sr := &synapseRequest{pos: rec.Query.Get("pos"), enabled: map[string]bool{}}
	if rec.Parsed == nil {
		return sr
	}
	sr.connID = rec.Parsed.ConnID
	sr.lists = rec.Parsed.Lists
	for _, name := range synapseExtensions {
		var body struct {
			Enabled bool   `json:"enabled"`
			Since   string `json:"since"`
		}
		raw := rec.Parsed.Extensions[name]
		if raw != nil && json.Unmarshal(raw, &body) == nil && body.Enabled {
			sr.enabled[name] = true
			if name == extToDevice {
				sr.since = body.Since
			}
		}
	}
	sr.e2ee, sr.toDev = sr.enabled[extE2EE], sr.enabled[extToDevice]
	return sr
}

// wireCommonParams holds the fields Synapse requires on every list and room subscription;
// nil means absent.
type wireCommonParams struct {
	RequiredState json.RawMessage `json:"required_state"`
	TimelineLimit json.RawMessage `json:"timeline_limit"`
	Filters       json.RawMessage `json:"filters"`
}

// synapseRefusal checks a request as Synapse does before it computes anything and returns
// the error answer, or status 0. The order is Synapse's: the timeout (checked by the caller),
// a pos it cannot parse, the body, then the connection position and the list filters.
// Caller holds s.mu.
func (s *Server) synapseRefusal(rec *RecordedRequest) (int, []byte) {
	pos, connID := rec.Query.Get("pos"), ""
	if rec.Parsed != nil {
		connID = rec.Parsed.ConnID
	}
	posState := s.checkPos(pos, connID)
	if posState == posForeign {
		return http.StatusBadRequest, errorBody("M_UNKNOWN", "Invalid stream token", nil)
	}
	var raw map[string]json.RawMessage
	if !json.Valid(rec.Body) {
		return http.StatusBadRequest, errorBody("M_NOT_JSON", "Content not JSON.", nil)
	}
	if json.Unmarshal(rec.Body, &raw) != nil || raw == nil {
		return http.StatusBadRequest, errorBody("M_BAD_JSON", "Content must be a JSON object.", nil)
	}
	if rec.Parsed == nil {
		return http.StatusBadRequest, errorBody("M_BAD_JSON", rec.ParseErr.Error(), nil)
	}
	if status, out := validateSynapseBody(raw); status != 0 {
		return status, out
	}
	if posState == posUnknown {
		return http.StatusBadRequest, errorBody("M_UNKNOWN_POS", "Unknown position", nil)
	}
	var lists map[string]wireCommonParams
	_ = json.Unmarshal(raw["lists"], &lists)
	for _, name := range slices.Sorted(maps.Keys(lists)) {
		var filters map[string]json.RawMessage
		_ = json.Unmarshal(lists[name].Filters, &filters)
		for _, key := range []string{"spaces", "room_name_like"} {
			if v, ok := filters[key]; ok && string(v) != "null" {
				// Accepted by the model, NotImplementedError when the list is computed.
				return http.StatusInternalServerError, errorBody("M_UNKNOWN", "Internal server error", nil)
			}
		}
	}
	return 0, nil
}

// validateSynapseBody applies the constraints of Synapse's request model: at most 100 lists
// with names of at most 64 characters, required_state and timeline_limit on every list and
// subscription, timeline_limit at most 1000. As Synapse, a single missing field is
// M_MISSING_PARAM and anything else M_BAD_JSON.
func validateSynapseBody(raw map[string]json.RawMessage) (int, []byte) {
	var problems []string
	missing := 0
	check := func(where string, p wireCommonParams) {
		if p.RequiredState == nil || string(p.RequiredState) == "null" {
			problems = append(problems, where+".required_state: field required")
			missing++
		}
		if p.TimelineLimit == nil || string(p.TimelineLimit) == "null" {
			problems = append(problems, where+".timeline_limit: field required")
			missing++
		} else if n, err := strconv.ParseInt(string(p.TimelineLimit), 10, 64); err == nil && n > maxTimelineLimit {
			problems = append(problems, fmt.Sprintf("%s.timeline_limit: must be at most %d", where, maxTimelineLimit))
		}
	}
	var lists map[string]wireCommonParams
	_ = json.Unmarshal(raw["lists"], &lists)
	if len(lists) > maxLists {
		problems = append(problems, fmt.Sprintf("lists: at most %d lists", maxLists))
	}
	for _, name := range slices.Sorted(maps.Keys(lists)) {
		if len(name) > maxListNameLength {
			problems = append(problems, fmt.Sprintf("lists.%.16s...: name longer than %d characters", name, maxListNameLength))
		}
		check("lists."+name, lists[name])
	}
	var subs map[string]wireCommonParams
	_ = json.Unmarshal(raw["room_subscriptions"], &subs)
	for _, roomID := range slices.Sorted(maps.Keys(subs)) {
		check("room_subscriptions."+roomID, subs[roomID])
	}
	switch {
	case len(problems) == 0:
		return 0, nil
	case len(problems) == 1 && missing == 1:
		return http.StatusBadRequest, errorBody("M_MISSING_PARAM", problems[0], nil)
	default:
		msg := fmt.Sprintf("%d validation errors: %s", len(problems), problems[0])
		return http.StatusBadRequest, errorBody("M_BAD_JSON", msg, nil)
	}
}

// idleAnswer is the answer the Synapse personality computes when nothing happened: the
// request's pos (a fresh one without), the lists as last served, no rooms, and the enabled
// extensions with nothing new. Caller holds s.mu.
func (s *Server) idleAnswer(sr *synapseRequest) []byte {
	pos := sr.pos
	if pos == "" {
		pos = s.nextPos()
	}
	body := map[string]any{"pos": pos, "rooms": map[string]any{}}
	if len(sr.lists) > 0 {
		lists := map[string]slidingsync.ListResponse{}
		for name, lc := range sr.lists {
			lists[name] = s.lists[name].response(lc.Ranges)
		}
		body["lists"] = encodeLists(lists)
	}
	exts := map[string]any{}
	if sr.e2ee {
		exts[extE2EE] = s.e2eeSection(sr.pos != "", nil)
	}
	if sr.toDev {
		next := sr.since
		if next == "" {
			next = s.toDeviceNext
		}
		if next == "" {
			next = "0"
		}
		exts[extToDevice] = map[string]any{"next_batch": next, "events": []any{}}
	}
	body["extensions"] = exts
	return mustJSON(body)
}

// encodeLists writes lists as Synapse does: room_ids present on every SYNC op, even empty.
func encodeLists(lists map[string]slidingsync.ListResponse) map[string]any {
	out := make(map[string]any, len(lists))
	for name, lr := range lists {
		l := map[string]any{}
		if lr.Count.HasValue() {
			l["count"] = lr.Count.Val
		}
		var ops []map[string]any
		for _, op := range lr.Ops {
			o := map[string]any{"op": op.Op}
			if op.Range != nil {
				o["range"] = op.Range
			}
			if op.Op == slidingsync.ListOpSync {
				ids := op.RoomIDs
				if ids == nil {
					ids = []id.RoomID{}
				}
				o["room_ids"] = ids
			}
			ops = append(ops, o)
		}
		if len(ops) > 0 {
			l["ops"] = ops
		}
		out[name] = l
	}
	return out
}

// e2eeSection returns the e2ee section Synapse sends: the counts and fallback key types
// always (those of given, when it has them, else the server's), device_lists only on an
// incremental answer (given's, else empty). Caller holds s.mu.
func (s *Server) e2eeSection(incremental bool, given map[string]json.RawMessage) map[string]any {
	out := map[string]any{
		"device_one_time_keys_count":       s.e2ee.counts(),
		"device_unused_fallback_key_types": s.e2ee.fallbackTypes(),
	}
	for key, v := range given {
		out[key] = v
	}
	delete(out, "device_lists")
	if incremental {
		if dl, ok := given["device_lists"]; ok && string(dl) != "null" {
			out["device_lists"] = dl
		} else {
			out["device_lists"] = map[string]any{"changed": []id.UserID{}, "left": []id.UserID{}}
		}
	}
	return out
}

// shapeResponse turns a responder's answer into what Synapse's encoder would send: no null
// name or avatar, is_dm only when true, no ops on a list without ranges, only the extensions
// the request enabled, the e2ee section complete, and rooms and extensions always present. It
// returns the top-level fields without pos. resp is not modified. Caller holds s.mu.
func (s *Server) shapeResponse(resp *slidingsync.Response, sr *synapseRequest) map[string]json.RawMessage {
	cp := *resp
	cp.Pos, cp.TxnID = "", ""
	if cp.Rooms != nil {
		cp.Rooms = make(map[id.RoomID]*slidingsync.RoomResponse, len(resp.Rooms))
		for roomID, rr := range resp.Rooms {
			if rr == nil {
				continue
			}
			r := *rr
			if r.Name.Null {
				r.Name = slidingsync.Opt[string]{}
			}
			if r.Avatar.Null {
				r.Avatar = slidingsync.Opt[id.ContentURIString]{}
			}
			if !r.IsDM.HasValue() || !r.IsDM.Val {
				r.IsDM = slidingsync.Opt[bool]{}
			}
			cp.Rooms[roomID] = &r
		}
	}
	if cp.Lists != nil {
		cp.Lists = maps.Clone(resp.Lists)
		for name, lr := range cp.Lists {
			if lc, ok := sr.lists[name]; ok && len(lc.Ranges) == 0 {
				lr.Ops = nil
				cp.Lists[name] = lr
			}
		}
	}
	cp.Extensions = nil
	fields := map[string]json.RawMessage{}
	if err := json.Unmarshal(mustJSON(&cp), &fields); err != nil {
		panic(fmt.Sprintf("slidingsynctest: encode response: %v", err))
	}
	delete(fields, "pos")
	if _, ok := fields["rooms"]; !ok {
		fields["rooms"] = json.RawMessage(`{}`)
	}
	exts := map[string]any{}
	for key, raw := range resp.Extensions {
		if slices.Contains(synapseExtensions, key) && !sr.enabled[key] {
			continue
		}
		exts[key] = raw
	}
	if sr.e2ee {
		var given map[string]json.RawMessage
		if raw, ok := resp.Extensions[extE2EE]; ok {
			_ = json.Unmarshal(raw, &given)
			s.learnE2EE(raw)
		}
		exts[extE2EE] = s.e2eeSection(sr.pos != "", given)
	}
	fields["extensions"] = mustJSON(exts)
	return fields
}

// learn records what a served 200 answer told the client: its pos is issued (on the
// request's conn_id), and when learnState is set, its lists, e2ee values and to-device token
// become what computed answers repeat. Caller holds s.mu.
func (s *Server) learn(sr *synapseRequest, body []byte, learnState bool) {
	var resp struct {
		Pos        string                              `json:"pos"`
		Lists      map[string]slidingsync.ListResponse `json:"lists"`
		Extensions map[string]json.RawMessage          `json:"extensions"`
	}
	if json.Unmarshal(body, &resp) != nil {
		return
	}
	if resp.Pos != "" {
		s.issue(sr.connID, resp.Pos)
	}
	if !learnState {
		return
	}
	for name, lr := range resp.Lists {
		l := s.lists[name]
		l.learn(lr)
		s.lists[name] = l
	}
	if raw, ok := resp.Extensions[extE2EE]; ok {
		s.learnE2EE(raw)
	}
	var td struct {
		NextBatch string `json:"next_batch"`
	}
	if raw, ok := resp.Extensions[extToDevice]; ok && json.Unmarshal(raw, &td) == nil && td.NextBatch != "" {
		s.toDeviceNext = td.NextBatch
	}
}

// learnE2EE takes the counts and fallback key types of a served e2ee section as the
// device's. Caller holds s.mu.
func (s *Server) learnE2EE(raw json.RawMessage) {
	var sec struct {
		Counts    map[id.KeyAlgorithm]int `json:"device_one_time_keys_count"`
		Fallbacks []id.KeyAlgorithm       `json:"device_unused_fallback_key_types"`
	}
	var present map[string]json.RawMessage
	if json.Unmarshal(raw, &present) != nil || json.Unmarshal(raw, &sec) != nil {
		return
	}
	if v, ok := present["device_one_time_keys_count"]; ok && string(v) != "null" {
		s.e2ee.OneTimeKeyCounts = sec.Counts
	}
	if v, ok := present["device_unused_fallback_key_types"]; ok && string(v) != "null" {
		s.e2ee.UnusedFallbackKeyTypes = sec.Fallbacks
	}
}
