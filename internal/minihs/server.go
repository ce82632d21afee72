package minihs

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/sliding-e2ee/sdk/slidingsync"
	"github.com/sliding-e2ee/sdk/slidingsync/slidingsynctest"
)

// DefaultRooms is how many rooms the bot is in when Options.Account and Options.Rooms are
// zero.
const DefaultRooms = 2000

// DefaultIdleHold caps a sync request's long-poll, whatever it asks for, when
// Options.IdleHold is zero.
const DefaultIdleHold = 30 * time.Second

// API selects which sync API a [Server] serves.
type API int

const (
	// APISliding, the zero value, serves sliding sync in Synapse's dialect (MSC4186 at the
	// simplified_msc3575 path) and advertises it in /versions.
	APISliding API = iota
	// APIV2 serves the classic /sync and a filter endpoint instead.
	APIV2
)

// Options configures a [Server]. Every zero value is usable.
type Options struct {
	// Account is what the bot finds on the server; nil means one generated from Rooms and
	// Seed with plain rooms, no peers and no to-device messages.
	Account *Account
	// Rooms is how many rooms a generated account has; 0 means DefaultRooms, negative none.
	Rooms int
	// Seed drives a generated account; the same seed gives the same rooms.
	Seed uint64
	// API is the sync API served.
	API API
	// IdleHold caps every sync long-poll, whatever the request asks for; zero means
	// DefaultIdleHold. A short one makes idle long-polls (answered with the request's pos on
	// sliding sync) come often.
	IdleHold time.Duration
	// Observer, when set, is called for every request of interest, synchronously and without
	// the server's lock held, so it must be quick.
	Observer func(Event)
	// Dir holds the peers' crypto databases; empty means a temporary directory removed by
	// Close.
	Dir string
	// NoTxnDedup makes a room send with a transaction ID the server has seen add a new
	// event, as Dendrite does after a send whose response was lost. False: the same
	// transaction ID from the same device gets the first event ID back.
	NoTxnDedup bool
	// SendFault, when set, is asked about every room send of the bot before it is handled;
	// nil means every send is answered normally.
	SendFault func(roomID id.RoomID, txnID string) SendFault
	// NoListener serves on no socket: the server is reached through [Server.Transport] only
	// (URL is empty, no bytes are counted), so that it can live inside a testing/synctest
	// bubble. False: it listens on 127.0.0.1.
	NoListener bool
}

// SendFault is what the server does with one room send.
type SendFault int

const (
	// SendAnswer stores the event and answers.
	SendAnswer SendFault = iota
	// SendStoreDropResponse stores the event and then breaks the connection without an
	// answer: the client sees a network error for a send that happened.
	SendStoreDropResponse
	// SendStoreHang stores the event and then answers nothing until the client goes away.
	SendStoreHang
)

// devRef names one device.
type devRef struct {
	user   id.UserID
	device id.DeviceID
}

var bot = devRef{BotUserID, BotDeviceID}

// entry is one event and the stream position it came at (0 for the generated account).
type entry struct {
	stream int64
	evt    *event.Event
}

// room is one room on the server.
type room struct {
	id        id.RoomID
	created   int64 // stream position of its creation
	changed   int64 // stream position of its last event
	botStream int64 // stream position of the bot's last membership change
	state     map[[2]string]entry
	order     [][2]string // state keys in the order they were first set
	members   map[id.UserID]event.Membership
	timeline  []entry
}

func (r *room) membership(user id.UserID) event.Membership { return r.members[user] }

// Server is the fake homeserver. Create it with [NewServer] and Close it when done. It is
// safe for concurrent use.
type Server struct {
	opts Options
	acct *Account
	ss   *slidingsynctest.Server
	hs   *httptest.Server // nil with Options.NoListener
	mux  http.Handler
	dir  string
	ownD bool // dir was made by NewServer

	bytesIn, bytesOut atomic.Int64

	mu        sync.Mutex
	changed   chan struct{} // closed and replaced on every change
	stream    int64
	eventSeq  int64
	rooms     map[id.RoomID]*room
	list      []id.RoomID // the bot's joined and invited rooms, most recent activity first
	tokens    map[string]devRef
	devices   map[id.UserID]map[id.DeviceID]*device
	devOrder  map[id.UserID][]id.DeviceID
	devLists  []devChange
	txns      map[string]id.EventID
	sentTxn   map[id.EventID]sentBy // the device and transaction ID of each room send
	conns     map[string]*ssConn    // sliding sync connections by conn_id
	logins    int
	logouts   int
	toDevSeq  int64
	toDevTxns map[string]bool
	keysAt    int64 // stream position of the last change of the bot's key counts
	posSeq    int64 // sliding sync answers with news served
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

// NewServer loads the account (generating one if Options.Account is nil) and starts the
// server on 127.0.0.1.
func NewServer(opts Options) (*Server, error) {
	if opts.IdleHold <= 0 {
		opts.IdleHold = DefaultIdleHold
	}
	acct := opts.Account
	if acct == nil {
		if opts.Rooms == 0 {
			opts.Rooms = DefaultRooms
		}
		var err error
		if acct, err = Generate(GenConfig{Rooms: opts.Rooms, Seed: opts.Seed, Peers: -1, ToDevice: -1, Plain: true}); err != nil {
			return nil, err
		}
	}
	s := &Server{
		opts:        opts,
		acct:        acct,
		changed:     make(chan struct{}),
		rooms:       make(map[id.RoomID]*room, len(acct.Rooms)+1),
		tokens:      map[string]devRef{AccessToken: bot},
		devices:     map[id.UserID]map[id.DeviceID]*device{},
		devOrder:    map[id.UserID][]id.DeviceID{},
		txns:        map[string]id.EventID{},
		sentTxn:     map[id.EventID]sentBy{},
		conns:       map[string]*ssConn{},
		toDevTxns:   map[string]bool{},
		dir:         opts.Dir,
		storedSends: map[string]int{},
	}
	s.load(acct)
	if s.dir == "" {
		dir, err := os.MkdirTemp("", "minihs")
		if err != nil {
			return nil, err
		}
		s.dir, s.ownD = dir, true
	}
	advertise := opts.API == APISliding
	s.ss = slidingsynctest.NewServer(slidingsynctest.Options{
		Protocol:            slidingsync.ProtocolMSC4186,
		Personality:         slidingsynctest.PersonalitySynapse,
		UserID:              BotUserID,
		DeviceID:            BotDeviceID,
		AccessToken:         AccessToken,
		AdvertiseSimplified: &advertise,
	})
	s.ss.SetResponder(s.respond)
	s.mux = s.routes()
	if !opts.NoListener {
		s.hs = httptest.NewUnstartedServer(s.mux)
		s.hs.Listener = &countingListener{Listener: s.hs.Listener, s: s}
		s.hs.Start()
	}
	return s, nil
}

// load builds the rooms, the peers' devices and the bot's to-device queue from acct, which
// stays unchanged.
func (s *Server) load(acct *Account) {
	s.addDevice(BotUserID, BotDeviceID)
	for _, r := range acct.Rooms {
		rm := &room{id: r.ID, state: make(map[[2]string]entry, len(r.State)+1), members: make(map[id.UserID]event.Membership, len(r.Members))}
		for _, u := range r.Members {
			rm.members[u] = event.MembershipJoin
		}
		for _, evt := range r.State {
			s.setState(rm, evt, 0)
		}
		for _, evt := range r.Timeline {
			rm.timeline = append(rm.timeline, entry{evt: evt})
			if evt.StateKey != nil {
				s.setState(rm, evt, 0)
			}
		}
		s.rooms[r.ID] = rm
		s.list = append(s.list, r.ID)
	}
	for _, p := range acct.Peers {
		d := s.addDevice(p.UserID, p.DeviceID)
		d.keys = p.DeviceKeys
		for _, otk := range p.OTKs {
			for keyID, k := range otk {
				raw, _ := json.Marshal(k)
				d.otks = append(d.otks, storedKey{id: keyID, raw: raw})
			}
		}
	}
	d := s.devices[BotUserID][BotDeviceID]
	for _, raw := range acct.ToDevice {
		s.toDevSeq++
		d.toDevice = append(d.toDevice, toDeviceMsg{seq: s.toDevSeq, raw: raw})
	}
}

// URL returns the server's base URL (http://127.0.0.1:port), empty with Options.NoListener.
func (s *Server) URL() string {
	if s.hs == nil {
		return ""
	}
	return s.hs.URL
}

// Handler returns the server's handler, to serve it in-process (for example through
// slidingsynctest.HandlerTransport, with Options.NoListener).
func (s *Server) Handler() http.Handler { return s.mux }

// SetToken makes token an access token of user's device dev, registering the device if the
// server does not know it yet.
func (s *Server) SetToken(token string, user id.UserID, dev id.DeviceID) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.devices[user][dev] == nil {
		s.addDevice(user, dev)
	}
	s.tokens[token] = devRef{user, dev}
}

// AddRoom creates a room whose members have joined (the first one created it), as it stood
// before the bot's sync began: its events wake no long-poll and are in no timeline.
func (s *Server) AddRoom(roomID id.RoomID, members ...id.UserID) {
	s.mu.Lock()
	defer s.mu.Unlock()
	r := &room{id: roomID, state: map[[2]string]entry{}, members: map[id.UserID]event.Membership{}}
	empty := ""
	s.setState(r, s.newEvent(roomID, event.StateCreate, &empty, members[0], map[string]any{"room_version": "10"}, 0), 0)
	for _, u := range members {
		key := u.String()
		s.setState(r, s.newEvent(roomID, event.StateMember, &key, u, map[string]any{"membership": "join"}, 0), 0)
	}
	s.rooms[roomID] = r
}

// Bot returns the bot's user ID, device ID and access token.
func (s *Server) Bot() (id.UserID, id.DeviceID, string) { return BotUserID, BotDeviceID, AccessToken }

// Account returns the account the server was loaded with.
func (s *Server) Account() *Account { return s.acct }

// Bytes returns the totals received and sent on the wire so far, headers included.
func (s *Server) Bytes() (in, out int64) { return s.bytesIn.Load(), s.bytesOut.Load() }

// Rooms returns how many rooms the bot is joined to or invited to.
func (s *Server) Rooms() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.list)
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
	if s.hs != nil {
		s.hs.CloseClientConnections()
		s.hs.Close()
	}
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

// PeerMessage adds a plain m.text message from sender to the account's room roomIndex, as a
// live event that wakes long-polls, and returns its event ID.
func (s *Server) PeerMessage(roomIndex int, sender id.UserID, body string) id.EventID {
	s.mu.Lock()
	defer s.mu.Unlock()
	rm := s.rooms[s.acct.Rooms[roomIndex].ID]
	evt := s.newEvent(rm.id, event.EventMessage, nil, sender, map[string]any{"msgtype": "m.text", "body": body}, time.Now().UnixMilli())
	s.appendLocked(rm, evt)
	return evt.ID
}

// ChangeDevices records a device-list change for users (as when one adds a device); it wakes
// long-polls.
func (s *Server) ChangeDevices(users ...id.UserID) {
	s.mu.Lock()
	defer s.mu.Unlock()
	at := s.nextStream()
	for _, u := range users {
		s.devLists = append(s.devLists, devChange{stream: at, user: u})
	}
}

// newEvent builds an event with a fresh ID. Caller holds s.mu.
func (s *Server) newEvent(roomID id.RoomID, typ event.Type, stateKey *string, sender id.UserID, content map[string]any, ts int64) *event.Event {
	s.eventSeq++
	return &event.Event{
		Type:      typ,
		StateKey:  stateKey,
		Sender:    sender,
		ID:        id.EventID(fmt.Sprintf("$e%d-%s", s.eventSeq, ServerName)),
		RoomID:    roomID,
		Timestamp: ts,
		Content:   event.Content{Raw: content},
	}
}

// contentString reads a string field of an event's content, parsed or not.
func contentString(evt *event.Event, key string) string {
	if evt.Content.Raw != nil {
		v, _ := evt.Content.Raw[key].(string)
		return v
	}
	var m map[string]any
	_ = json.Unmarshal(evt.Content.VeryRaw, &m)
	v, _ := m[key].(string)
	return v
}

// setState makes evt current state of r at stream position at. Caller holds s.mu or is
// loading.
func (s *Server) setState(r *room, evt *event.Event, at int64) {
	key := [2]string{evt.Type.Type, *evt.StateKey}
	if _, ok := r.state[key]; !ok {
		r.order = append(r.order, key)
	}
	r.state[key] = entry{stream: at, evt: evt}
	if evt.Type.Type == event.StateMember.Type && evt.Content.Raw != nil {
		// Live events; load takes the generated rooms' members from the account.
		r.members[id.UserID(*evt.StateKey)] = event.Membership(contentString(evt, "membership"))
	}
}

// appendLocked adds evt to r's timeline (and to its state when it is a state event) at a new
// stream position and moves r to the front of the bot's list. Caller holds s.mu.
func (s *Server) appendLocked(r *room, evt *event.Event) int64 {
	at := s.nextStream()
	r.timeline = append(r.timeline, entry{stream: at, evt: evt})
	r.changed = at
	if evt.StateKey != nil {
		s.setState(r, evt, at)
		if evt.Type == event.StateMember && *evt.StateKey == BotUserID.String() {
			r.botStream = at
		}
	}
	s.list = slices.DeleteFunc(s.list, func(roomID id.RoomID) bool { return roomID == r.id })
	switch r.membership(BotUserID) {
	case event.MembershipJoin, event.MembershipInvite:
		s.list = slices.Insert(s.list, 0, r.id)
	}
	return at
}

// createRoomLocked creates a room with creator joined and the others invited. Caller holds
// s.mu.
func (s *Server) createRoomLocked(creator id.UserID, name string, invite []id.UserID, encrypted bool) id.RoomID {
	roomID := id.RoomID(fmt.Sprintf("!live%d:%s", len(s.rooms)+1, ServerName))
	r := &room{id: roomID, state: map[[2]string]entry{}, members: map[id.UserID]event.Membership{}}
	s.rooms[roomID] = r
	r.created = s.stream + 1
	now := time.Now().UnixMilli()
	add := func(typ event.Type, stateKey string, sender id.UserID, content map[string]any) {
		s.appendLocked(r, s.newEvent(roomID, typ, &stateKey, sender, content, now))
	}
	add(event.StateCreate, "", creator, map[string]any{"room_version": "10", "creator": creator})
	add(event.StateMember, creator.String(), creator, map[string]any{"membership": "join"})
	add(event.StateJoinRules, "", creator, map[string]any{"join_rule": "invite"})
	add(event.StateHistoryVisibility, "", creator, map[string]any{"history_visibility": "shared"})
	add(event.StateRoomName, "", creator, map[string]any{"name": name})
	if encrypted {
		add(event.StateEncryption, "", creator, map[string]any{"algorithm": id.AlgorithmMegolmV1})
	}
	for _, u := range invite {
		add(event.StateMember, u.String(), creator, map[string]any{"membership": "invite"})
	}
	return roomID
}

// routes returns the server's handler.
func (s *Server) routes() http.Handler {
	mux := http.NewServeMux()
	const v3 = "/_matrix/client/v3"
	mux.Handle("GET /_matrix/client/versions", s.ss)
	if s.opts.API == APISliding {
		mux.HandleFunc("POST "+slidingsync.ProtocolMSC4186.Path(), s.serveSync)
	} else {
		mux.HandleFunc("GET "+v3+"/sync", s.auth(s.serveV2))
		mux.HandleFunc("POST "+v3+"/user/{user}/filter", s.auth(func(w http.ResponseWriter, _ *http.Request, _ devRef) {
			writeJSON(w, http.StatusOK, map[string]any{"filter_id": "1"})
		}))
	}
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
	mux.HandleFunc("GET "+v3+"/rooms/{room}/joined_members", s.auth(s.members))
	mux.HandleFunc("GET "+v3+"/rooms/{room}/messages", s.auth(s.messages))
	mux.HandleFunc("GET "+v3+"/rooms/{room}/state", s.auth(s.stateEvent))
	mux.HandleFunc("GET "+v3+"/rooms/{room}/state/{type}", s.auth(s.stateEvent))
	mux.HandleFunc("GET "+v3+"/rooms/{room}/state/{type}/{key...}", s.auth(s.stateEvent))
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusNotFound, "M_UNRECOGNIZED", "Unrecognized request")
		s.observe(Event{Kind: KindOther, Path: r.Method + " " + r.URL.Path, Status: http.StatusNotFound})
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
	if s.opts.SendFault != nil && who.user == BotUserID {
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
	s.observe(Event{Kind: KindRoomSend, RoomID: roomID, EventType: evt.Type.Type})
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
		user = id.NewUserID(user, ServerName).String()
	}
	if req.Type != "m.login.password" || id.UserID(user) != BotUserID || req.Password != BotPassword {
		writeError(w, http.StatusForbidden, "M_FORBIDDEN", "Invalid username or password")
		return
	}
	s.mu.Lock()
	s.logins++
	s.tokens[AccessToken] = bot
	s.mu.Unlock()
	writeJSON(w, http.StatusOK, map[string]any{"user_id": BotUserID, "device_id": BotDeviceID, "access_token": AccessToken})
}

// logout forgets the access token and the device's keys, as a server deleting the device
// does. The bot's next login gets the same device ID back, without keys.
func (s *Server) logout(w http.ResponseWriter, r *http.Request, who devRef) {
	token, _ := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	s.mu.Lock()
	delete(s.tokens, token)
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
	rm := s.rooms[roomID]
	status := http.StatusOK
	switch {
	case rm == nil:
		status = http.StatusNotFound
	case rm.membership(who.user) == event.MembershipInvite:
		sk := who.user.String()
		s.appendLocked(rm, s.newEvent(roomID, event.StateMember, &sk, who.user, map[string]any{"membership": "join"}, time.Now().UnixMilli()))
	case rm.membership(who.user) != event.MembershipJoin:
		status = http.StatusForbidden
	}
	s.mu.Unlock()
	switch status {
	case http.StatusNotFound:
		writeError(w, status, "M_NOT_FOUND", "No such room.")
	case http.StatusForbidden:
		writeError(w, status, "M_FORBIDDEN", "You are not invited to this room.")
	default:
		writeJSON(w, status, map[string]any{"room_id": roomID})
		s.observe(Event{Kind: KindJoin, RoomID: roomID})
	}
}

// stateEvent returns the content of one current state event of a room the user is in, or
// all of its current state without a type.
func (s *Server) stateEvent(w http.ResponseWriter, r *http.Request, who devRef) {
	roomID := id.RoomID(r.PathValue("room"))
	s.mu.Lock()
	defer s.mu.Unlock()
	rm := s.rooms[roomID]
	if rm == nil || rm.membership(who.user) != event.MembershipJoin {
		writeError(w, http.StatusForbidden, "M_FORBIDDEN", "User not in room.")
		return
	}
	if r.PathValue("type") == "" {
		all := make([]*event.Event, 0, len(rm.order))
		for _, key := range rm.order {
			all = append(all, rm.state[key].evt)
		}
		writeJSON(w, http.StatusOK, all)
		return
	}
	e, ok := rm.state[[2]string{r.PathValue("type"), r.PathValue("key")}]
	if !ok {
		writeError(w, http.StatusNotFound, "M_NOT_FOUND", "Event not found.")
		return
	}
	writeJSON(w, http.StatusOK, &e.evt.Content)
}

// members returns the room's member events, or its joined members for joined_members.
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
	joined := map[id.UserID]any{}
	for _, key := range rm.order {
		if key[0] == event.StateMember.Type {
			chunk = append(chunk, rm.state[key].evt)
			if rm.membership(id.UserID(key[1])) == event.MembershipJoin {
				joined[id.UserID(key[1])] = map[string]any{"display_name": contentString(rm.state[key].evt, "displayname")}
			}
		}
	}
	if strings.HasSuffix(r.URL.Path, "/joined_members") {
		writeJSON(w, http.StatusOK, map[string]any{"joined": joined})
		return
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
func (s *Server) HoldSync() (release func()) { return s.hold(&s.held) }

// HoldToDevice keeps the bot's to-device messages (room keys) out of its sync responses until
// release is called, while everything else is delivered: the bot then sees encrypted
// messages before their room keys, as a client does when a key is slow to arrive.
func (s *Server) HoldToDevice() (release func()) { return s.hold(&s.toDeviceHeld) }

func (s *Server) hold(n *int) func() {
	s.mu.Lock()
	*n++
	s.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			s.mu.Lock()
			*n--
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

// writeJSON writes v and returns the body's size.
func writeJSON(w http.ResponseWriter, status int, v any) int {
	body, err := json.Marshal(v)
	if err != nil {
		status, body = http.StatusInternalServerError, []byte(`{"errcode":"M_UNKNOWN","error":"encode"}`)
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_, _ = w.Write(body)
	return len(body)
}

func writeError(w http.ResponseWriter, status int, errcode, msg string) {
	writeJSON(w, status, map[string]string{"errcode": errcode, "error": msg})
}

var errClosed = errors.New("minihs: server closed")

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
	// Counted before the write: a client that has read an answer finds it counted.
	c.s.bytesOut.Add(int64(len(p)))
	n, err := c.Conn.Write(p)
	c.s.bytesOut.Add(int64(n - len(p)))
	return n, err
}
