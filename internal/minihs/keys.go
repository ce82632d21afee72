package minihs

import (
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"time"

	"maunium.net/go/mautrix/id"
)

// device is one device's keys and to-device queue.
type device struct {
	keys     json.RawMessage     // signed device keys, as uploaded
	otks     []storedKey         // unclaimed one-time keys, in upload order
	seen     map[id.KeyID]string // every one-time key ID ever uploaded, with its public key
	fallback *storedKey
	used     bool // the fallback key was handed out by a claim
	toDevice []toDeviceMsg
}

// storedKey is a key as uploaded: its raw JSON is served verbatim so that its signature
// verifies.
type storedKey struct {
	id  id.KeyID
	raw json.RawMessage
}

// toDeviceMsg is one queued to-device event.
type toDeviceMsg struct {
	seq int64
	raw json.RawMessage
}

func (d *device) unusedFallbackTypes() []id.KeyAlgorithm {
	if d.fallback != nil && !d.used {
		return []id.KeyAlgorithm{id.KeyAlgorithmSignedCurve25519}
	}
	return []id.KeyAlgorithm{}
}

// ack deletes the messages up to seq.
func (d *device) ack(seq int64) {
	i := 0
	for i < len(d.toDevice) && d.toDevice[i].seq <= seq {
		i++
	}
	d.toDevice = d.toDevice[i:]
}

// addDevice registers a device without keys. Caller holds s.mu or is constructing.
func (s *Server) addDevice(user id.UserID, dev id.DeviceID) *device {
	if s.devices[user] == nil {
		s.devices[user] = map[id.DeviceID]*device{}
	}
	d := &device{seen: map[id.KeyID]string{}}
	s.devices[user][dev] = d
	s.devOrder[user] = append(s.devOrder[user], dev)
	return d
}

// Upload is one /keys/upload as the server saw it.
type Upload struct {
	User   id.UserID
	Device id.DeviceID
	// DeviceKeys is set when the request carried device keys.
	DeviceKeys bool
	// OTKs is how many new one-time keys it carried.
	OTKs int
	// Fallback is the key ID of the fallback key it carried, empty if none.
	Fallback id.KeyID
	// Held is how many one-time keys the server held for the device afterwards.
	Held int
	At   time.Time // when the server stored it
}

// Query is one user looked up by a /keys/query.
type Query struct {
	By   id.UserID // who asked
	User id.UserID // about whom
	// Devices is how many devices with keys the answer listed.
	Devices int
	At      time.Time // when the server answered
}

// Claim is one key handed out by /keys/claim.
type Claim struct {
	By       id.UserID   // who claimed
	User     id.UserID   // whose key
	Device   id.DeviceID // whose key
	KeyID    id.KeyID    // the key handed out
	Fallback bool        // it was the fallback key
}

func (s *Server) keysUpload(w http.ResponseWriter, r *http.Request, who devRef) {
	var req struct {
		DeviceKeys   json.RawMessage            `json:"device_keys"`
		OneTimeKeys  map[string]json.RawMessage `json:"one_time_keys"`
		FallbackKeys map[string]json.RawMessage `json:"fallback_keys"`
	}
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<20)).Decode(&req); err != nil {
		writeError(w, http.StatusBadRequest, "M_BAD_JSON", "Invalid key upload.")
		return
	}
	if len(req.DeviceKeys) > 0 && string(req.DeviceKeys) != "null" {
		var dk struct {
			UserID   id.UserID   `json:"user_id"`
			DeviceID id.DeviceID `json:"device_id"`
		}
		if json.Unmarshal(req.DeviceKeys, &dk) != nil || dk.UserID != who.user || dk.DeviceID != who.device {
			writeError(w, http.StatusBadRequest, "M_INVALID_PARAM", "Device keys of another device.")
			return
		}
	} else {
		req.DeviceKeys = nil
	}
	var ev *Event
	defer func() { s.observePtr(ev) }()
	s.mu.Lock()
	defer s.mu.Unlock()
	d := s.devices[who.user][who.device]
	up := Upload{User: who.user, Device: who.device, At: time.Now()}
	changed := false
	if req.DeviceKeys != nil {
		up.DeviceKeys = true
		if d.keys == nil {
			// A new device: users sharing a room with its owner hear of it.
			if who.user != BotUserID {
				s.devLists = append(s.devLists, devChange{stream: s.nextStream(), user: who.user})
			}
		}
		d.keys = slices.Clone(req.DeviceKeys)
	}
	// A one-time key ID uploaded again with another key rejects the whole upload, as
	// Synapse does ("already exists"); the same key again is accepted and ignored.
	for keyID, raw := range req.OneTimeKeys {
		var k struct {
			Key string `json:"key"`
		}
		_ = json.Unmarshal(raw, &k)
		if old, ok := d.seen[id.KeyID(keyID)]; ok && old != k.Key {
			s.uploadRejections++
			writeError(w, http.StatusBadRequest, "M_INVALID_PARAM", "One time key "+keyID+" already exists.")
			return
		}
	}
	for _, keyID := range sortedKeys(req.OneTimeKeys) {
		if _, ok := d.seen[keyID]; ok || !strings.HasPrefix(string(keyID), string(id.KeyAlgorithmSignedCurve25519)+":") {
			continue
		}
		var k struct {
			Key string `json:"key"`
		}
		_ = json.Unmarshal(req.OneTimeKeys[string(keyID)], &k)
		d.seen[keyID] = k.Key
		d.otks = append(d.otks, storedKey{id: keyID, raw: slices.Clone(req.OneTimeKeys[string(keyID)])})
		up.OTKs++
		changed = true
	}
	for _, keyID := range sortedKeys(req.FallbackKeys) {
		if !strings.HasPrefix(string(keyID), string(id.KeyAlgorithmSignedCurve25519)+":") {
			continue
		}
		if d.fallback == nil || d.fallback.id != keyID {
			d.fallback = &storedKey{id: keyID, raw: slices.Clone(req.FallbackKeys[string(keyID)])}
			d.used = false
			up.Fallback = keyID
			changed = true
		}
		break
	}
	up.Held = len(d.otks)
	if changed && who.user == BotUserID && who.device == BotDeviceID {
		s.keysAt = s.nextStream()
	}
	if up.DeviceKeys || up.OTKs > 0 || up.Fallback != "" {
		s.uploads = append(s.uploads, up)
		s.notifyLocked()
	}
	writeJSON(w, http.StatusOK, map[string]any{"one_time_key_counts": map[string]int{string(id.KeyAlgorithmSignedCurve25519): len(d.otks)}})
	ev = &Event{Kind: KindKeysUpload, DeviceKeys: up.DeviceKeys, OTKs: up.OTKs, Fallback: up.Fallback != ""}
}

func sortedKeys(m map[string]json.RawMessage) []id.KeyID {
	out := make([]id.KeyID, 0, len(m))
	for k := range m {
		out = append(out, id.KeyID(k))
	}
	slices.Sort(out)
	return out
}

func (s *Server) keysQuery(w http.ResponseWriter, r *http.Request, who devRef) {
	var req struct {
		DeviceKeys map[id.UserID][]id.DeviceID `json:"device_keys"`
	}
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<20)).Decode(&req); err != nil {
		writeError(w, http.StatusBadRequest, "M_BAD_JSON", "Invalid key query.")
		return
	}
	var ev *Event
	defer func() { s.observePtr(ev) }()
	s.mu.Lock()
	defer s.mu.Unlock()
	out := map[id.UserID]map[id.DeviceID]json.RawMessage{}
	users := make([]id.UserID, 0, len(req.DeviceKeys))
	for u := range req.DeviceKeys {
		users = append(users, u)
	}
	slices.Sort(users)
	for _, u := range users {
		want := req.DeviceKeys[u]
		keys := map[id.DeviceID]json.RawMessage{}
		for _, dev := range s.devOrder[u] {
			d := s.devices[u][dev]
			if d.keys != nil && (len(want) == 0 || slices.Contains(want, dev)) {
				keys[dev] = d.keys
			}
		}
		out[u] = keys
		s.queries = append(s.queries, Query{By: who.user, User: u, Devices: len(keys), At: time.Now()})
	}
	ev = &Event{Kind: KindKeysQuery, Users: users}
	s.notifyLocked()
	writeJSON(w, http.StatusOK, map[string]any{
		"failures": map[string]any{}, "device_keys": out,
		"master_keys": map[string]any{}, "self_signing_keys": map[string]any{}, "user_signing_keys": map[string]any{},
	})
}

// keysClaim hands out one key per requested device: the oldest one-time key, or, when none
// is left, the fallback key, which is then reported as used.
func (s *Server) keysClaim(w http.ResponseWriter, r *http.Request, who devRef) {
	var req struct {
		OneTimeKeys map[id.UserID]map[id.DeviceID]id.KeyAlgorithm `json:"one_time_keys"`
	}
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<20)).Decode(&req); err != nil {
		writeError(w, http.StatusBadRequest, "M_BAD_JSON", "Invalid key claim.")
		return
	}
	var ev *Event
	defer func() { s.observePtr(ev) }()
	s.mu.Lock()
	defer s.mu.Unlock()
	out := map[id.UserID]map[id.DeviceID]map[id.KeyID]json.RawMessage{}
	for user, devs := range req.OneTimeKeys {
		for dev, alg := range devs {
			d := s.devices[user][dev]
			if d == nil || alg != id.KeyAlgorithmSignedCurve25519 {
				continue
			}
			var key *storedKey
			c := Claim{By: who.user, User: user, Device: dev}
			switch {
			case len(d.otks) > 0:
				key = &d.otks[0]
				d.otks = d.otks[1:]
			case d.fallback != nil:
				key, c.Fallback = d.fallback, true
				d.used = true
			default:
				continue
			}
			c.KeyID = key.id
			if out[user] == nil {
				out[user] = map[id.DeviceID]map[id.KeyID]json.RawMessage{}
			}
			out[user][dev] = map[id.KeyID]json.RawMessage{key.id: key.raw}
			s.claims = append(s.claims, c)
			if user == BotUserID && dev == BotDeviceID {
				s.keysAt = s.nextStream()
			}
			s.notifyLocked()
		}
	}
	writeJSON(w, http.StatusOK, map[string]any{"failures": map[string]any{}, "one_time_keys": out})
	ev = &Event{Kind: KindKeysClaim}
}

// sendToDevice queues messages per target device; "*" means every device of the user. A
// repeated transaction ID of the same device queues nothing.
func (s *Server) sendToDevice(w http.ResponseWriter, r *http.Request, who devRef) {
	var req struct {
		Messages map[id.UserID]map[id.DeviceID]json.RawMessage `json:"messages"`
	}
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 4<<20)).Decode(&req); err != nil {
		writeError(w, http.StatusBadRequest, "M_BAD_JSON", "Invalid to-device request.")
		return
	}
	evtType := r.PathValue("type")
	var ev *Event
	defer func() { s.observePtr(ev) }()
	s.mu.Lock()
	defer s.mu.Unlock()
	txnKey := fmt.Sprintf("%s\x00%s\x00%s", who.user, who.device, r.PathValue("txn"))
	if s.toDevTxns[txnKey] {
		writeJSON(w, http.StatusOK, map[string]any{})
		return
	}
	s.toDevTxns[txnKey] = true
	users := make([]id.UserID, 0, len(req.Messages))
	for u := range req.Messages {
		users = append(users, u)
	}
	slices.Sort(users)
	for _, u := range users {
		for _, dev := range s.devOrder[u] {
			content, ok := req.Messages[u][dev]
			if !ok {
				content, ok = req.Messages[u]["*"]
			}
			if !ok {
				continue
			}
			raw, err := json.Marshal(map[string]any{"type": evtType, "sender": who.user, "content": content})
			if err != nil {
				continue
			}
			s.toDevSeq++
			d := s.devices[u][dev]
			d.toDevice = append(d.toDevice, toDeviceMsg{seq: s.toDevSeq, raw: raw})
		}
	}
	s.notifyLocked()
	writeJSON(w, http.StatusOK, map[string]any{})
	ev = &Event{Kind: KindSendToDevice, EventType: evtType, Users: users}
}

// UploadRejections returns how many key uploads were rejected because a one-time key ID
// came again with another key.
func (s *Server) UploadRejections() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.uploadRejections
}

// RepeatedSends returns how many room sends repeated a transaction ID already used by the
// same device (answered with the first event, adding nothing).
func (s *Server) RepeatedSends() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.repeatedSends
}

// KeyCounts returns how many one-time keys the server holds for a device and its fallback
// key: its ID and whether it is still unused.
func (s *Server) KeyCounts(user id.UserID, dev id.DeviceID) (otks int, fallback id.KeyID, unused bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	d := s.devices[user][dev]
	if d == nil {
		return 0, "", false
	}
	if d.fallback != nil {
		fallback, unused = d.fallback.id, !d.used
	}
	return len(d.otks), fallback, unused
}

// Uploads returns the key uploads of a device, oldest first.
func (s *Server) Uploads(user id.UserID, dev id.DeviceID) []Upload {
	s.mu.Lock()
	defer s.mu.Unlock()
	return matching(s.uploads, func(u Upload) bool { return u.User == user && u.Device == dev })
}

// matching returns the items keep accepts, in order. Caller holds s.mu.
func matching[T any](items []T, keep func(T) bool) []T {
	var out []T
	for _, it := range items {
		if keep(it) {
			out = append(out, it)
		}
	}
	return out
}

// Queries returns the lookups of user in the key queries of by, oldest first.
func (s *Server) Queries(by, user id.UserID) []Query {
	s.mu.Lock()
	defer s.mu.Unlock()
	return matching(s.queries, func(q Query) bool { return q.By == by && q.User == user })
}

// Claims returns the keys of a device handed out by claims, oldest first.
func (s *Server) Claims(user id.UserID, dev id.DeviceID) []Claim {
	s.mu.Lock()
	defer s.mu.Unlock()
	return matching(s.claims, func(c Claim) bool { return c.User == user && c.Device == dev })
}

// Devices returns the devices of user, in order of creation.
func (s *Server) Devices(user id.UserID) []id.DeviceID {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.devOrder[user])
}

// PendingToDevice returns how many to-device messages wait for a device (not yet
// acknowledged).
func (s *Server) PendingToDevice(user id.UserID, dev id.DeviceID) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	if d := s.devices[user][dev]; d != nil {
		return len(d.toDevice)
	}
	return 0
}

// DropToDevice deletes the to-device messages queued for a device without delivering them, as
// when a sender's room key is lost on its way, and returns how many there were.
func (s *Server) DropToDevice(user id.UserID, dev id.DeviceID) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	d := s.devices[user][dev]
	if d == nil {
		return 0
	}
	n := len(d.toDevice)
	d.toDevice = nil
	return n
}

// peekToDevice returns the messages queued for a device without deleting them.
func (s *Server) peekToDevice(user id.UserID, dev id.DeviceID) []toDeviceMsg {
	s.mu.Lock()
	defer s.mu.Unlock()
	if d := s.devices[user][dev]; d != nil {
		return slices.Clone(d.toDevice)
	}
	return nil
}

// ackToDevice deletes the messages of a device up to seq.
func (s *Server) ackToDevice(user id.UserID, dev id.DeviceID, seq int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if d := s.devices[user][dev]; d != nil {
		d.ack(seq)
	}
}
