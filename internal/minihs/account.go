package minihs

import (
	"encoding/json"
	"fmt"
	"maps"
	"math/rand/v2"
	"slices"

	"maunium.net/go/mautrix"
	mcrypto "maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/crypto/signatures"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
)

// The server name and the bot of every server.
const (
	ServerName  = "demo.invalid"
	BotUserID   = id.UserID("@bot:" + ServerName)
	BotDeviceID = id.DeviceID("E2EEBOT")
	AccessToken = "demo-bot-token"
	// BotPassword is the password POST /login accepts for the bot.
	BotPassword = "demo-bot-password"
)

// baseTS is the origin_server_ts of the most recent generated event, older than any bot run.
const baseTS = int64(1_780_000_000_000)

// GenConfig says what [Generate] builds. Zero values take the documented defaults.
type GenConfig struct {
	Rooms    int    // rooms the bot is in; 0 means 1000, negative none
	Seed     uint64 // drives every choice; the same seed gives the same account
	Users    int    // pool of other users; 0 means max(50, Rooms/20)
	Peers    int    // users with real device keys; 0 means 4, negative none
	ToDevice int    // to-device messages queued for the bot; 0 means 20, negative none
	PeerOTKs int    // signed one-time keys each peer has for claims; 0 means 20
	Plain    bool   // no encrypted rooms; else every even-numbered room is encrypted
}

func (c GenConfig) withDefaults() GenConfig {
	if c.Rooms == 0 {
		c.Rooms = 1000
	}
	c.Rooms = max(c.Rooms, 0)
	if c.Users <= 0 {
		c.Users = max(50, c.Rooms/20)
	}
	if c.Peers == 0 {
		c.Peers = 4
	}
	if c.ToDevice == 0 {
		c.ToDevice = 20
	}
	if c.PeerOTKs <= 0 {
		c.PeerOTKs = 20
	}
	return c
}

// Room is one generated room. Rooms are generated in order of recent activity: index 0 is the
// most recent. Its events are shared by every server of the account and must not be changed.
type Room struct {
	ID        id.RoomID
	Name      string         // also in its m.room.name state
	Encrypted bool           // every even-numbered room, unless GenConfig.Plain
	Members   []id.UserID    // joined members, the bot first
	State     []*event.Event // state before the timeline
	Timeline  []*event.Event // the recent event (a state event is current state too)
}

// AccountPeer is a user with one device with real Olm keys, known to the server from the
// start. Its one-time keys are claimed in order; once they run out a claim returns none.
type AccountPeer struct {
	UserID     id.UserID
	DeviceID   id.DeviceID
	DeviceKeys json.RawMessage                   // signed, as /keys/query returns it
	OTKs       []map[id.KeyID]mautrix.OneTimeKey // signed one-time keys, one per claim
	Account    *mcrypto.OlmAccount               // the keys' owner
	Rooms      []int                             // indexes of encrypted rooms it is in
}

// Account is a generated account: what the bot finds on the server when it starts.
type Account struct {
	Config   GenConfig         // with defaults applied
	Rooms    []Room            // most recent activity first
	Users    []id.UserID       // the pool, peers included
	Peers    []*AccountPeer    // users with real device keys
	ToDevice []json.RawMessage // to-device events queued for the bot

	encoded map[id.EventID]json.RawMessage // every room event, encoded once for v2 answers
}

// Generate builds an account from cfg. Only the Olm key material is random. Events are
// encoded once, so that serving them costs the server little (it runs next to the bot being
// measured).
func Generate(cfg GenConfig) (*Account, error) {
	cfg = cfg.withDefaults()
	rng := rand.New(rand.NewPCG(cfg.Seed, cfg.Seed^0x9e3779b97f4a7c15))
	a := &Account{Config: cfg}
	for i := range cfg.Users {
		a.Users = append(a.Users, id.UserID(fmt.Sprintf("@user%05d:%s", i, ServerName)))
	}
	for i := range max(cfg.Peers, 0) {
		p, err := newAccountPeer(id.UserID(fmt.Sprintf("@peer%d:%s", i, ServerName)), id.DeviceID(fmt.Sprintf("PEER%dDEV", i)), cfg.PeerOTKs)
		if err != nil {
			return nil, err
		}
		a.Peers = append(a.Peers, p)
		a.Users = append(a.Users, p.UserID)
	}
	a.encoded = make(map[id.EventID]json.RawMessage, cfg.Rooms*10)
	for i := range cfg.Rooms {
		r := a.generateRoom(rng, i)
		for _, evt := range append(slices.Clip(r.State), r.Timeline...) {
			a.encoded[evt.ID] = eventJSON(evt)
		}
		a.Rooms = append(a.Rooms, r)
	}
	for i := range max(cfg.ToDevice, 0) {
		if len(a.Peers) == 0 || len(a.Rooms) == 0 {
			break
		}
		// Withheld-key notices: ordinary traffic that mautrix stores without network work.
		p := a.Peers[rng.IntN(len(a.Peers))]
		b, _ := json.Marshal(map[string]any{
			"type": "m.room_key.withheld", "sender": p.UserID,
			"content": map[string]any{
				"algorithm": id.AlgorithmMegolmV1, "room_id": a.Rooms[rng.IntN(len(a.Rooms))].ID,
				"session_id": fmt.Sprintf("bench-session-%d-%08x", i, rng.Uint32()),
				"sender_key": p.Account.IdentityKey(), "code": "m.unverified", "reason": "Device not verified",
			},
		})
		a.ToDevice = append(a.ToDevice, b)
	}
	return a, nil
}

// generateRoom builds room i: create, power levels, join rules, history visibility, name,
// encryption, the members, and the bot's join (the latest event of an encrypted room: history
// it cannot decrypt would make a bot request keys, which tests nothing) or a notice.
func (a *Account) generateRoom(rng *rand.Rand, i int) Room {
	pool := a.Users[:a.Config.Users]
	r := Room{
		ID:        id.RoomID(fmt.Sprintf("!r%06d-%08x:%s", i, rng.Uint32(), ServerName)),
		Name:      fmt.Sprintf("Room %d %s", i, words[rng.IntN(len(words))]),
		Encrypted: !a.Config.Plain && i%2 == 0,
	}
	creator := pool[rng.IntN(len(pool))]
	r.Members = []id.UserID{BotUserID, creator}
	for range 1 + rng.IntN(3) {
		if u := pool[rng.IntN(len(pool))]; !slices.Contains(r.Members, u) {
			r.Members = append(r.Members, u)
		}
	}
	if r.Encrypted && i%20 == 0 && len(a.Peers) > 0 {
		// Peers sit in every tenth encrypted room; room 0 has two of them.
		for j, p := range a.Peers {
			if j == (i/20)%len(a.Peers) || (i == 0 && j == 1) {
				r.Members = append(r.Members, p.UserID)
				p.Rooms = append(p.Rooms, i)
			}
		}
	}
	ts := baseTS - int64(i)*60_000
	k := 0
	ev := func(typ event.Type, stateKey string, sender id.UserID, content any) *event.Event {
		raw, _ := json.Marshal(content)
		e := &event.Event{
			Type: typ, Sender: sender, RoomID: r.ID, Content: event.Content{VeryRaw: raw},
			ID:        id.EventID(fmt.Sprintf("$r%de%d-%s", i, k, ServerName)),
			Timestamp: ts - int64(100-k)*1000,
		}
		if typ.Class == event.StateEventType {
			e.StateKey = &stateKey
		}
		k++
		return e
	}
	add := func(typ event.Type, stateKey string, sender id.UserID, content any) {
		r.State = append(r.State, ev(typ, stateKey, sender, content))
	}
	add(event.StateCreate, "", creator, map[string]any{"room_version": "10", "creator": creator})
	levels := map[string]any{creator.String(): 100, BotUserID.String(): 50}
	add(event.StatePowerLevels, "", creator, map[string]any{"users": levels, "users_default": 0, "events_default": 0, "state_default": 50})
	add(event.StateJoinRules, "", creator, map[string]any{"join_rule": "invite"})
	add(event.StateHistoryVisibility, "", creator, map[string]any{"history_visibility": "shared"})
	add(event.StateRoomName, "", creator, map[string]any{"name": r.Name})
	if r.Encrypted {
		add(event.StateEncryption, "", creator, map[string]any{"algorithm": id.AlgorithmMegolmV1, "rotation_period_ms": 604800000})
	}
	for _, m := range r.Members[1:] {
		add(event.StateMember, m.String(), m, map[string]any{"membership": "join", "displayname": displayName(m)})
	}
	botJoin := ev(event.StateMember, BotUserID.String(), BotUserID, map[string]any{"membership": "join", "displayname": "Bot"})
	if r.Encrypted {
		r.Timeline = []*event.Event{botJoin}
	} else {
		r.State = append(r.State, botJoin)
		r.Timeline = []*event.Event{ev(event.EventMessage, "", creator, map[string]any{"msgtype": "m.notice", "body": fmt.Sprintf("status report %d", rng.IntN(1_000_000))})}
	}
	return r
}

var words = []string{"alpha", "bravo", "harbour", "ops", "garden", "release", "support", "chess", "infra", "music", "travel", "books"}

func displayName(u id.UserID) string { return "User " + u.Localpart() }

// newAccountPeer makes a device with real keys and signed one-time keys.
func newAccountPeer(userID id.UserID, deviceID id.DeviceID, otks int) (*AccountPeer, error) {
	acct := mcrypto.NewOlmAccount()
	dk := &mautrix.DeviceKeys{
		UserID:     userID,
		DeviceID:   deviceID,
		Algorithms: []id.Algorithm{id.AlgorithmMegolmV1, id.AlgorithmOlmV1},
		Keys: map[id.DeviceKeyID]string{
			id.NewDeviceKeyID(id.KeyAlgorithmCurve25519, deviceID): string(acct.IdentityKey()),
			id.NewDeviceKeyID(id.KeyAlgorithmEd25519, deviceID):    string(acct.SigningKey()),
		},
	}
	sig, err := acct.SignJSON(dk)
	if err != nil {
		return nil, err
	}
	dk.Signatures = signatures.NewSingleSignature(userID, id.KeyAlgorithmEd25519, deviceID.String(), sig)
	raw, err := json.Marshal(dk)
	if err != nil {
		return nil, err
	}
	p := &AccountPeer{UserID: userID, DeviceID: deviceID, DeviceKeys: raw, Account: acct}
	if err := acct.Internal.GenOneTimeKeys(uint(otks)); err != nil {
		return nil, err
	}
	keys, err := acct.Internal.OneTimeKeys()
	if err != nil {
		return nil, err
	}
	for _, keyID := range slices.Sorted(maps.Keys(keys)) {
		k := mautrix.OneTimeKey{Key: keys[keyID], IsSigned: true}
		s, err := acct.SignJSON(&k)
		if err != nil {
			return nil, err
		}
		k.Signatures = signatures.NewSingleSignature(userID, id.KeyAlgorithmEd25519, deviceID.String(), s)
		p.OTKs = append(p.OTKs, map[id.KeyID]mautrix.OneTimeKey{id.NewKeyID(id.KeyAlgorithmSignedCurve25519, keyID): k})
	}
	return p, nil
}
