package minihs

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"

	"maunium.net/go/mautrix"
	mcrypto "maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/crypto/signatures"
	"maunium.net/go/mautrix/id"
)

// Server name and bot identity of every generated account.
const (
	ServerName  = "bench"
	BotUserID   = id.UserID("@bot:bench")
	BotDeviceID = id.DeviceID("BENCHBOT")
	AccessToken = "bench_token"
)

// baseTS is the origin_server_ts of the most recent generated event.
const baseTS = int64(1_780_000_000_000)

// GenConfig says what [Generate] builds. Zero values take the documented defaults.
type GenConfig struct {
	Rooms    int    // rooms the bot is in; 0 means 1000
	Seed     uint64 // drives every choice; the same seed gives the same account
	Users    int    // pool of other users; 0 means max(50, Rooms/20)
	Peers    int    // users with real device keys; 0 means 4
	ToDevice int    // to-device messages queued for the bot; 0 means 20, negative none
	PeerOTKs int    // signed one-time keys each peer has for claims; 0 means 20
}

func (c GenConfig) withDefaults() GenConfig {
	if c.Rooms <= 0 {
		c.Rooms = 1000
	}
	if c.Users <= 0 {
		c.Users = max(50, c.Rooms/20)
	}
	if c.Peers <= 0 {
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

// StoredEvent is one pre-encoded event and what the server filters on.
type StoredEvent struct {
	Type     string          // event type
	StateKey *string         // nil for a message event
	Sender   id.UserID       // who sent it
	JSON     json.RawMessage // the whole event as served
}

// Room is one generated room. Rooms are generated in order of recent activity: index 0 is the
// most recent.
type Room struct {
	ID        id.RoomID
	Name      string        // also in its m.room.name state
	Encrypted bool          // every even-numbered room
	Members   []id.UserID   // joined members, the bot first
	State     []StoredEvent // state before the timeline
	Timeline  []StoredEvent // the recent event(s)
}

// Peer is a user with one device with real Olm keys. Its one-time keys are claimed in order;
// once they run out a claim returns none for it.
type Peer struct {
	UserID     id.UserID
	DeviceID   id.DeviceID
	DeviceKeys json.RawMessage                   // signed, as /keys/query returns it
	OTKs       []map[id.KeyID]mautrix.OneTimeKey // signed one-time keys, one per claim
	Account    *mcrypto.OlmAccount               // the keys' owner
	Rooms      []int                             // indexes of encrypted rooms it is in
}

// Account is a generated account.
type Account struct {
	Config   GenConfig         // with defaults applied
	Rooms    []Room            // most recent activity first
	Users    []id.UserID       // the pool, peers included
	Peers    []*Peer           // users with real device keys
	ToDevice []json.RawMessage // queued to-device events for the bot
}

// Generate builds an account from cfg. Only the Olm key material is random.
func Generate(cfg GenConfig) (*Account, error) {
	cfg = cfg.withDefaults()
	rng := rand.New(rand.NewPCG(cfg.Seed, cfg.Seed^0x9e3779b97f4a7c15))
	a := &Account{Config: cfg}
	for i := range cfg.Users {
		a.Users = append(a.Users, id.UserID(fmt.Sprintf("@user%05d:%s", i, ServerName)))
	}
	for i := range cfg.Peers {
		p, err := newPeer(id.UserID(fmt.Sprintf("@peer%d:%s", i, ServerName)), id.DeviceID(fmt.Sprintf("PEER%dDEV", i)), cfg.PeerOTKs)
		if err != nil {
			return nil, err
		}
		a.Peers = append(a.Peers, p)
		a.Users = append(a.Users, p.UserID)
	}
	pool := a.Users[:cfg.Users]
	for i := range cfg.Rooms {
		r := Room{
			ID:        id.RoomID(fmt.Sprintf("!r%06d-%08x:%s", i, rng.Uint32(), ServerName)),
			Name:      fmt.Sprintf("Room %d %s", i, words[rng.IntN(len(words))]),
			Encrypted: i%2 == 0,
		}
		creator := pool[rng.IntN(len(pool))]
		r.Members = []id.UserID{BotUserID, creator}
		for range 1 + rng.IntN(3) {
			u := pool[rng.IntN(len(pool))]
			if u != creator && !containsUser(r.Members, u) {
				r.Members = append(r.Members, u)
			}
		}
		if r.Encrypted && i%20 == 0 {
			// Peers sit in every tenth encrypted room; room 0 has two of them.
			p := a.Peers[(i/20)%len(a.Peers)]
			r.Members = append(r.Members, p.UserID)
			p.Rooms = append(p.Rooms, i)
			if i == 0 && len(a.Peers) > 1 {
				r.Members = append(r.Members, a.Peers[1].UserID)
				a.Peers[1].Rooms = append(a.Peers[1].Rooms, i)
			}
		}
		ts := baseTS - int64(i)*60_000
		ev := func(k int, typ string, stateKey *string, sender id.UserID, content any) StoredEvent {
			raw := map[string]any{
				"type": typ, "sender": sender, "content": content,
				"event_id":         fmt.Sprintf("$r%de%d-%s", i, k, ServerName),
				"origin_server_ts": ts - int64(100-k)*1000,
				"unsigned":         map[string]any{"age": 1000 + i},
			}
			if stateKey != nil {
				raw["state_key"] = *stateKey
			}
			b, err := json.Marshal(raw)
			if err != nil {
				panic(err) // only maps of strings and numbers
			}
			return StoredEvent{Type: typ, StateKey: stateKey, Sender: sender, JSON: b}
		}
		empty := ""
		k := 0
		add := func(typ string, stateKey *string, sender id.UserID, content any) {
			r.State = append(r.State, ev(k, typ, stateKey, sender, content))
			k++
		}
		add("m.room.create", &empty, creator, map[string]any{"room_version": "10", "creator": creator})
		levels := map[string]any{creator.String(): 100, BotUserID.String(): 50}
		add("m.room.power_levels", &empty, creator, map[string]any{"users": levels, "users_default": 0, "events_default": 0, "state_default": 50})
		add("m.room.join_rules", &empty, creator, map[string]any{"join_rule": "invite"})
		add("m.room.history_visibility", &empty, creator, map[string]any{"history_visibility": "shared"})
		add("m.room.name", &empty, creator, map[string]any{"name": r.Name})
		if r.Encrypted {
			add("m.room.encryption", &empty, creator, map[string]any{"algorithm": "m.megolm.v1.aes-sha2", "rotation_period_ms": 604800000})
		}
		for _, m := range r.Members[1:] {
			sk := m.String()
			add("m.room.member", &sk, m, map[string]any{"membership": "join", "displayname": displayName(m)})
		}
		botKey := BotUserID.String()
		botJoin := ev(k, "m.room.member", &botKey, BotUserID, map[string]any{"membership": "join", "displayname": "Bench bot"})
		k++
		if r.Encrypted {
			// The bot's own join is the latest event: history it cannot decrypt would make a
			// bot request keys for every room, which measures nothing about sync.
			r.Timeline = []StoredEvent{botJoin}
		} else {
			r.State = append(r.State, botJoin)
			r.Timeline = []StoredEvent{ev(k, "m.room.message", nil, creator, map[string]any{"msgtype": "m.notice", "body": fmt.Sprintf("status report %d", rng.IntN(1_000_000))})}
		}
		a.Rooms = append(a.Rooms, r)
	}
	for i := range max(cfg.ToDevice, 0) {
		// Withheld-key notices: ordinary traffic that mautrix stores without network work.
		p := a.Peers[rng.IntN(len(a.Peers))]
		b, _ := json.Marshal(map[string]any{
			"type": "m.room_key.withheld", "sender": p.UserID,
			"content": map[string]any{
				"algorithm":  "m.megolm.v1.aes-sha2",
				"room_id":    a.Rooms[rng.IntN(len(a.Rooms))].ID,
				"session_id": fmt.Sprintf("bench-session-%d-%08x", i, rng.Uint32()),
				"sender_key": p.Account.IdentityKey(),
				"code":       "m.unverified",
				"reason":     "Device not verified",
			},
		})
		a.ToDevice = append(a.ToDevice, b)
	}
	return a, nil
}

var words = []string{"alpha", "bravo", "harbour", "ops", "garden", "release", "support", "chess", "infra", "music", "travel", "books"}

func displayName(u id.UserID) string { return "User " + u.Localpart() }

func containsUser(list []id.UserID, u id.UserID) bool {
	for _, x := range list {
		if x == u {
			return true
		}
	}
	return false
}

// newPeer makes a device with real keys and signed one-time keys and a fallback key.
func newPeer(userID id.UserID, deviceID id.DeviceID, otks int) (*Peer, error) {
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
	p := &Peer{UserID: userID, DeviceID: deviceID, DeviceKeys: raw, Account: acct}
	sign := func(keyID string, key id.Curve25519) (map[id.KeyID]mautrix.OneTimeKey, error) {
		k := mautrix.OneTimeKey{Key: key, IsSigned: true}
		s, err := acct.SignJSON(&k)
		if err != nil {
			return nil, err
		}
		k.Signatures = signatures.NewSingleSignature(userID, id.KeyAlgorithmEd25519, deviceID.String(), s)
		return map[id.KeyID]mautrix.OneTimeKey{id.NewKeyID(id.KeyAlgorithmSignedCurve25519, keyID): k}, nil
	}
	if err := acct.Internal.GenOneTimeKeys(uint(otks)); err != nil {
		return nil, err
	}
	keys, err := acct.Internal.OneTimeKeys()
	if err != nil {
		return nil, err
	}
	for keyID, key := range keys {
		m, err := sign(keyID, key)
		if err != nil {
			return nil, err
		}
		p.OTKs = append(p.OTKs, m)
	}
	return p, nil
}
