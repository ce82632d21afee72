package minihs

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"sync"

	"github.com/rs/zerolog"
	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix"
	mcrypto "maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/sliding-e2ee/sdk/slidingsync/sqlstore/dbopen"
)

// peerPickleKey encrypts the peers' Olm accounts in their throwaway databases.
var peerPickleKey = []byte("minihs peer pickle key")

// Peer is one device of a scripted user: a mautrix OlmMachine (goolm) on its own SQLite file,
// whose client talks to the server over HTTP. Its methods may be called from any goroutine;
// they run one at a time.
type Peer struct {
	srv *Server
	// UserID and DeviceID name the device.
	UserID   id.UserID
	DeviceID id.DeviceID
	// Client is the device's logged-in client.
	Client *mautrix.Client
	// Olm is the device's OlmMachine.
	Olm *mcrypto.OlmMachine

	mu    sync.Mutex
	db    *dbutil.Database
	state mautrix.StateStore
	seen  map[id.EventID]bool
}

// Decryption is a room message a peer decrypted.
type Decryption struct {
	User    id.UserID   // the peer who decrypted it
	Device  id.DeviceID // with which device
	EventID id.EventID
	Sender  id.UserID
	Body    string // the decrypted body
}

// NewPeer creates a user's first device and uploads its device keys and one-time keys.
func (s *Server) NewPeer(ctx context.Context, user id.UserID) (*Peer, error) {
	return s.newDevice(ctx, user)
}

// AddDevice creates another device of the peer's user and uploads its keys; the bot's next
// sync response lists the user in device_lists.changed.
func (p *Peer) AddDevice(ctx context.Context) (*Peer, error) {
	return p.srv.newDevice(ctx, p.UserID)
}

func (s *Server) newDevice(ctx context.Context, user id.UserID) (*Peer, error) {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil, errClosed
	}
	if user == BotUserID {
		s.mu.Unlock()
		return nil, fmt.Errorf("minihs: %s is the bot", user)
	}
	s.peers++
	n := s.peers
	dev := id.DeviceID(fmt.Sprintf("%sDEV%d", strings.ToUpper(user.Localpart()), len(s.devOrder[user])+1))
	token := fmt.Sprintf("demo-peer-token-%d", n)
	s.tokens[token] = devRef{user, dev}
	s.addDevice(user, dev)
	s.mu.Unlock()

	log := zerolog.Nop()
	db, err := dbopen.Open(filepath.Join(s.dir, fmt.Sprintf("peer%d.db", n)), dbopen.Config{RelaxedSync: true})
	if err != nil {
		return nil, err
	}
	p, err := s.setUpPeer(ctx, log, db, user, dev, token)
	if err != nil {
		_ = db.Close()
		return nil, fmt.Errorf("minihs: set up %s's device %s: %w", user, dev, err)
	}
	s.mu.Lock()
	s.peerDBs = append(s.peerDBs, db)
	s.mu.Unlock()
	return p, nil
}

func (s *Server) setUpPeer(ctx context.Context, log zerolog.Logger, db *dbutil.Database, user id.UserID, dev id.DeviceID, token string) (*Peer, error) {
	cli, err := mautrix.NewClient(s.URL(), user, token)
	if err != nil {
		return nil, err
	}
	cli.DeviceID = dev
	cli.Log = log
	state := mautrix.NewMemoryStateStore()
	cli.StateStore = state
	cs := mcrypto.NewSQLCryptoStore(db, dbutil.ZeroLogger(log), user.String(), dev, peerPickleKey)
	if err := cs.DB.Upgrade(ctx); err != nil {
		return nil, err
	}
	olm := mcrypto.NewOlmMachine(cli, &log, cs, state.(mcrypto.StateStore))
	if err := olm.Load(ctx); err != nil {
		return nil, err
	}
	if err := olm.ShareKeys(ctx, 0); err != nil {
		return nil, err
	}
	return &Peer{srv: s, UserID: user, DeviceID: dev, Client: cli, Olm: olm, db: db, state: state, seen: map[id.EventID]bool{}}, nil
}

// CreateEncryptedRoom creates an encrypted room (shared history) with the peer joined and
// the given users invited.
func (p *Peer) CreateEncryptedRoom(ctx context.Context, name string, invite ...id.UserID) (id.RoomID, error) {
	return p.createRoom(ctx, name, invite, true)
}

// CreatePlainRoom creates an unencrypted room with the peer joined and the given users
// invited.
func (p *Peer) CreatePlainRoom(ctx context.Context, name string, invite ...id.UserID) (id.RoomID, error) {
	return p.createRoom(ctx, name, invite, false)
}

func (p *Peer) createRoom(ctx context.Context, name string, invite []id.UserID, encrypted bool) (id.RoomID, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	s := p.srv
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return "", errClosed
	}
	roomID := s.createRoomLocked(p.UserID, name, invite, encrypted)
	s.mu.Unlock()
	return roomID, p.loadRoomState(ctx, roomID)
}

// loadRoomState copies the room's current state into the peer's state store, as its sync
// would.
func (p *Peer) loadRoomState(ctx context.Context, roomID id.RoomID) error {
	s := p.srv
	s.mu.Lock()
	rm := s.rooms[roomID]
	var raws [][]byte
	if rm != nil {
		for _, key := range rm.order {
			raw, err := json.Marshal(rm.state[key].evt)
			if err != nil {
				s.mu.Unlock()
				return err
			}
			raws = append(raws, raw)
		}
	}
	s.mu.Unlock()
	if rm == nil {
		return fmt.Errorf("minihs: no room %s", roomID)
	}
	for _, raw := range raws {
		evt, err := decodeEvent(raw, event.StateEventType)
		if err != nil {
			return err
		}
		evt.RoomID = roomID
		mautrix.UpdateStateStore(ctx, p.state, evt)
	}
	return nil
}

// decodeEvent decodes an event and parses its content.
func decodeEvent(raw []byte, class event.TypeClass) (*event.Event, error) {
	var evt event.Event
	if err := json.Unmarshal(raw, &evt); err != nil {
		return nil, err
	}
	evt.Type.Class = class
	if err := evt.Content.ParseRaw(evt.Type); err != nil && !errors.Is(err, event.ErrContentAlreadyParsed) && !errors.Is(err, event.ErrUnsupportedContentType) {
		return nil, err
	}
	return &evt, nil
}

// SendEncrypted shares the peer's room key with every device of the room's joined and
// invited members that lacks it (Olm over /sendToDevice, claiming their one-time keys),
// encrypts body with megolm and sends it through PUT /rooms/{id}/send.
func (p *Peer) SendEncrypted(ctx context.Context, roomID id.RoomID, body string) (id.EventID, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if err := p.loadRoomState(ctx, roomID); err != nil {
		return "", err
	}
	members, err := p.state.GetRoomJoinedOrInvitedMembers(ctx, roomID)
	if err != nil {
		return "", err
	}
	if err := p.Olm.ShareGroupSession(ctx, roomID, members); err != nil {
		return "", fmt.Errorf("minihs: share the room key: %w", err)
	}
	enc, err := p.Olm.EncryptMegolmEvent(ctx, roomID, event.EventMessage, &event.MessageEventContent{MsgType: event.MsgText, Body: body})
	if err != nil {
		return "", fmt.Errorf("minihs: encrypt: %w", err)
	}
	resp, err := p.Client.SendMessageEvent(ctx, roomID, event.EventEncrypted, enc)
	if err != nil {
		return "", err
	}
	return resp.EventID, nil
}

// ClaimKeys claims n keys of a device through /keys/claim, one per request, and says how
// many were one-time keys and how many the fallback key. It stops early when the server
// hands out nothing.
func (p *Peer) ClaimKeys(ctx context.Context, user id.UserID, dev id.DeviceID, n int) (otks, fallbacks int, err error) {
	for range n {
		resp, err := p.Client.ClaimKeys(ctx, &mautrix.ReqClaimKeys{OneTimeKeys: mautrix.OneTimeKeysRequest{user: {dev: id.KeyAlgorithmSignedCurve25519}}})
		if err != nil {
			return otks, fallbacks, err
		}
		keys := resp.OneTimeKeys[user][dev]
		if len(keys) == 0 {
			return otks, fallbacks, nil
		}
		for _, k := range keys {
			if k.Fallback {
				fallbacks++
			} else {
				otks++
			}
		}
	}
	return otks, fallbacks, nil
}

// ClaimBotKeys claims n keys of the bot's device (see ClaimKeys).
func (p *Peer) ClaimBotKeys(ctx context.Context, n int) (otks, fallbacks int, err error) {
	return p.ClaimKeys(ctx, BotUserID, BotDeviceID, n)
}

// ReceiveToDevice hands the device's queued to-device events to its OlmMachine (which
// stores the room keys they carry) and then deletes them from the server. It returns how
// many there were.
func (p *Peer) ReceiveToDevice(ctx context.Context) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.receiveToDevice(ctx)
}

func (p *Peer) receiveToDevice(ctx context.Context) (int, error) {
	msgs := p.srv.peekToDevice(p.UserID, p.DeviceID)
	for _, m := range msgs {
		evt, err := decodeEvent(m.raw, event.ToDeviceEventType)
		if err != nil {
			continue // not for an OlmMachine; a real client would drop it too
		}
		p.Olm.HandleToDeviceEvent(ctx, evt)
	}
	if len(msgs) > 0 {
		p.srv.ackToDevice(p.UserID, p.DeviceID, msgs[len(msgs)-1].seq)
	}
	return len(msgs), ctx.Err()
}

// NextMessage waits for an encrypted message from sender in roomID that this device has not
// returned yet and returns it decrypted. It handles the device's to-device events while it
// waits, so room keys shared with it arrive.
func (p *Peer) NextMessage(ctx context.Context, roomID id.RoomID, sender id.UserID) (*event.Event, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	var lastErr error
	var found *event.Event
	err := p.srv.WaitFor(ctx, func() bool {
		if _, err := p.receiveToDevice(ctx); err != nil {
			return false
		}
		for _, e := range p.srv.RoomEvents(roomID) {
			if e.Sender != sender || e.Type != event.EventEncrypted || p.seen[e.ID] {
				continue
			}
			raw, err := json.Marshal(e)
			if err != nil {
				lastErr = err
				continue
			}
			evt, err := decodeEvent(raw, event.MessageEventType)
			if err != nil {
				lastErr = err
				continue
			}
			evt.RoomID = roomID
			dec, err := p.Olm.DecryptMegolmEvent(ctx, evt)
			if err != nil {
				lastErr = err
				continue
			}
			p.seen[e.ID] = true
			found = dec
			body := ""
			if msg, ok := dec.Content.Parsed.(*event.MessageEventContent); ok {
				body = msg.Body
			}
			p.srv.noteDecrypted(Decryption{User: p.UserID, Device: p.DeviceID, EventID: e.ID, Sender: sender, Body: body})
			return true
		}
		return false
	})
	if err != nil {
		if lastErr != nil {
			return nil, fmt.Errorf("%w (last decryption error: %w)", err, lastErr)
		}
		return nil, err
	}
	return found, nil
}

func (s *Server) noteDecrypted(d Decryption) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.decrypted = append(s.decrypted, d)
	s.notifyLocked()
}

// Decrypted returns the messages peers decrypted, in order.
func (s *Server) Decrypted() []Decryption {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Decryption(nil), s.decrypted...)
}
