package slidingsync

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"strconv"

	"maunium.net/go/mautrix/id"
)

// Range is an inclusive window [Start, End] of a sorted room list.
type Range struct {
	Start, End int // inclusive bounds, 0-based
}

// MarshalJSON writes the range as a two-element array.
func (r Range) MarshalJSON() ([]byte, error) { return json.Marshal([2]int{r.Start, r.End}) }

// UnmarshalJSON reads a two-element array.
func (r *Range) UnmarshalJSON(data []byte) error {
	var pair []int
	if err := json.Unmarshal(data, &pair); err != nil {
		return err
	}
	if len(pair) != 2 {
		return fmt.Errorf("range must have 2 elements, got %d", len(pair))
	}
	r.Start, r.End = pair[0], pair[1]
	return nil
}

// valid reports whether the range is non-empty and non-negative.
func (r Range) valid() bool { return r.Start >= 0 && r.End >= r.Start }

// StateFilter selects state events by type and state key. "*" matches anything and "" is the
// empty state key, as in the tuple dialects; the state key "$ME" means the user's own ID.
type StateFilter struct {
	Type     string // event type, or "*"
	StateKey string // state key, "*", or "$ME"
}

// v4StateFilter is the merged MSC's element, where an omitted field is the wildcard.
type v4StateFilter struct {
	Type     *string `json:"type,omitempty"`
	StateKey *string `json:"state_key,omitempty"`
}

func wildcardToOmitted(v string) *string {
	if v == "*" {
		return nil
	}
	return &v
}

func omittedToWildcard(v *string) string {
	if v == nil {
		return "*"
	}
	return *v
}

func toV4Filters(fs []StateFilter) []v4StateFilter {
	if fs == nil {
		return nil
	}
	out := make([]v4StateFilter, len(fs))
	for i, f := range fs {
		out[i] = v4StateFilter{Type: wildcardToOmitted(f.Type), StateKey: wildcardToOmitted(f.StateKey)}
	}
	return out
}

func fromV4Filters(fs []v4StateFilter) []StateFilter {
	if fs == nil {
		return nil
	}
	out := make([]StateFilter, len(fs))
	for i, f := range fs {
		out[i] = StateFilter{Type: omittedToWildcard(f.Type), StateKey: omittedToWildcard(f.StateKey)}
	}
	return out
}

// RequiredState says which current state a room entry carries.
type RequiredState struct {
	// Include selects state to send.
	Include []StateFilter
	// Exclude removes state that Include selected by wildcard. Only the v4 dialect can
	// express it; encoding it for another dialect is an error.
	Exclude []StateFilter
	// LazyMembers asks for the membership of the senders of the timeline events
	// ($LAZY on the tuple dialects).
	LazyMembers bool
}

// ListFilters narrows which rooms a list contains. Nil pointers and nil slices are not sent.
type ListFilters struct {
	IsDM        *bool    `json:"is_dm,omitempty"`        // only DMs (true) or only non-DMs (false)
	Spaces      []string `json:"spaces,omitempty"`       // only rooms in these spaces
	IsEncrypted *bool    `json:"is_encrypted,omitempty"` // only encrypted (true) or unencrypted (false) rooms
	IsInvite    *bool    `json:"is_invite,omitempty"`    // is_invited on v4
	// RoomTypes and NotRoomTypes match room types; a nil entry means rooms without a type.
	RoomTypes    []*string `json:"room_types,omitempty"`
	NotRoomTypes []*string `json:"not_room_types,omitempty"` // see RoomTypes
	Tags         []string  `json:"tags,omitempty"`           // only rooms with one of these tags
	NotTags      []string  `json:"not_tags,omitempty"`       // no rooms with any of these tags
	// RoomNameLike is not part of the v4 dialect and is dropped there.
	RoomNameLike string `json:"room_name_like,omitempty"`
}

// ListConfig is one sliding window list, as the client wants it. The whole configuration is
// sent on every request: the client keeps stickiness.
type ListConfig struct {
	// Ranges is the window. The v4 dialect takes one range: the first is sent. None means
	// every room: a Conn sends no range on v4 and [0, maxWindowIndex-1] on MSC3575 and
	// MSC4186 (Synapse sends no room at all for a list without ranges).
	Ranges []Range
	// Sort is sent on MSC3575 only; other dialects order by recent activity.
	Sort []string
	// RequiredState is the current state each room entry carries.
	RequiredState RequiredState
	// TimelineLimit is how many recent timeline events each room entry carries.
	TimelineLimit int
	// Filters narrows the list. Nil means all rooms.
	Filters *ListFilters
	// IncludeHeroes asks for heroes on rooms without a name.
	IncludeHeroes bool
	// BumpEventTypes is sent on MSC3575 only.
	BumpEventTypes []string
	// SlowGetAllRooms is sent on MSC3575 and MSC4186 only.
	SlowGetAllRooms bool
}

// RoomSubscription asks for one room regardless of lists.
type RoomSubscription struct {
	RequiredState RequiredState // current state the room entry carries
	TimelineLimit int           // recent timeline events the room entry carries
	IncludeHeroes bool          // heroes for a room without a name
}

// Request is one sliding sync request in dialect-neutral form. [EncodeRequest] turns it into
// the wire form of a protocol and [DecodeRequest] parses any of them back.
type Request struct {
	// ConnID separates concurrent connections of one device.
	ConnID string
	// TxnID is echoed by MSC3575 servers; other dialects drop it.
	TxnID string
	// Pos is the opaque position of the last processed response; empty starts a connection.
	Pos string
	// Timeout is the long-poll time in milliseconds; nil leaves it to the server.
	Timeout           *int64
	Lists             map[string]ListConfig          // lists by name
	RoomSubscriptions map[id.RoomID]RoomSubscription // subscriptions by room
	// UnsubscribeRooms is sent on MSC3575 only, where subscriptions are sticky.
	UnsubscribeRooms []id.RoomID
	// DeletedLists is sent on MSC3575 only, where lists are sticky: each becomes
	// {"deleted": true} under its name. A name also in Lists is not deleted.
	DeletedLists []string
	// Extensions maps each extension's wire key to its request body.
	Extensions map[string]json.RawMessage
}

type wireRequest struct {
	ConnID            string                     `json:"conn_id,omitempty"`
	TxnID             string                     `json:"txn_id,omitempty"`
	Pos               string                     `json:"pos,omitempty"`
	Timeout           *int64                     `json:"timeout,omitempty"`
	Lists             map[string]wireList        `json:"lists,omitzero"`
	RoomSubscriptions map[id.RoomID]wireRoomSub  `json:"room_subscriptions,omitempty"`
	UnsubscribeRooms  []id.RoomID                `json:"unsubscribe_rooms,omitempty"`
	Extensions        map[string]json.RawMessage `json:"extensions,omitempty"`
}

type wireList struct {
	Ranges          []Range         `json:"ranges,omitempty"`
	Range           *Range          `json:"range,omitempty"`
	Sort            []string        `json:"sort,omitempty"`
	RequiredState   json.RawMessage `json:"required_state,omitempty"`
	TimelineLimit   *int            `json:"timeline_limit,omitempty"`
	Filters         json.RawMessage `json:"filters,omitempty"`
	IncludeHeroes   bool            `json:"include_heroes,omitempty"`
	BumpEventTypes  []string        `json:"bump_event_types,omitempty"`
	SlowGetAllRooms bool            `json:"slow_get_all_rooms,omitempty"`
	Deleted         bool            `json:"deleted,omitempty"`
}

type wireRoomSub struct {
	RequiredState json.RawMessage `json:"required_state,omitempty"`
	TimelineLimit *int            `json:"timeline_limit,omitempty"`
	IncludeHeroes bool            `json:"include_heroes,omitempty"`
}

type wireRequiredStateObject struct {
	Include     []v4StateFilter `json:"include,omitempty"`
	Exclude     []v4StateFilter `json:"exclude,omitempty"`
	LazyMembers bool            `json:"lazy_members,omitempty"`
}

const lazyStateKey = "$LAZY"

func encodeRequiredState(p Protocol, rs RequiredState) (json.RawMessage, error) {
	if p == ProtocolV4 {
		return json.Marshal(wireRequiredStateObject{Include: toV4Filters(rs.Include), Exclude: toV4Filters(rs.Exclude), LazyMembers: rs.LazyMembers})
	}
	if len(rs.Exclude) > 0 {
		return nil, fmt.Errorf("required_state exclusions need the v4 dialect, not %s", p)
	}
	tuples := make([][2]string, 0, len(rs.Include)+1)
	for _, f := range rs.Include {
		tuples = append(tuples, [2]string{f.Type, f.StateKey})
	}
	if rs.LazyMembers {
		tuples = append(tuples, [2]string{"m.room.member", lazyStateKey})
	}
	return json.Marshal(tuples)
}

func decodeRequiredState(raw json.RawMessage) (RequiredState, error) {
	var rs RequiredState
	if len(raw) == 0 || string(raw) == "null" {
		return rs, nil
	}
	switch firstByte(raw) {
	case '[':
		var tuples [][]string
		if err := json.Unmarshal(raw, &tuples); err != nil {
			return rs, fmt.Errorf("required_state: %w", err)
		}
		for _, t := range tuples {
			if len(t) != 2 {
				return rs, fmt.Errorf("required_state entry must have 2 elements, got %d", len(t))
			}
			if t[0] == "m.room.member" && t[1] == lazyStateKey {
				rs.LazyMembers = true
				continue
			}
			rs.Include = append(rs.Include, StateFilter{Type: t[0], StateKey: t[1]})
		}
	case '{':
		var obj wireRequiredStateObject
		if err := json.Unmarshal(raw, &obj); err != nil {
			return rs, fmt.Errorf("required_state: %w", err)
		}
		rs = RequiredState{Include: fromV4Filters(obj.Include), Exclude: fromV4Filters(obj.Exclude), LazyMembers: obj.LazyMembers}
	default:
		return rs, errors.New("required_state must be an array or an object")
	}
	return rs, nil
}

func firstByte(raw []byte) byte {
	for _, b := range raw {
		switch b {
		case ' ', '\t', '\r', '\n':
			continue
		}
		return b
	}
	return 0
}

func encodeFilters(p Protocol, f *ListFilters) (json.RawMessage, error) {
	if f == nil {
		return nil, nil
	}
	if p != ProtocolV4 {
		return json.Marshal(f)
	}
	v4 := struct {
		ListFilters
		IsInvite     *bool  `json:"is_invite,omitempty"`
		IsInvited    *bool  `json:"is_invited,omitempty"`
		RoomNameLike string `json:"room_name_like,omitempty"`
	}{ListFilters: *f, IsInvited: f.IsInvite}
	return json.Marshal(v4)
}

func decodeFilters(raw json.RawMessage) (*ListFilters, error) {
	if len(raw) == 0 || string(raw) == "null" {
		return nil, nil
	}
	var w struct {
		ListFilters
		IsInvited *bool `json:"is_invited,omitempty"`
	}
	if err := json.Unmarshal(raw, &w); err != nil {
		return nil, fmt.Errorf("filters: %w", err)
	}
	if w.IsInvite == nil {
		w.IsInvite = w.IsInvited
	}
	return &w.ListFilters, nil
}

// EncodeRequest returns the query parameters and JSON body of req in protocol p's dialect.
// Fields a dialect cannot carry are dropped as documented on each field; a setting it cannot
// express at all (such as required_state exclusions outside v4), or that its servers refuse
// (on MSC4186, as Synapse: more than 100 lists, a list name over 64 characters, a timeline
// limit over 1000, the spaces and room_name_like filters), is an error.
func EncodeRequest(p Protocol, req *Request) (url.Values, []byte, error) {
	if !p.valid() {
		return nil, nil, fmt.Errorf("slidingsync: cannot encode for protocol %q", p)
	}
	if err := checkServable(p, req); err != nil {
		return nil, nil, err
	}
	query := url.Values{}
	w := wireRequest{ConnID: req.ConnID, Extensions: req.Extensions}
	if p.posInQuery() {
		if req.Pos != "" {
			query.Set("pos", req.Pos)
		}
		if req.Timeout != nil {
			query.Set("timeout", strconv.FormatInt(*req.Timeout, 10))
		}
	} else {
		w.Pos, w.Timeout = req.Pos, req.Timeout
	}
	if p == ProtocolMSC3575 {
		w.TxnID = req.TxnID
		w.UnsubscribeRooms = req.UnsubscribeRooms
	}
	if len(req.Lists) > 0 {
		w.Lists = make(map[string]wireList, len(req.Lists))
		for name, lc := range req.Lists {
			wl, err := encodeList(p, lc)
			if err != nil {
				return nil, nil, fmt.Errorf("slidingsync: list %q: %w", name, err)
			}
			w.Lists[name] = wl
		}
	} else if p == ProtocolMSC4186 || p == ProtocolMSC3575 {
		// Both servers accept an empty object; it makes an extensions-only connection explicit.
		w.Lists = map[string]wireList{}
	}
	if p == ProtocolMSC3575 {
		for _, name := range req.DeletedLists {
			if _, kept := req.Lists[name]; !kept {
				w.Lists[name] = wireList{Deleted: true}
			}
		}
	}
	if len(req.RoomSubscriptions) > 0 {
		w.RoomSubscriptions = make(map[id.RoomID]wireRoomSub, len(req.RoomSubscriptions))
		for roomID, sub := range req.RoomSubscriptions {
			rs, err := encodeRequiredState(p, sub.RequiredState)
			if err != nil {
				return nil, nil, fmt.Errorf("slidingsync: subscription %s: %w", roomID, err)
			}
			limit := sub.TimelineLimit
			w.RoomSubscriptions[roomID] = wireRoomSub{RequiredState: rs, TimelineLimit: &limit, IncludeHeroes: sub.IncludeHeroes}
		}
	}
	body, err := json.Marshal(&w)
	if err != nil {
		return nil, nil, fmt.Errorf("slidingsync: encode request: %w", err)
	}
	return query, body, nil
}

func encodeList(p Protocol, lc ListConfig) (wireList, error) {
	var wl wireList
	for _, r := range lc.Ranges {
		if !r.valid() {
			return wl, fmt.Errorf("invalid range [%d, %d]", r.Start, r.End)
		}
	}
	if p == ProtocolV4 {
		if len(lc.Ranges) > 0 {
			r := lc.Ranges[0]
			wl.Range = &r
		}
	} else {
		wl.Ranges = lc.Ranges
		wl.SlowGetAllRooms = lc.SlowGetAllRooms
	}
	if p == ProtocolMSC3575 {
		wl.Sort = lc.Sort
		wl.BumpEventTypes = lc.BumpEventTypes
	}
	var err error
	if wl.RequiredState, err = encodeRequiredState(p, lc.RequiredState); err != nil {
		return wl, err
	}
	if wl.Filters, err = encodeFilters(p, lc.Filters); err != nil {
		return wl, err
	}
	limit := lc.TimelineLimit
	wl.TimelineLimit = &limit
	wl.IncludeHeroes = lc.IncludeHeroes
	return wl, nil
}

// DecodeRequest parses a request of any dialect: pos and timeout are read from the body when
// present there, else from the query.
func DecodeRequest(query url.Values, body []byte) (*Request, error) {
	var w wireRequest
	if len(body) > 0 {
		if err := json.Unmarshal(body, &w); err != nil {
			return nil, fmt.Errorf("slidingsync: decode request: %w", err)
		}
	}
	req := &Request{
		ConnID:           w.ConnID,
		TxnID:            w.TxnID,
		Pos:              w.Pos,
		Timeout:          w.Timeout,
		UnsubscribeRooms: w.UnsubscribeRooms,
		Extensions:       w.Extensions,
	}
	if req.Pos == "" {
		req.Pos = query.Get("pos")
	}
	if req.Timeout == nil && query.Has("timeout") {
		t, err := strconv.ParseInt(query.Get("timeout"), 10, 64)
		if err != nil {
			return nil, fmt.Errorf("slidingsync: decode request: timeout: %w", err)
		}
		req.Timeout = &t
	}
	if w.Lists != nil {
		req.Lists = make(map[string]ListConfig, len(w.Lists))
		for name, wl := range w.Lists {
			if wl.Deleted {
				req.DeletedLists = append(req.DeletedLists, name)
				continue
			}
			lc := ListConfig{
				Ranges:          wl.Ranges,
				Sort:            wl.Sort,
				IncludeHeroes:   wl.IncludeHeroes,
				BumpEventTypes:  wl.BumpEventTypes,
				SlowGetAllRooms: wl.SlowGetAllRooms,
			}
			if wl.Range != nil {
				lc.Ranges = []Range{*wl.Range}
			}
			if wl.TimelineLimit != nil {
				lc.TimelineLimit = *wl.TimelineLimit
			}
			var err error
			if lc.RequiredState, err = decodeRequiredState(wl.RequiredState); err != nil {
				return nil, fmt.Errorf("slidingsync: decode request: list %q: %w", name, err)
			}
			if lc.Filters, err = decodeFilters(wl.Filters); err != nil {
				return nil, fmt.Errorf("slidingsync: decode request: list %q: %w", name, err)
			}
			req.Lists[name] = lc
		}
	}
	if w.RoomSubscriptions != nil {
		req.RoomSubscriptions = make(map[id.RoomID]RoomSubscription, len(w.RoomSubscriptions))
		for roomID, ws := range w.RoomSubscriptions {
			sub := RoomSubscription{IncludeHeroes: ws.IncludeHeroes}
			if ws.TimelineLimit != nil {
				sub.TimelineLimit = *ws.TimelineLimit
			}
			var err error
			if sub.RequiredState, err = decodeRequiredState(ws.RequiredState); err != nil {
				return nil, fmt.Errorf("slidingsync: decode request: subscription %s: %w", roomID, err)
			}
			req.RoomSubscriptions[roomID] = sub
		}
	}
	return req, nil
}
