package demohs

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/rs/zerolog"
	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/sliding-e2ee/sdk/slidingsync"
	"github.com/sliding-e2ee/sdk/slidingsync/slidingsynctest"
)

// Defaults of [Options].
const (
	DefaultServerName  = "demo.invalid"
	DefaultRooms       = 2000
	DefaultBotDeviceID = id.DeviceID("E2EEBOT")
	DefaultBotToken    = "demo-bot-token"
)

// DefaultPollTimeout caps a sync request's long-poll, whatever it asks for, when
// Options.PollTimeout is zero.
const DefaultPollTimeout = 30 * time.Second

// Options configures a [Server]. Every zero value is usable.
type Options struct {
	// ServerName is the server part of generated IDs; empty means DefaultServerName.
	ServerName string
	// Rooms is how many plain rooms the bot is in; 0 means DefaultRooms, negative none.
	Rooms int
	// Seed drives room IDs, names and members; the same seed gives the same rooms.
	Seed uint64
	// BotUserID is the bot's user; empty means @bot:<ServerName>.
	BotUserID id.UserID
	// BotDeviceID is the bot's device; empty means DefaultBotDeviceID.
	BotDeviceID id.DeviceID
	// BotToken is the bot's access token; empty means DefaultBotToken.
	BotToken string
	// Dir holds the peers' crypto databases; empty means a temporary directory removed by
	// Close.
	Dir string
	// Log receives the peers' mautrix logs; nil means none.
	Log *zerolog.Logger
	// PollTimeout caps every sync long-poll, whatever the request asks for; zero means
	// DefaultPollTimeout. A short one makes idle long-polls (answered with the request's
	// pos) come often.
	PollTimeout time.Duration
	// BotPassword is the password POST /login accepts for the bot, answering with the bot's
	// device and token; empty means DefaultBotPassword.
	BotPassword string
	// NoTxnDedup makes a room send with a transaction ID the server has seen add a new
	// event, as Dendrite does after a send whose response was lost (it remembers
	// transaction IDs only after a response, and only in memory). False: the same
	// transaction ID from the same device gets the first event ID back.
	NoTxnDedup bool
	// SendFault, when set, is asked about every room send of the bot before it is handled;
	// nil means every send is answered normally.
	SendFault func(roomID id.RoomID, txnID string) SendFault
}

// DefaultBotPassword is Options.BotPassword when it is empty.
const DefaultBotPassword = "demo-bot-password"

// SendFault is what the server does with one room send.
type SendFault int

const (
	// SendAnswer stores the event and answers.
	SendAnswer SendFault = iota
	// SendStoreDropResponse stores the event and then breaks the connection without an
	// answer: the client sees a network error for a send that happened.
	SendStoreDropResponse
	// SendStoreHang stores the event and then answers nothing until the client goes away
	// (a crash test kills the client meanwhile).
	SendStoreHang
)

func (o Options) withDefaults() Options {
	if o.ServerName == "" {
		o.ServerName = DefaultServerName
	}
	if o.Rooms == 0 {
		o.Rooms = DefaultRooms
	}
	if o.Rooms < 0 {
		o.Rooms = 0
	}
	if o.BotUserID == "" {
		o.BotUserID = id.NewUserID("bot", o.ServerName)
	}
	if o.BotDeviceID == "" {
		o.BotDeviceID = DefaultBotDeviceID
	}
	if o.BotToken == "" {
		o.BotToken = DefaultBotToken
	}
	if o.PollTimeout <= 0 {
		o.PollTimeout = DefaultPollTimeout
	}
	if o.BotPassword == "" {
		o.BotPassword = DefaultBotPassword
	}
	return o
}

// devRef names one device.
type devRef struct {
	user   id.UserID
	device id.DeviceID
}

// stateEntry is one current state event and the stream position it was set at.
type stateEntry struct {
	stream int64
	evt    *event.Event
}

// timelineEntry is one event of a room's timeline.
type timelineEntry struct {
	stream int64
	evt    *event.Event
}

// room is one room on the server.
type room struct {
	id        id.RoomID
	generated int   // index among the generated rooms, -1 for a room created while serving
	created   int64 // stream position of its creation
	changed   int64 // stream position of its last event
	botStream int64 // stream position of the bot's last membership change
	state     map[[2]string]stateEntry
	order     [][2]string // state keys in the order they were first set
	timeline  []timelineEntry
}

func (r *room) membership(user id.UserID) event.Membership {
	e, ok := r.state[[2]string{event.StateMember.Type, user.String()}]
	if !ok {
		return ""
	}
	m, _ := e.evt.Content.Raw["membership"].(string)
	return event.Membership(m)
}

// Server is the demo homeserver. Create it with [NewServer] and Close it when done. It is
// safe for concurrent use.
type Server struct {
	opts Options
	ss   *slidingsynctest.Server
	hs   *httptest.Server
	dir  string
	ownD bool // dir was made by NewServer

	mu        sync.Mutex
	changed   chan struct{} // closed and replaced on every change
	stream    int64
	eventSeq  int64
	rooms     map[id.RoomID]*room
	live      []id.RoomID // rooms created while serving, newest first
	generated []id.RoomID
	tokens    map[string]devRef
	devices   map[id.UserID]map[id.DeviceID]*device
	devOrder  map[id.UserID][]id.DeviceID
	devLists  []devChange
	txns      map[string]id.EventID
	sentTxn   map[id.EventID]sentBy // the device and transaction ID of each room send
	logins    int
	logouts   int
	toDevSeq  int64
	toDevTxns map[string]bool
	keysAt    int64 // stream position of the last change of the bot's key counts
	posSeq    int64 // responses served
	peers     int
	peerDBs   []*dbutil.Database
	closed    bool

	held             int            // HoldSync calls not released yet
	toDeviceHeld     int            // HoldToDevice calls not released yet
	uploadRejections int            // uploads rejected for a one-time key ID reused with another key
	repeatedSends    int            // room sends that repeated a transaction ID
	storedSends      map[string]int // events stored per device and transaction ID

	uploads   []Upload
	queries   []Query
	claims    []Claim
	decrypted []Decryption
	syncs     []SyncRequest
}

// devChange is one device-list change.
type devChange struct {
	stream int64
	user   id.UserID
}

// NewServer generates the bot's rooms and starts the server on 127.0.0.1.
func NewServer(opts Options) (*Server, error) {
	opts = opts.withDefaults()
	s := &Server{
		opts:      opts,
		changed:   make(chan struct{}),
		rooms:     make(map[id.RoomID]*room, opts.Rooms+1),
		tokens:    map[string]devRef{opts.BotToken: {opts.BotUserID, opts.BotDeviceID}},
		devices:   map[id.UserID]map[id.DeviceID]*device{},
		devOrder:  map[id.UserID][]id.DeviceID{},
		txns:      map[string]id.EventID{},
		sentTxn:   map[id.EventID]sentBy{},
		toDevTxns: map[string]bool{},
		dir:       opts.Dir,

		storedSends: map[string]int{},
	}
	s.addDevice(opts.BotUserID, opts.BotDeviceID)
	if s.dir == "" {
		dir, err := os.MkdirTemp("", "demohs")
		if err != nil {
			return nil, err
		}
		s.dir, s.ownD = dir, true
	}
	s.generate()
	s.ss = slidingsynctest.NewServer(slidingsynctest.Options{
		Protocol:    slidingsync.ProtocolMSC4186,
		Personality: slidingsynctest.PersonalitySynapse,
		UserID:      opts.BotUserID,
		DeviceID:    opts.BotDeviceID,
		AccessToken: opts.BotToken,
	})
	s.ss.SetResponder(s.respond)
	s.hs = httptest.NewServer(s.routes())
	return s, nil
}

// URL returns the server's base URL (http://127.0.0.1:port).
func (s *Server) URL() string { return s.hs.URL }

// Bot returns the bot's user ID, device ID and access token.
func (s *Server) Bot() (id.UserID, id.DeviceID, string) {
	return s.opts.BotUserID, s.opts.BotDeviceID, s.opts.BotToken
}

// Rooms returns how many rooms the bot is joined to or invited to.
func (s *Server) Rooms() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.listLocked())
}

// SyncRequests returns the sliding sync requests so far, in arrival order: when each arrived
// (before its long-poll), when it was answered and the positions on both sides.
func (s *Server) SyncRequests() []SyncRequest {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.syncs)
}

// Membership returns user's membership in roomID, empty if none.
func (s *Server) Membership(roomID id.RoomID, user id.UserID) event.Membership {
	s.mu.Lock()
	defer s.mu.Unlock()
	if r := s.rooms[roomID]; r != nil {
		return r.membership(user)
	}
	return ""
}

// Close stops the server, answers waiting sync requests with 503 and removes the temporary
// directory. The peers must not be used afterwards.
func (s *Server) Close() {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return
	}
	s.closed = true
	s.notifyLocked()
	dbs := s.peerDBs
	s.mu.Unlock()
	s.ss.Close()
	s.hs.CloseClientConnections()
	s.hs.Close()
	for _, db := range dbs {
		_ = db.Close()
	}
	if s.ownD {
		_ = os.RemoveAll(s.dir)
	}
}

// WaitFor calls cond whenever the server's state changes (and at least every 50 ms, for
// conditions on things outside the server) until it returns true or ctx is done. cond is
// called without the server's lock, so it may call the Server's methods.
func (s *Server) WaitFor(ctx context.Context, cond func() bool) error {
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		s.mu.Lock()
		ch := s.changed
		s.mu.Unlock()
		if cond() {
			return nil
		}
		select {
		case <-ctx.Done():
			return context.Cause(ctx)
		case <-ch:
		case <-tick.C:
		}
	}
}

// notifyLocked wakes every waiter. Caller holds s.mu.
func (s *Server) notifyLocked() {
	close(s.changed)
	s.changed = make(chan struct{})
}

// nextStream advances the stream. Caller holds s.mu.
func (s *Server) nextStream() int64 {
	s.stream++
	s.notifyLocked()
	return s.stream
}

var roomWords = []string{"harbour", "ops", "garden", "release", "support", "chess", "infra", "music", "travel", "books", "lunch", "alerts"}

// generate builds the plain rooms from the seed: create, join rules, name, the creator and the
// bot joined (no history visibility: it defaults to shared), and one notice older than any bot.
func (s *Server) generate() {
	rng := rand.New(rand.NewPCG(s.opts.Seed, s.opts.Seed^0x9e3779b97f4a7c15))
	old := time.Date(2024, 1, 1, 0, 0, 0, 0, time.UTC).UnixMilli()
	for i := range s.opts.Rooms {
		roomID := id.RoomID(fmt.Sprintf("!r%05d%06x:%s", i, rng.Uint32()&0xffffff, s.opts.ServerName))
		creator := id.NewUserID(fmt.Sprintf("user%04d", rng.IntN(500)), s.opts.ServerName)
		r := &room{id: roomID, generated: i, state: map[[2]string]stateEntry{}}
		ts := old - int64(i)*60_000
		add := func(typ, stateKey string, sender id.UserID, content map[string]any) {
			evt := s.newEvent(roomID, event.Type{Type: typ, Class: event.StateEventType}, &stateKey, sender, content, ts)
			s.setState(r, evt, 0)
		}
		add(event.StateCreate.Type, "", creator, map[string]any{"room_version": "10", "creator": creator})
		add(event.StateJoinRules.Type, "", creator, map[string]any{"join_rule": "invite"})
		add(event.StateRoomName.Type, "", creator, map[string]any{"name": fmt.Sprintf("Room %d %s", i, roomWords[rng.IntN(len(roomWords))])})
		add(event.StateMember.Type, creator.String(), creator, map[string]any{"membership": "join"})
		add(event.StateMember.Type, s.opts.BotUserID.String(), s.opts.BotUserID, map[string]any{"membership": "join"})
		msg := s.newEvent(roomID, event.EventMessage, nil, creator, map[string]any{"msgtype": "m.notice", "body": fmt.Sprintf("status report %d", rng.IntN(1_000_000))}, ts+1000)
		r.timeline = append(r.timeline, timelineEntry{stream: 0, evt: msg})
		s.rooms[roomID] = r
		s.generated = append(s.generated, roomID)
	}
}

// newEvent builds an event with a fresh ID. Caller holds s.mu or is generating.
func (s *Server) newEvent(roomID id.RoomID, typ event.Type, stateKey *string, sender id.UserID, content map[string]any, ts int64) *event.Event {
	s.eventSeq++
	return &event.Event{
		Type:      typ,
		StateKey:  stateKey,
		Sender:    sender,
		ID:        id.EventID(fmt.Sprintf("$e%d-%s", s.eventSeq, s.opts.ServerName)),
		RoomID:    roomID,
		Timestamp: ts,
		Content:   event.Content{Raw: content},
	}
}

// setState makes evt current state of r at stream position at.
func (s *Server) setState(r *room, evt *event.Event, at int64) {
	key := [2]string{evt.Type.Type, *evt.StateKey}
	if _, ok := r.state[key]; !ok {
		r.order = append(r.order, key)
	}
	r.state[key] = stateEntry{stream: at, evt: evt}
}

// appendLocked adds evt to r's timeline (and to its state when it is a state event) at a new
// stream position. Caller holds s.mu.
func (s *Server) appendLocked(r *room, evt *event.Event) int64 {
	at := s.nextStream()
	r.timeline = append(r.timeline, timelineEntry{stream: at, evt: evt})
	r.changed = at
	if evt.StateKey != nil {
		s.setState(r, evt, at)
		if evt.Type == event.StateMember && *evt.StateKey == s.opts.BotUserID.String() {
			r.botStream = at
		}
	}
	return at
}

// listLocked returns the bot's rooms in list order: rooms created while serving, newest
// first, then the generated ones. Caller holds s.mu.
func (s *Server) listLocked() []id.RoomID {
	out := make([]id.RoomID, 0, len(s.live)+len(s.generated))
	for _, roomID := range s.live {
		switch s.rooms[roomID].membership(s.opts.BotUserID) {
		case event.MembershipJoin, event.MembershipInvite:
			out = append(out, roomID)
		}
	}
	return append(out, s.generated...)
}

// createRoomLocked creates an encrypted room with creator joined and the others invited.
// Caller holds s.mu.
func (s *Server) createRoomLocked(creator id.UserID, name string, invite []id.UserID, encrypted bool) id.RoomID {
	roomID := id.RoomID(fmt.Sprintf("!live%d:%s", len(s.live)+1, s.opts.ServerName))
	r := &room{id: roomID, generated: -1, state: map[[2]string]stateEntry{}}
	s.rooms[roomID] = r
	r.created = s.stream + 1
	now := time.Now().UnixMilli()
	add := func(typ, stateKey string, sender id.UserID, content map[string]any) {
		s.appendLocked(r, s.newEvent(roomID, event.Type{Type: typ, Class: event.StateEventType}, &stateKey, sender, content, now))
	}
	add(event.StateCreate.Type, "", creator, map[string]any{"room_version": "10", "creator": creator})
	add(event.StateMember.Type, creator.String(), creator, map[string]any{"membership": "join"})
	add(event.StateJoinRules.Type, "", creator, map[string]any{"join_rule": "invite"})
	add(event.StateHistoryVisibility.Type, "", creator, map[string]any{"history_visibility": "shared"})
	add(event.StateRoomName.Type, "", creator, map[string]any{"name": name})
	if encrypted {
		add(event.StateEncryption.Type, "", creator, map[string]any{"algorithm": id.AlgorithmMegolmV1})
	}
	for _, u := range invite {
		add(event.StateMember.Type, u.String(), creator, map[string]any{"membership": "invite"})
	}
	s.live = slices.Insert(s.live, 0, roomID)
	return roomID
}

// routes returns the server's handler.
func (s *Server) routes() http.Handler {
	mux := http.NewServeMux()
	const v3 = "/_matrix/client/v3"
	mux.Handle("GET "+slidingsynctest.VersionsPath, s.ss)
	mux.HandleFunc("POST /_matrix/client/unstable/org.matrix.simplified_msc3575/sync", s.serveSync)
	mux.HandleFunc("POST "+v3+"/login", s.login)
	mux.HandleFunc("GET "+v3+"/account/whoami", s.auth(s.whoami))
	mux.HandleFunc("POST "+v3+"/logout", s.auth(s.logout))
	mux.HandleFunc("POST "+v3+"/keys/upload", s.auth(s.keysUpload))
	mux.HandleFunc("POST "+v3+"/keys/query", s.auth(s.keysQuery))
	mux.HandleFunc("POST "+v3+"/keys/claim", s.auth(s.keysClaim))
	mux.HandleFunc("PUT "+v3+"/sendToDevice/{type}/{txn}", s.auth(s.sendToDevice))
	mux.HandleFunc("PUT "+v3+"/rooms/{room}/send/{type}/{txn}", s.auth(s.roomSend))
	mux.HandleFunc("POST "+v3+"/join/{room}", s.auth(s.join))
	mux.HandleFunc("POST "+v3+"/rooms/{room}/join", s.auth(s.join))
	mux.HandleFunc("GET "+v3+"/rooms/{room}/members", s.auth(s.members))
	mux.HandleFunc("GET "+v3+"/rooms/{room}/messages", s.auth(s.messages))
	mux.HandleFunc("GET "+v3+"/rooms/{room}/state/{type}", s.auth(s.stateEvent))
	mux.HandleFunc("GET "+v3+"/rooms/{room}/state/{type}/{key...}", s.auth(s.stateEvent))
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusNotFound, "M_UNRECOGNIZED", "Unrecognized request")
	})
	return mux
}

// auth resolves the access token to a device.
func (s *Server) auth(fn func(w http.ResponseWriter, r *http.Request, who devRef)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		token, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		s.mu.Lock()
		who, known := s.tokens[token]
		s.mu.Unlock()
		if !ok || !known {
			writeError(w, http.StatusUnauthorized, "M_UNKNOWN_TOKEN", "Invalid access token passed.")
			return
		}
		fn(w, r, who)
	}
}

func (s *Server) whoami(w http.ResponseWriter, _ *http.Request, who devRef) {
	writeJSON(w, http.StatusOK, map[string]any{"user_id": who.user, "device_id": who.device})
}

// sentBy is the device that sent an event and the transaction ID it used.
type sentBy struct {
	dev devRef
	txn string
}

// roomSend appends an event to a room's timeline. A repeated transaction ID of the same
// device gets the first event ID back and adds nothing, unless Options.NoTxnDedup.
// Options.SendFault may lose the answer to a send that was stored.
func (s *Server) roomSend(w http.ResponseWriter, r *http.Request, who devRef) {
	roomID := id.RoomID(r.PathValue("room"))
	var content map[string]any
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<20)).Decode(&content); err != nil || content == nil {
		writeError(w, http.StatusBadRequest, "M_NOT_JSON", "Content not JSON.")
		return
	}
	txn := r.PathValue("txn")
	fault := SendAnswer
	if s.opts.SendFault != nil && who.user == s.opts.BotUserID {
		fault = s.opts.SendFault(roomID, txn)
	}
	s.mu.Lock()
	txnKey := fmt.Sprintf("%s\x00%s\x00%s", who.user, who.device, txn)
	if evtID, ok := s.txns[txnKey]; ok && !s.opts.NoTxnDedup {
		s.repeatedSends++
		s.mu.Unlock()
		writeJSON(w, http.StatusOK, map[string]any{"event_id": evtID})
		return
	}
	rm := s.rooms[roomID]
	if rm == nil || rm.membership(who.user) != event.MembershipJoin {
		s.mu.Unlock()
		writeError(w, http.StatusForbidden, "M_FORBIDDEN", "User not in room.")
		return
	}
	evt := s.newEvent(roomID, event.Type{Type: r.PathValue("type"), Class: event.MessageEventType}, nil, who.user, content, time.Now().UnixMilli())
	s.appendLocked(rm, evt)
	s.txns[txnKey] = evt.ID
	s.sentTxn[evt.ID] = sentBy{who, txn}
	s.storedSends[txnKey]++
	s.mu.Unlock()
	switch fault {
	case SendStoreDropResponse:
		panic(http.ErrAbortHandler)
	case SendStoreHang:
		<-r.Context().Done()
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{"event_id": evt.ID})
}

// DuplicateSends returns how many events were stored beyond the first for one device's
// transaction ID: sends the server stored twice (only with Options.NoTxnDedup).
func (s *Server) DuplicateSends() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, c := range s.storedSends {
		n += c - 1
	}
	return n
}

// viewLocked returns evt as the device viewer sees it: with unsigned.transaction_id when
// viewer sent it, as the client-server API specifies. Caller holds s.mu.
func (s *Server) viewLocked(evt *event.Event, viewer devRef) *event.Event {
	sb, ok := s.sentTxn[evt.ID]
	if !ok || sb.dev != viewer {
		return evt
	}
	cp := *evt
	cp.Unsigned.TransactionID = sb.txn
	return &cp
}

// login answers POST /login for the bot's password with the bot's device and token.
func (s *Server) login(w http.ResponseWriter, r *http.Request) {
	var req struct {
		Type       string `json:"type"`
		Identifier struct {
			User string `json:"user"`
		} `json:"identifier"`
		Password string `json:"password"`
	}
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<20)).Decode(&req); err != nil {
		writeError(w, http.StatusBadRequest, "M_NOT_JSON", "Content not JSON.")
		return
	}
	user := req.Identifier.User
	if !strings.HasPrefix(user, "@") {
		user = id.NewUserID(user, s.opts.ServerName).String()
	}
	if req.Type != "m.login.password" || id.UserID(user) != s.opts.BotUserID || req.Password != s.opts.BotPassword {
		writeError(w, http.StatusForbidden, "M_FORBIDDEN", "Invalid username or password")
		return
	}
	s.mu.Lock()
	s.logins++
	s.tokens[s.opts.BotToken] = devRef{s.opts.BotUserID, s.opts.BotDeviceID}
	s.mu.Unlock()
	writeJSON(w, http.StatusOK, map[string]any{
		"user_id": s.opts.BotUserID, "device_id": s.opts.BotDeviceID, "access_token": s.opts.BotToken,
	})
}

// logout forgets the access token and the device's keys, as a server deleting the device
// does. The bot's next login gets the same device ID back (the server keeps one device for
// it), without keys.
func (s *Server) logout(w http.ResponseWriter, r *http.Request, who devRef) {
	token, _ := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	s.mu.Lock()
	delete(s.tokens, token)
	// The device's keys go with it: a device logged in again under the ID starts without.
	s.devices[who.user][who.device] = &device{seen: map[id.KeyID]string{}}
	s.logouts++
	s.mu.Unlock()
	writeJSON(w, http.StatusOK, map[string]any{})
}

// Logouts returns how many logouts the server answered.
func (s *Server) Logouts() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.logouts
}

// Logins returns how many password logins the server answered.
func (s *Server) Logins() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.logins
}

// join joins a room the user is invited to (or already in).
func (s *Server) join(w http.ResponseWriter, r *http.Request, who devRef) {
	roomID := id.RoomID(r.PathValue("room"))
	s.mu.Lock()
	defer s.mu.Unlock()
	rm := s.rooms[roomID]
	if rm == nil {
		writeError(w, http.StatusNotFound, "M_NOT_FOUND", "No such room.")
		return
	}
	switch rm.membership(who.user) {
	case event.MembershipJoin:
	case event.MembershipInvite:
		sk := who.user.String()
		s.appendLocked(rm, s.newEvent(roomID, event.StateMember, &sk, who.user, map[string]any{"membership": "join"}, time.Now().UnixMilli()))
	default:
		writeError(w, http.StatusForbidden, "M_FORBIDDEN", "You are not invited to this room.")
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{"room_id": roomID})
}

// stateEvent returns the content of one current state event of a room the user is in.
func (s *Server) stateEvent(w http.ResponseWriter, r *http.Request, who devRef) {
	roomID := id.RoomID(r.PathValue("room"))
	s.mu.Lock()
	defer s.mu.Unlock()
	rm := s.rooms[roomID]
	if rm == nil || rm.membership(who.user) != event.MembershipJoin {
		writeError(w, http.StatusForbidden, "M_FORBIDDEN", "User not in room.")
		return
	}
	e, ok := rm.state[[2]string{r.PathValue("type"), r.PathValue("key")}]
	if !ok {
		writeError(w, http.StatusNotFound, "M_NOT_FOUND", "Event not found.")
		return
	}
	writeJSON(w, http.StatusOK, e.evt.Content.Raw)
}

// members returns the room's member events.
func (s *Server) members(w http.ResponseWriter, r *http.Request, who devRef) {
	roomID := id.RoomID(r.PathValue("room"))
	s.mu.Lock()
	defer s.mu.Unlock()
	rm := s.rooms[roomID]
	if rm == nil || rm.membership(who.user) == "" {
		writeError(w, http.StatusForbidden, "M_FORBIDDEN", "User not in room.")
		return
	}
	chunk := []*event.Event{}
	for _, key := range rm.order {
		if key[0] == event.StateMember.Type {
			chunk = append(chunk, rm.state[key].evt)
		}
	}
	writeJSON(w, http.StatusOK, map[string]any{"chunk": chunk})
}

// messages pages backwards through a room's timeline (dir=b only): from "s<stream>" (a
// prev_batch of a limited sync timeline, or the end of an earlier page), or from the end
// without from, it returns up to limit events older than that position, newest first.
func (s *Server) messages(w http.ResponseWriter, r *http.Request, who devRef) {
	roomID := id.RoomID(r.PathValue("room"))
	q := r.URL.Query()
	from := int64(math.MaxInt64)
	if q.Get("dir") != "b" {
		writeError(w, http.StatusBadRequest, "M_INVALID_PARAM", "Only dir=b.")
		return
	}
	if f := q.Get("from"); f != "" {
		if _, err := fmt.Sscanf(f, "s%d", &from); err != nil {
			writeError(w, http.StatusBadRequest, "M_INVALID_PARAM", "Only a from token of this server.")
			return
		}
	}
	limit, err := strconv.Atoi(q.Get("limit"))
	if err != nil || limit <= 0 || limit > 1000 {
		limit = 10
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	rm := s.rooms[roomID]
	if rm == nil || rm.membership(who.user) != event.MembershipJoin {
		writeError(w, http.StatusForbidden, "M_FORBIDDEN", "User not in room.")
		return
	}
	chunk := []*event.Event{}
	end := ""
	for i := len(rm.timeline) - 1; i >= 0 && len(chunk) < limit; i-- {
		if e := rm.timeline[i]; e.stream < from {
			chunk = append(chunk, s.viewLocked(e.evt, who))
			end = fmt.Sprintf("s%d", e.stream)
		}
	}
	resp := map[string]any{"start": q.Get("from"), "chunk": chunk}
	if len(chunk) == limit {
		resp["end"] = end
	}
	writeJSON(w, http.StatusOK, resp)
}

// HoldSync makes the bot's long-polls wait whatever changes (until their timeout) until
// release is called, so that a script can act several times before the bot hears of any of
// it, as when a bot is slow or briefly offline.
func (s *Server) HoldSync() (release func()) {
	s.mu.Lock()
	s.held++
	s.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			s.mu.Lock()
			s.held--
			s.notifyLocked()
			s.mu.Unlock()
		})
	}
}

// HoldToDevice keeps the bot's to-device messages (room keys) out of its sync responses until
// release is called, while everything else is delivered: the bot then sees encrypted
// messages before their room keys, as a client does when a key is slow to arrive.
func (s *Server) HoldToDevice() (release func()) {
	s.mu.Lock()
	s.toDeviceHeld++
	s.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			s.mu.Lock()
			s.toDeviceHeld--
			s.notifyLocked()
			s.mu.Unlock()
		})
	}
}

// RoomEvents returns a copy of the timeline of roomID, oldest first.
func (s *Server) RoomEvents(roomID id.RoomID) []*event.Event {
	s.mu.Lock()
	defer s.mu.Unlock()
	rm := s.rooms[roomID]
	if rm == nil {
		return nil
	}
	out := make([]*event.Event, 0, len(rm.timeline))
	for _, e := range rm.timeline {
		out = append(out, e.evt)
	}
	return out
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	body, err := json.Marshal(v)
	if err != nil {
		status, body = http.StatusInternalServerError, []byte(`{"errcode":"M_UNKNOWN","error":"encode"}`)
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_, _ = w.Write(body)
}

func writeError(w http.ResponseWriter, status int, errcode, msg string) {
	writeJSON(w, status, map[string]string{"errcode": errcode, "error": msg})
}

var errClosed = errors.New("demohs: server closed")
