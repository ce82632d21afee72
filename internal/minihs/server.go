package minihs

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"maunium.net/go/mautrix/id"
)

// API selects which sync API a [Server] serves.
type API int

const (
	// APISliding serves sliding sync in Synapse's dialect (MSC4186 at the simplified_msc3575
	// path) and advertises it in /versions.
	APISliding API = iota + 1
	// APIV2 serves the classic /sync.
	APIV2
)

// Options configures a [Server].
type Options struct {
	// API is the sync API served; zero means APISliding.
	API API
	// IdleHold is the longest a long-poll with nothing new is held before an empty response;
	// zero means 150 ms. A request's own shorter timeout wins.
	IdleHold time.Duration
	// Observer, when set, is called for every request of interest, synchronously and without
	// the server's lock held, so it must be quick.
	Observer func(Event)
}

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
	KindOther        Kind = "other" // any other endpoint, known or not (Path)
)

// Event reports one request to the observer.
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
	// Idle is set on a sync response that carried nothing new.
	Idle bool
	// AllKnown is set on a sync response after which the client knows every room: v2 always,
	// sliding sync when the window covers every room and each was sent on the connection.
	AllKnown bool
	// Rooms is how many room entries a sync response carried; BodyBytes its body size.
	Rooms, BodyBytes int
	// Users: device_lists.changed of a sync response, or the users of a key query.
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

// liveEvent is an event added while serving (a bot's send or a peer's message).
type liveEvent struct {
	stream int64
	raw    json.RawMessage
	sender id.UserID
}

type devChange struct {
	stream int64
	user   id.UserID
}

type toDevMsg struct {
	seq int64
	raw json.RawMessage
}

// Server is an in-memory homeserver for one account and one bot device. Create it with
// [NewServer]; it is safe for concurrent use.
type Server struct {
	acct *Account
	opts Options

	bytesIn, bytesOut atomic.Int64
	hs                *http.Server
	ln                net.Listener
	mux               *http.ServeMux

	mu         sync.Mutex
	stream     int64
	wake       chan struct{}
	order      []int // room indexes, most recent activity first
	roomIdx    map[id.RoomID]int
	live       [][]liveEvent
	roomStream []int64
	devChanges []devChange
	toDevice   []toDevMsg
	toDevSeq   int64
	botKeys    json.RawMessage
	otkCount   int
	fallback   bool // an unused fallback key is held
	claimed    map[id.UserID]int
	conns      map[string]*ssConn
	connSeq    int
}

// ssConn is what the server remembers of one sliding sync connection, as Synapse does: which
// rooms it has sent.
type ssConn struct {
	sent map[int]bool
	n    int
}

// NewServer returns a server for acct. Call Start to listen.
func NewServer(acct *Account, opts Options) *Server {
	if opts.API == 0 {
		opts.API = APISliding
	}
	if opts.IdleHold <= 0 {
		opts.IdleHold = 150 * time.Millisecond
	}
	s := &Server{
		acct:       acct,
		opts:       opts,
		stream:     1,
		wake:       make(chan struct{}),
		order:      make([]int, len(acct.Rooms)),
		roomIdx:    make(map[id.RoomID]int, len(acct.Rooms)),
		live:       make([][]liveEvent, len(acct.Rooms)),
		roomStream: make([]int64, len(acct.Rooms)),
		claimed:    map[id.UserID]int{},
		conns:      map[string]*ssConn{},
	}
	for i, r := range acct.Rooms {
		s.order[i] = i
		s.roomIdx[r.ID] = i
	}
	for _, raw := range acct.ToDevice {
		s.toDevSeq++
		s.toDevice = append(s.toDevice, toDevMsg{seq: s.toDevSeq, raw: raw})
	}
	s.mux = http.NewServeMux()
	s.routes()
	return s
}

// Start listens on 127.0.0.1 (a free port) and serves until Close. It returns the base URL.
func (s *Server) Start() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	s.ln = &countingListener{Listener: ln, s: s}
	s.hs = &http.Server{Handler: s, ReadHeaderTimeout: 30 * time.Second}
	go func() { _ = s.hs.Serve(s.ln) }()
	return "http://" + ln.Addr().String(), nil
}

// Close stops the server and ends held long-polls.
func (s *Server) Close() {
	if s.hs != nil {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_ = s.hs.Shutdown(ctx)
		_ = s.hs.Close()
	}
}

// Bytes returns the totals received and sent on the wire so far, headers included.
func (s *Server) Bytes() (in, out int64) { return s.bytesIn.Load(), s.bytesOut.Load() }

// Account returns the account served.
func (s *Server) Account() *Account { return s.acct }

// PeerMessage adds a plain m.text message from sender to room roomIndex, as a live event that
// wakes long-polls, and returns its event ID.
func (s *Server) PeerMessage(roomIndex int, sender id.UserID, body string) id.EventID {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.addLocked(roomIndex, sender, "m.room.message", map[string]any{"msgtype": "m.text", "body": body})
}

// ChangeDevices records a device-list change for users (as when one adds a device); it wakes
// long-polls.
func (s *Server) ChangeDevices(users ...id.UserID) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.stream++
	for _, u := range users {
		s.devChanges = append(s.devChanges, devChange{stream: s.stream, user: u})
	}
	s.wakeLocked()
}

// addLocked appends a live event, stamped with the current time (bots ignore history from
// before they started), to a room, moves the room to the front of the order and
// wakes long-polls.
func (s *Server) addLocked(idx int, sender id.UserID, typ string, content any) id.EventID {
	s.stream++
	evtID := id.EventID(fmt.Sprintf("$live%d-%s", s.stream, ServerName))
	raw, _ := json.Marshal(map[string]any{
		"type": typ, "sender": sender, "content": content, "event_id": evtID,
		"origin_server_ts": time.Now().UnixMilli(), "unsigned": map[string]any{"age": 10},
	})
	s.live[idx] = append(s.live[idx], liveEvent{stream: s.stream, raw: raw, sender: sender})
	s.roomStream[idx] = s.stream
	if pos := slices.Index(s.order, idx); pos > 0 {
		copy(s.order[1:pos+1], s.order[:pos])
		s.order[0] = idx
	}
	s.wakeLocked()
	return evtID
}

func (s *Server) wakeLocked() {
	close(s.wake)
	s.wake = make(chan struct{})
}

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

// ServeHTTP checks the access token and routes the request.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if !strings.HasSuffix(r.URL.Path, "/versions") && r.Header.Get("Authorization") != "Bearer "+AccessToken {
		writeError(w, http.StatusUnauthorized, "M_UNKNOWN_TOKEN", "unknown token")
		return
	}
	s.mux.ServeHTTP(w, r)
}

func (s *Server) routes() {
	m := s.mux
	m.HandleFunc("GET /_matrix/client/versions", s.serveVersions)
	m.HandleFunc("GET /_matrix/client/v3/account/whoami", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, map[string]any{"user_id": BotUserID, "device_id": BotDeviceID})
	})
	if s.opts.API == APISliding {
		m.HandleFunc("POST /_matrix/client/unstable/org.matrix.simplified_msc3575/sync", s.serveSliding)
	} else {
		m.HandleFunc("GET /_matrix/client/v3/sync", s.serveV2)
		m.HandleFunc("POST /_matrix/client/v3/user/{userID}/filter", func(w http.ResponseWriter, r *http.Request) {
			_, _ = io.Copy(io.Discard, r.Body)
			writeJSON(w, map[string]any{"filter_id": "1"})
		})
	}
	m.HandleFunc("POST /_matrix/client/v3/keys/upload", s.serveKeysUpload)
	m.HandleFunc("POST /_matrix/client/v3/keys/query", s.serveKeysQuery)
	m.HandleFunc("POST /_matrix/client/v3/keys/claim", s.serveKeysClaim)
	m.HandleFunc("PUT /_matrix/client/v3/sendToDevice/{type}/{txn}", s.serveSendToDevice)
	m.HandleFunc("PUT /_matrix/client/v3/rooms/{roomID}/send/{type}/{txn}", s.serveRoomSend)
	m.HandleFunc("GET /_matrix/client/v3/rooms/{roomID}/members", s.serveMembers)
	m.HandleFunc("GET /_matrix/client/v3/rooms/{roomID}/joined_members", s.serveJoinedMembers)
	m.HandleFunc("GET /_matrix/client/v3/rooms/{roomID}/state", s.serveState)
	m.HandleFunc("GET /_matrix/client/v3/rooms/{roomID}/state/{type}/{key...}", s.serveState)
	m.HandleFunc("POST /_matrix/client/v3/join/{roomID}", s.serveJoin)
	m.HandleFunc("POST /_matrix/client/v3/rooms/{roomID}/join", s.serveJoin)
	m.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusNotFound, "M_UNRECOGNIZED", "unrecognized request")
		s.observe(Event{Kind: KindOther, Path: r.Method + " " + r.URL.Path, Status: http.StatusNotFound})
	})
}

func (s *Server) serveVersions(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, map[string]any{
		"versions":          []string{"v1.1", "v1.5", "v1.11"},
		"unstable_features": map[string]bool{"org.matrix.simplified_msc3575": s.opts.API == APISliding},
	})
}

// uploadRequest is the part of /keys/upload the server keeps.
type uploadRequest struct {
	DeviceKeys           json.RawMessage            `json:"device_keys"`
	OneTimeKeys          map[string]json.RawMessage `json:"one_time_keys"`
	FallbackKeys         map[string]json.RawMessage `json:"fallback_keys"`
	FallbackKeysUnstable map[string]json.RawMessage `json:"org.matrix.msc2732.fallback_keys"`
}

func (s *Server) serveKeysUpload(w http.ResponseWriter, r *http.Request) {
	var req uploadRequest
	if !readJSON(w, r, &req) {
		return
	}
	hasDevice := len(req.DeviceKeys) > 0 && string(req.DeviceKeys) != "null"
	fallback := len(req.FallbackKeys) > 0 || len(req.FallbackKeysUnstable) > 0
	s.mu.Lock()
	if hasDevice {
		s.botKeys = req.DeviceKeys
	}
	s.otkCount += len(req.OneTimeKeys)
	if fallback {
		s.fallback = true
	}
	count := s.otkCount
	s.mu.Unlock()
	writeJSON(w, map[string]any{"one_time_key_counts": map[string]int{"signed_curve25519": count}})
	s.observe(Event{Kind: KindKeysUpload, DeviceKeys: hasDevice, OTKs: len(req.OneTimeKeys), Fallback: fallback})
}

func (s *Server) peer(u id.UserID) *Peer {
	for _, p := range s.acct.Peers {
		if p.UserID == u {
			return p
		}
	}
	return nil
}

func (s *Server) serveKeysQuery(w http.ResponseWriter, r *http.Request) {
	var req struct {
		DeviceKeys map[id.UserID][]id.DeviceID `json:"device_keys"`
	}
	if !readJSON(w, r, &req) {
		return
	}
	out := make(map[id.UserID]map[id.DeviceID]json.RawMessage, len(req.DeviceKeys))
	users := make([]id.UserID, 0, len(req.DeviceKeys))
	s.mu.Lock()
	for u := range req.DeviceKeys {
		users = append(users, u)
		devs := map[id.DeviceID]json.RawMessage{}
		if u == BotUserID && s.botKeys != nil {
			devs[BotDeviceID] = s.botKeys
		} else if p := s.peer(u); p != nil {
			devs[p.DeviceID] = p.DeviceKeys
		}
		out[u] = devs
	}
	s.mu.Unlock()
	slices.Sort(users)
	writeJSON(w, map[string]any{
		"device_keys": out, "failures": map[string]any{},
		"master_keys": map[string]any{}, "self_signing_keys": map[string]any{}, "user_signing_keys": map[string]any{},
	})
	s.observe(Event{Kind: KindKeysQuery, Users: users})
}

func (s *Server) serveKeysClaim(w http.ResponseWriter, r *http.Request) {
	var req struct {
		OneTimeKeys map[id.UserID]map[id.DeviceID]string `json:"one_time_keys"`
	}
	if !readJSON(w, r, &req) {
		return
	}
	out := map[id.UserID]map[id.DeviceID]any{}
	s.mu.Lock()
	for u, devs := range req.OneTimeKeys {
		p := s.peer(u)
		if p == nil {
			continue
		}
		if _, ok := devs[p.DeviceID]; !ok || s.claimed[u] >= len(p.OTKs) {
			continue
		}
		out[u] = map[id.DeviceID]any{p.DeviceID: p.OTKs[s.claimed[u]]}
		s.claimed[u]++
	}
	s.mu.Unlock()
	writeJSON(w, map[string]any{"one_time_keys": out, "failures": map[string]any{}})
	s.observe(Event{Kind: KindKeysClaim})
}

func (s *Server) serveSendToDevice(w http.ResponseWriter, r *http.Request) {
	_, _ = io.Copy(io.Discard, r.Body)
	writeJSON(w, map[string]any{})
	s.observe(Event{Kind: KindSendToDevice, EventType: r.PathValue("type")})
}

func (s *Server) roomIndex(w http.ResponseWriter, r *http.Request) (int, bool) {
	idx, ok := s.roomIdx[id.RoomID(r.PathValue("roomID"))]
	if !ok {
		writeError(w, http.StatusNotFound, "M_NOT_FOUND", "unknown room")
	}
	return idx, ok
}

func (s *Server) serveRoomSend(w http.ResponseWriter, r *http.Request) {
	idx, ok := s.roomIndex(w, r)
	if !ok {
		return
	}
	var content json.RawMessage
	if !readJSON(w, r, &content) {
		return
	}
	typ := r.PathValue("type")
	s.mu.Lock()
	evtID := s.addLocked(idx, BotUserID, typ, content)
	s.mu.Unlock()
	writeJSON(w, map[string]any{"event_id": evtID})
	s.observe(Event{Kind: KindRoomSend, RoomID: s.acct.Rooms[idx].ID, EventType: typ})
}

// currentState is the room's state after its timeline.
func (rm *Room) currentState() []StoredEvent {
	out := make([]StoredEvent, 0, len(rm.State)+1)
	out = append(out, rm.State...)
	for _, ev := range rm.Timeline {
		if ev.StateKey != nil {
			out = append(out, ev)
		}
	}
	return out
}

func (s *Server) serveMembers(w http.ResponseWriter, r *http.Request) {
	idx, ok := s.roomIndex(w, r)
	if !ok {
		return
	}
	var chunk []json.RawMessage
	for _, ev := range s.acct.Rooms[idx].currentState() {
		if ev.Type == "m.room.member" {
			chunk = append(chunk, ev.JSON)
		}
	}
	writeJSON(w, map[string]any{"chunk": chunk})
	s.observe(Event{Kind: KindOther, Path: "members", Status: http.StatusOK})
}

func (s *Server) serveJoinedMembers(w http.ResponseWriter, r *http.Request) {
	idx, ok := s.roomIndex(w, r)
	if !ok {
		return
	}
	joined := map[id.UserID]any{}
	for _, m := range s.acct.Rooms[idx].Members {
		joined[m] = map[string]any{"display_name": displayName(m)}
	}
	writeJSON(w, map[string]any{"joined": joined})
	s.observe(Event{Kind: KindOther, Path: "joined_members", Status: http.StatusOK})
}

func (s *Server) serveState(w http.ResponseWriter, r *http.Request) {
	idx, ok := s.roomIndex(w, r)
	if !ok {
		return
	}
	state := s.acct.Rooms[idx].currentState()
	typ := r.PathValue("type")
	if typ == "" {
		out := make([]json.RawMessage, len(state))
		for i, ev := range state {
			out[i] = ev.JSON
		}
		writeJSON(w, out)
		return
	}
	key := r.PathValue("key")
	for _, ev := range state {
		if ev.Type == typ && *ev.StateKey == key {
			var full struct {
				Content json.RawMessage `json:"content"`
			}
			_ = json.Unmarshal(ev.JSON, &full)
			writeJSON(w, full.Content)
			return
		}
	}
	writeError(w, http.StatusNotFound, "M_NOT_FOUND", "no such state")
}

func (s *Server) serveJoin(w http.ResponseWriter, r *http.Request) {
	_, _ = io.Copy(io.Discard, r.Body)
	roomID := id.RoomID(r.PathValue("roomID"))
	writeJSON(w, map[string]any{"room_id": roomID})
	s.observe(Event{Kind: KindJoin, RoomID: roomID})
}

// maxBody bounds what the server reads from a request.
const maxBody = 16 << 20

func readJSON(w http.ResponseWriter, r *http.Request, v any) bool {
	body, err := io.ReadAll(io.LimitReader(r.Body, maxBody))
	if err == nil && len(body) > 0 {
		err = json.Unmarshal(body, v)
	}
	if err != nil {
		writeError(w, http.StatusBadRequest, "M_BAD_JSON", err.Error())
		return false
	}
	return true
}

func writeJSON(w http.ResponseWriter, v any) int {
	body, err := json.Marshal(v)
	if err != nil {
		writeError(w, http.StatusInternalServerError, "M_UNKNOWN", err.Error())
		return 0
	}
	return writeBody(w, http.StatusOK, body)
}

func writeBody(w http.ResponseWriter, status int, body []byte) int {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_, _ = w.Write(body)
	return len(body)
}

func writeError(w http.ResponseWriter, status int, errcode, msg string) {
	body, _ := json.Marshal(map[string]string{"errcode": errcode, "error": msg})
	writeBody(w, status, body)
}

// countingListener counts the bytes of every accepted connection.
type countingListener struct {
	net.Listener
	s *Server
}

func (l *countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return &countingConn{Conn: c, s: l.s}, nil
}

type countingConn struct {
	net.Conn
	s *Server
}

func (c *countingConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	c.s.bytesIn.Add(int64(n))
	return n, err
}

func (c *countingConn) Write(p []byte) (int, error) {
	n, err := c.Conn.Write(p)
	c.s.bytesOut.Add(int64(n))
	return n, err
}

// waitForChange waits until something changes, the hold ends or the request is cancelled.
func (s *Server) waitForChange(ctx context.Context, wake <-chan struct{}, timeoutMS int64) {
	hold := min(time.Duration(timeoutMS)*time.Millisecond, s.opts.IdleHold)
	if hold <= 0 {
		return
	}
	t := time.NewTimer(hold)
	defer t.Stop()
	select {
	case <-wake:
	case <-t.C:
	case <-ctx.Done():
	}
}

var errUnknownPos = errors.New("unknown pos")
