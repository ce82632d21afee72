package ssfront

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httputil"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/sliding-e2ee/sdk/slidingsync"
	"github.com/sliding-e2ee/sdk/slidingsync/slidingsynctest"
)

// SyncPath is the path of the sliding sync endpoint the front serves.
const SyncPath = "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync"

const versionsPath = "/_matrix/client/versions"

// maxPositions is how many positions of one connection are remembered; older ones give
// M_UNKNOWN_POS.
const maxPositions = 16

// Front is the translating front, an http.Handler. Its methods are safe for concurrent use.
type Front struct {
	upstream *url.URL
	proxy    *httputil.ReverseProxy
	client   *http.Client

	mu      sync.Mutex
	conns   map[string]*connState
	devices map[string]*deviceState
}

// connState is one connection (access token and conn_id).
type connState struct {
	mu        sync.Mutex // serialises the connection's requests
	next      int
	positions map[string]*snapshot
}

// snapshot is what a connection knew at one pos.
type snapshot struct {
	seq   int
	since string                         // the v2 since token
	rooms map[id.RoomID]roomInfo         // joined and invited rooms
	sent  map[id.RoomID]event.Membership // rooms sent on the connection, with the membership sent
}

type roomInfo struct {
	membership event.Membership
	lastTS     int64
}

// deviceState is the to-device cursor of one device (access token).
type deviceState struct {
	mu sync.Mutex
	// acked is the to-device stream position the client acknowledged; -1 while the device
	// never used to_device.
	acked int64
}

// New returns a front for the Dendrite client API at upstream.
func New(upstream *url.URL) *Front {
	f := &Front{
		upstream: upstream,
		proxy:    httputil.NewSingleHostReverseProxy(upstream),
		client:   &http.Client{Timeout: 5 * time.Minute},
		conns:    make(map[string]*connState),
		devices:  make(map[string]*deviceState),
	}
	return f
}

// ServeHTTP serves sliding sync and /versions and proxies everything else.
func (f *Front) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	switch {
	case r.URL.Path == SyncPath && r.Method == http.MethodPost:
		f.serveSync(w, r)
	case r.URL.Path == versionsPath && r.Method == http.MethodGet:
		f.serveVersions(w, r)
	default:
		f.proxy.ServeHTTP(w, r)
	}
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	body, err := json.Marshal(v)
	if err != nil {
		status = http.StatusInternalServerError
		body = []byte(`{"errcode":"M_UNKNOWN","error":"encode response"}`)
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_, _ = w.Write(body)
}

func writeError(w http.ResponseWriter, status int, errcode, msg string) {
	writeJSON(w, status, map[string]string{"errcode": errcode, "error": msg})
}

func (f *Front) upstreamURL(path string, query url.Values) string {
	u := *f.upstream
	u.Path = strings.TrimSuffix(u.Path, "/") + path
	u.RawPath = ""
	u.RawQuery = query.Encode()
	return u.String()
}

func (f *Front) serveVersions(w http.ResponseWriter, r *http.Request) {
	req, err := http.NewRequestWithContext(r.Context(), http.MethodGet, f.upstreamURL(versionsPath, nil), nil)
	if err != nil {
		writeError(w, http.StatusInternalServerError, "M_UNKNOWN", err.Error())
		return
	}
	resp, err := f.client.Do(req)
	if err != nil {
		writeError(w, http.StatusBadGateway, "M_UNKNOWN", err.Error())
		return
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		writeError(w, http.StatusBadGateway, "M_UNKNOWN", err.Error())
		return
	}
	var versions map[string]any
	if resp.StatusCode != http.StatusOK || json.Unmarshal(body, &versions) != nil || versions == nil {
		w.Header().Set("Content-Type", resp.Header.Get("Content-Type"))
		w.WriteHeader(resp.StatusCode)
		_, _ = w.Write(body)
		return
	}
	features, _ := versions["unstable_features"].(map[string]any)
	if features == nil {
		features = make(map[string]any)
	}
	features["org.matrix.simplified_msc3575"] = true
	versions["unstable_features"] = features
	writeJSON(w, http.StatusOK, versions)
}

// upstreamError is a non-200 answer of Dendrite, passed through to the client.
type upstreamError struct {
	status int
	body   []byte
}

func (e *upstreamError) Error() string {
	return fmt.Sprintf("upstream status %d: %s", e.status, e.body)
}

// v2 /sync as far as the front reads it.
type v2Sync struct {
	NextBatch string `json:"next_batch"`
	Rooms     struct {
		Join   map[id.RoomID]*v2Joined `json:"join"`
		Invite map[id.RoomID]struct {
			InviteState struct {
				Events []*event.Event `json:"events"`
			} `json:"invite_state"`
		} `json:"invite"`
		Leave map[id.RoomID]json.RawMessage `json:"leave"`
	} `json:"rooms"`
	ToDevice struct {
		Events []json.RawMessage `json:"events"`
	} `json:"to_device"`
	DeviceLists *struct {
		Changed []id.UserID `json:"changed"`
		Left    []id.UserID `json:"left"`
	} `json:"device_lists"`
	OTKCount map[string]int `json:"device_one_time_keys_count"`
}

type v2Joined struct {
	Summary struct {
		Joined  *int `json:"m.joined_member_count"`
		Invited *int `json:"m.invited_member_count"`
	} `json:"summary"`
	State struct {
		Events []*event.Event `json:"events"`
	} `json:"state"`
	Timeline struct {
		Events    []*event.Event `json:"events"`
		Limited   bool           `json:"limited"`
		PrevBatch string         `json:"prev_batch"`
	} `json:"timeline"`
}

// syncV2 calls Dendrite's /sync with the caller's Authorization header.
func (f *Front) syncV2(ctx context.Context, auth, since string, timeoutMS int64, filter string) (*v2Sync, error) {
	q := url.Values{}
	if since != "" {
		q.Set("since", since)
	}
	q.Set("timeout", strconv.FormatInt(timeoutMS, 10))
	if filter != "" {
		q.Set("filter", filter)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, f.upstreamURL("/_matrix/client/v3/sync", q), nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Authorization", auth)
	resp, err := f.client.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode != http.StatusOK {
		return nil, &upstreamError{status: resp.StatusCode, body: body}
	}
	var out v2Sync
	if err := json.Unmarshal(body, &out); err != nil {
		return nil, fmt.Errorf("decode v2 sync: %w", err)
	}
	return &out, nil
}

func (f *Front) writeSyncError(w http.ResponseWriter, err error) {
	if ue, ok := err.(*upstreamError); ok {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(ue.status)
		_, _ = w.Write(ue.body)
		return
	}
	writeError(w, http.StatusBadGateway, "M_UNKNOWN", err.Error())
}

func (f *Front) conn(key string) *connState {
	f.mu.Lock()
	defer f.mu.Unlock()
	c := f.conns[key]
	if c == nil {
		c = &connState{positions: make(map[string]*snapshot)}
		f.conns[key] = c
	}
	return c
}

func (f *Front) device(auth string) *deviceState {
	f.mu.Lock()
	defer f.mu.Unlock()
	d := f.devices[auth]
	if d == nil {
		d = &deviceState{acked: -1}
		f.devices[auth] = d
	}
	return d
}

type extEnabled struct {
	Enabled bool `json:"enabled"`
}

type toDeviceRequest struct {
	Enabled bool   `json:"enabled"`
	Since   string `json:"since"`
}

// response is the wire response; slidingsync.Response is used for rooms and lists.
type response struct {
	Pos        string                                  `json:"pos"`
	Lists      map[string]slidingsync.ListResponse     `json:"lists"`
	Rooms      map[id.RoomID]*slidingsync.RoomResponse `json:"rooms,omitempty"`
	Extensions map[string]any                          `json:"extensions,omitempty"`
}

func (f *Front) serveSync(w http.ResponseWriter, r *http.Request) {
	auth := r.Header.Get("Authorization")
	if auth == "" {
		writeError(w, http.StatusUnauthorized, "M_MISSING_TOKEN", "missing access token")
		return
	}
	body, err := io.ReadAll(r.Body)
	if err != nil {
		writeError(w, http.StatusBadRequest, "M_BAD_JSON", err.Error())
		return
	}
	req, err := slidingsync.DecodeRequest(r.URL.Query(), body)
	if err != nil {
		writeError(w, http.StatusBadRequest, "M_BAD_JSON", err.Error())
		return
	}
	c := f.conn(auth + "\x00" + req.ConnID)
	c.mu.Lock()
	defer c.mu.Unlock()

	prev := &snapshot{rooms: map[id.RoomID]roomInfo{}, sent: map[id.RoomID]event.Membership{}}
	if req.Pos != "" {
		p, ok := c.positions[req.Pos]
		if !ok {
			writeError(w, http.StatusBadRequest, "M_UNKNOWN_POS", "unknown pos")
			return
		}
		prev = p
	}

	var e2eeReq extEnabled
	var tdReq toDeviceRequest
	if raw, ok := req.Extensions["e2ee"]; ok {
		_ = json.Unmarshal(raw, &e2eeReq)
	}
	if raw, ok := req.Extensions["to_device"]; ok {
		_ = json.Unmarshal(raw, &tdReq)
	}
	dev := f.device(auth)
	if tdReq.Enabled {
		dev.mu.Lock()
		dev.acked = 0
		if p, ok := toDevicePosition(tdReq.Since); ok {
			dev.acked = p
		}
		dev.mu.Unlock()
	}

	rs, limit := union(req)
	since := prev.since
	var timeout int64
	if req.Pos != "" {
		if req.Timeout != nil {
			timeout = *req.Timeout
		}
		dev.mu.Lock()
		if dev.acked >= 0 {
			since = withToDevicePosition(since, dev.acked)
		}
		dev.mu.Unlock()
	} else {
		since = ""
	}
	filter := fmt.Sprintf(`{"room":{"timeline":{"limit":%d}}}`, max(limit, 1))
	v2, err := f.syncV2(r.Context(), auth, since, timeout, filter)
	if err != nil {
		f.writeSyncError(w, err)
		return
	}

	userID := f.whoami(r.Context(), auth)
	next := &snapshot{since: v2.NextBatch, rooms: clone(prev.rooms), sent: clone(prev.sent)}
	out := &response{Lists: map[string]slidingsync.ListResponse{}, Rooms: map[id.RoomID]*slidingsync.RoomResponse{}}
	// An extensions-only connection gets no room data, as on Synapse.
	wantsRooms := len(req.Lists) > 0 || len(req.RoomSubscriptions) > 0
	for roomID := range v2.Rooms.Leave {
		delete(next.rooms, roomID)
		delete(next.sent, roomID)
	}
	for roomID, inv := range v2.Rooms.Invite {
		info := next.rooms[roomID]
		info.membership = event.MembershipInvite
		for _, evt := range inv.InviteState.Events {
			info.lastTS = max(info.lastTS, evt.Timestamp)
		}
		next.rooms[roomID] = info
		if wantsRooms && next.sent[roomID] != event.MembershipInvite {
			out.Rooms[roomID] = &slidingsync.RoomResponse{
				Initial:     true,
				Membership:  slidingsync.Some(event.MembershipInvite),
				InviteState: slidingsync.Some(inv.InviteState.Events),
			}
			next.sent[roomID] = event.MembershipInvite
		}
	}
	for roomID, j := range v2.Rooms.Join {
		info := next.rooms[roomID]
		info.membership = event.MembershipJoin
		for _, evt := range j.Timeline.Events {
			info.lastTS = max(info.lastTS, evt.Timestamp)
		}
		next.rooms[roomID] = info
		initial := next.sent[roomID] != event.MembershipJoin
		if !wantsRooms || (!initial && len(j.Timeline.Events) == 0 && len(j.State.Events) == 0) {
			continue
		}
		out.Rooms[roomID] = buildRoom(j, initial, rs, limit, userID)
		next.sent[roomID] = event.MembershipJoin
	}

	order := make([]id.RoomID, 0, len(next.rooms))
	for roomID := range next.rooms {
		order = append(order, roomID)
	}
	slices.SortFunc(order, func(a, b id.RoomID) int {
		ta, tb := next.rooms[a].lastTS, next.rooms[b].lastTS
		switch {
		case ta > tb:
			return -1
		case ta < tb:
			return 1
		}
		return strings.Compare(string(a), string(b))
	})
	for name, lc := range req.Lists {
		out.Lists[name] = slidingsynctest.SynapseListResponse(lc, order)
	}

	exts := map[string]any{}
	if e2eeReq.Enabled {
		exts["e2ee"] = e2eeSection(v2, req.Pos != "")
	}
	if tdReq.Enabled {
		td, err := f.toDevice(r.Context(), auth, dev, tdReq.Since)
		if err != nil {
			f.writeSyncError(w, err)
			return
		}
		exts["to_device"] = td
	}
	if len(exts) > 0 {
		out.Extensions = exts
	}

	c.next++
	next.seq = c.next
	out.Pos = strconv.Itoa(c.next)
	c.positions[out.Pos] = next
	for p, s := range c.positions {
		if s.seq <= c.next-maxPositions {
			delete(c.positions, p)
		}
	}
	writeJSON(w, http.StatusOK, out)
}

func clone[K comparable, V any](m map[K]V) map[K]V {
	out := make(map[K]V, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}

// whoami returns the user ID of the access token, for $ME; empty when it cannot be found.
func (f *Front) whoami(ctx context.Context, auth string) id.UserID {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, f.upstreamURL("/_matrix/client/v3/account/whoami", nil), nil)
	if err != nil {
		return ""
	}
	req.Header.Set("Authorization", auth)
	resp, err := f.client.Do(req)
	if err != nil {
		return ""
	}
	defer resp.Body.Close()
	var who struct {
		UserID id.UserID `json:"user_id"`
	}
	_ = json.NewDecoder(resp.Body).Decode(&who)
	return who.UserID
}

// union merges the required_state of every list and subscription and returns the largest
// timeline_limit.
func union(req *slidingsync.Request) (slidingsync.RequiredState, int) {
	var rs slidingsync.RequiredState
	limit := 0
	add := func(r slidingsync.RequiredState, l int) {
		rs.Include = append(rs.Include, r.Include...)
		rs.LazyMembers = rs.LazyMembers || r.LazyMembers
		limit = max(limit, l)
	}
	for _, lc := range req.Lists {
		add(lc.RequiredState, lc.TimelineLimit)
	}
	for _, sub := range req.RoomSubscriptions {
		add(sub.RequiredState, sub.TimelineLimit)
	}
	return rs, limit
}

func buildRoom(j *v2Joined, initial bool, rs slidingsync.RequiredState, limit int, me id.UserID) *slidingsync.RoomResponse {
	room := &slidingsync.RoomResponse{Initial: initial}
	if initial {
		room.Membership = slidingsync.Some(event.MembershipJoin)
	}
	timeline := j.Timeline.Events
	limited := j.Timeline.Limited
	if len(timeline) > limit {
		timeline = timeline[len(timeline)-limit:]
		limited = true
	}
	room.Timeline = timeline
	room.Limited = limited
	if j.Timeline.PrevBatch != "" {
		room.PrevBatch = slidingsync.Some(j.Timeline.PrevBatch)
	}
	if j.Summary.Joined != nil {
		room.JoinedCount = slidingsync.Some(*j.Summary.Joined)
	}
	if j.Summary.Invited != nil {
		room.InvitedCount = slidingsync.Some(*j.Summary.Invited)
	}
	// Current state: v2 state, then the timeline's state events, later ones winning.
	type key struct{ t, sk string }
	state := map[key]*event.Event{}
	var keys []key
	for _, evt := range append(slices.Clone(j.State.Events), j.Timeline.Events...) {
		if evt == nil || evt.StateKey == nil {
			continue
		}
		k := key{evt.Type.Type, *evt.StateKey}
		if _, ok := state[k]; !ok {
			keys = append(keys, k)
		}
		state[k] = evt
	}
	senders := map[id.UserID]bool{}
	for _, evt := range timeline {
		senders[evt.Sender] = true
	}
	if nameEvt := state[key{event.StateRoomName.Type, ""}]; nameEvt != nil {
		if name, ok := nameEvt.Content.Raw["name"].(string); ok && name != "" {
			room.Name = slidingsync.Some(name)
		} else if !initial {
			room.Name = slidingsync.Null[string]()
		}
	}
	for _, k := range keys {
		if slidingsynctest.WantsState(rs, me, k.t, k.sk, senders) {
			room.RequiredState = append(room.RequiredState, state[k])
		}
	}
	return room
}

type e2eeResponse struct {
	DeviceLists *deviceLists   `json:"device_lists,omitempty"`
	OTKCount    map[string]int `json:"device_one_time_keys_count"`
}

type deviceLists struct {
	Changed []id.UserID `json:"changed"`
	Left    []id.UserID `json:"left"`
}

func e2eeSection(v2 *v2Sync, incremental bool) *e2eeResponse {
	out := &e2eeResponse{OTKCount: map[string]int{}}
	for alg, n := range v2.OTKCount {
		out.OTKCount[alg] = n
	}
	if _, ok := out.OTKCount["signed_curve25519"]; !ok {
		out.OTKCount["signed_curve25519"] = 0
	}
	if incremental {
		dl := &deviceLists{Changed: []id.UserID{}, Left: []id.UserID{}}
		if v2.DeviceLists != nil {
			dl.Changed = append(dl.Changed, v2.DeviceLists.Changed...)
			dl.Left = append(dl.Left, v2.DeviceLists.Left...)
		}
		out.DeviceLists = dl
	}
	return out
}

type toDeviceResponse struct {
	NextBatch string            `json:"next_batch"`
	Events    []json.RawMessage `json:"events"`
}

// toDeviceFilter keeps the to-device cursor's v2 syncs small.
const toDeviceFilter = `{"room":{"rooms":[],"timeline":{"limit":1}},"presence":{"not_types":["*"]},"account_data":{"not_types":["*"]}}`

// toDevice runs the device's to-device cursor from since: the v2 sync acknowledges (deletes)
// what came before since and returns what is pending after it.
func (f *Front) toDevice(ctx context.Context, auth string, dev *deviceState, since string) (*toDeviceResponse, error) {
	dev.mu.Lock()
	defer dev.mu.Unlock()
	v2, err := f.syncV2(ctx, auth, since, 0, toDeviceFilter)
	if err != nil {
		return nil, err
	}
	events := v2.ToDevice.Events
	if events == nil {
		events = []json.RawMessage{}
	}
	return &toDeviceResponse{NextBatch: v2.NextBatch, Events: events}, nil
}

// Dendrite's v2 tokens are s<pdu>_<typing>_<receipt>_<sendtodevice>_<invite>_<accountdata>_
// <devicelist>_<notificationdata>_<presence>.
const toDeviceField = 3

func toDevicePosition(token string) (int64, bool) {
	fields, ok := tokenFields(token)
	if !ok {
		return 0, false
	}
	p, err := strconv.ParseInt(fields[toDeviceField], 10, 64)
	return p, err == nil
}

func withToDevicePosition(token string, pos int64) string {
	fields, ok := tokenFields(token)
	if !ok {
		return token
	}
	fields[toDeviceField] = strconv.FormatInt(pos, 10)
	return "s" + strings.Join(fields, "_")
}

func tokenFields(token string) ([]string, bool) {
	rest, ok := strings.CutPrefix(token, "s")
	if !ok {
		return nil, false
	}
	fields := strings.Split(rest, "_")
	if len(fields) <= toDeviceField {
		return nil, false
	}
	return fields, true
}
