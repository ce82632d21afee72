package slidingsync

import (
	"encoding/json"
	"fmt"
	"maps"
	"slices"
	"strings"

	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
)

// defaultTimelineCap is how many of the latest timeline events a RoomState keeps when
// Config.TimelineCap is zero.
const defaultTimelineCap = 20

// maxWindowIndex bounds the list window: an op that starts or puts a room at a higher index is
// rejected, so a hostile count or index cannot make the client allocate or shift without
// limit. A range may end past it (a server echoing a wide requested range).
const maxWindowIndex = 1 << 18

// maxListOps bounds the ops of one list in one response (servers send one per range, or a
// few DELETE/INSERT pairs), which bounds the cost of applying them.
const maxListOps = 1000

// StateKey identifies a piece of room state.
type StateKey struct {
	Type     string `json:"type"`      // event type
	StateKey string `json:"state_key"` // state key
}

// RoomState is what the client knows about one room after merging every processed response.
// A RoomState is never modified after it is built: MergeRoom returns a new one, so a pointer
// handed out stays a consistent snapshot.
type RoomState struct {
	ID         id.RoomID           `json:"room_id"`              // the room
	Name       string              `json:"name,omitempty"`       // the room name; empty when unset
	Avatar     id.ContentURIString `json:"avatar,omitempty"`     // the room avatar; empty when unset
	Heroes     []Hero              `json:"heroes,omitempty"`     // members that name a room without a name
	IsDM       bool                `json:"is_dm,omitempty"`      // the room is a direct message
	Membership event.Membership    `json:"membership,omitempty"` // the user's own membership, when the server says
	// State is the current required state, by type and state key.
	State map[StateKey]*event.Event `json:"-"`
	// Timeline holds the latest timeline events, oldest first, at most the configured cap.
	Timeline  []*event.Event `json:"timeline,omitempty"`
	PrevBatch string         `json:"prev_batch,omitempty"` // token to paginate back from the kept timeline
	// Limited is the limited flag of the last response that carried this room's timeline.
	Limited bool `json:"limited,omitempty"`
	// MembersStale is set when a response was limited: lazily loaded membership may be
	// missing changes and must be refreshed before encrypting to the room. It stays set;
	// the crypto layer keeps its own record of the rooms whose members it refreshed.
	MembersStale      bool           `json:"members_stale,omitempty"`
	NumLive           int            `json:"num_live,omitempty"`           // as in the last response that carried it
	JoinedCount       int            `json:"joined_count,omitempty"`       // joined members
	InvitedCount      int            `json:"invited_count,omitempty"`      // invited members
	NotificationCount int            `json:"notification_count,omitempty"` // as the server reports it (Synapse: always 0)
	HighlightCount    int            `json:"highlight_count,omitempty"`    // as the server reports it (Synapse: always 0)
	BumpStamp         int64          `json:"bump_stamp,omitempty"`         // ordering stamp of the last activity
	InviteState       []*event.Event `json:"invite_state,omitempty"`       // stripped state of an invite
}

// StateEvent returns the current state event of the given type and key, or nil.
func (rs *RoomState) StateEvent(evtType event.Type, stateKey string) *event.Event {
	if rs == nil {
		return nil
	}
	return rs.State[StateKey{Type: evtType.Type, StateKey: stateKey}]
}

func applyOpt[T any](dst *T, o Opt[T], initial bool) {
	switch {
	case o.Set && !o.Null:
		*dst = o.Val
	case o.Set && o.Null, initial:
		var zero T
		*dst = zero
	}
}

// MergeRoom applies one room entry to what was known (old may be nil) and returns the new state.
// It is pure: old is not modified. The rules: with r.Initial the entry replaces old and absent
// fields are unset; otherwise absent fields are unchanged and explicit nulls clear; a required
// state stub deletes that state; a limited timeline replaces the kept timeline and marks
// membership stale; otherwise new events are appended. At most timelineCap events are kept
// (defaultTimelineCap when timelineCap <= 0).
func MergeRoom(old *RoomState, roomID id.RoomID, r *RoomResponse, timelineCap int) *RoomState {
	if timelineCap <= 0 {
		timelineCap = defaultTimelineCap
	}
	next := &RoomState{ID: roomID}
	if old != nil && !r.Initial {
		*next = *old
		next.ID = roomID
	}
	if old != nil {
		// A gap is only closed by an explicit refresh, even across an initial entry.
		next.MembersStale = old.MembersStale
	}
	initial := r.Initial || old == nil
	applyOpt(&next.Name, r.Name, initial)
	applyOpt(&next.Avatar, r.Avatar, initial)
	applyOpt(&next.Heroes, r.Heroes, initial)
	applyOpt(&next.IsDM, r.IsDM, initial)
	applyOpt(&next.Membership, r.Membership, initial)
	applyOpt(&next.PrevBatch, r.PrevBatch, initial)
	applyOpt(&next.NumLive, r.NumLive, initial)
	applyOpt(&next.JoinedCount, r.JoinedCount, initial)
	applyOpt(&next.InvitedCount, r.InvitedCount, initial)
	applyOpt(&next.NotificationCount, r.NotificationCount, initial)
	applyOpt(&next.HighlightCount, r.HighlightCount, initial)
	applyOpt(&next.BumpStamp, r.BumpStamp, initial)
	applyOpt(&next.InviteState, r.InviteState, initial)
	// Synapse never sends null: a removed name or avatar shows only as its state event with
	// an empty value, when the entry carries it.
	if !r.Name.Set && emptyState(r, "m.room.name", "name") {
		next.Name = ""
	}
	if !r.Avatar.Set && emptyState(r, "m.room.avatar", "url") {
		next.Avatar = ""
	}

	if r.Initial || next.State == nil || len(r.RequiredState) > 0 {
		if r.Initial || next.State == nil {
			next.State = make(map[StateKey]*event.Event, len(r.RequiredState))
		} else {
			next.State = maps.Clone(next.State)
		}
		for _, evt := range r.RequiredState {
			key := StateKey{Type: evt.Type.Type, StateKey: *evt.StateKey}
			if IsStateStub(evt) {
				delete(next.State, key)
			} else {
				next.State[key] = evt
			}
		}
	}

	switch {
	case r.Initial || r.Limited || r.ExpandedTimeline || old == nil:
		// An expanded timeline (the room's timeline limit grew) re-sends older events: it
		// replaces what was kept rather than being appended.
		next.Timeline = lastN(r.Timeline, timelineCap)
	case len(r.Timeline) > 0:
		combined := make([]*event.Event, 0, min(len(next.Timeline)+len(r.Timeline), timelineCap))
		if keep := timelineCap - len(r.Timeline); keep > 0 {
			combined = append(combined, lastN(next.Timeline, keep)...)
		}
		next.Timeline = append(combined, lastN(r.Timeline, timelineCap)...)
	}
	if len(r.Timeline) > 0 || r.Initial {
		next.Limited = r.Limited
	}
	if r.Limited {
		next.MembersStale = true
	}
	return next
}

// compactRoom returns rs with every event whose content is decoded replaced by a copy that
// keeps the content as raw JSON only (Content.VeryRaw; Raw and Parsed nil), or rs itself when
// nothing needs it. rs and its events are not modified. Events without raw JSON (built in
// code) are kept as they are. See Config.CompactState.
func compactRoom(rs *RoomState) *RoomState {
	if rs == nil {
		return nil
	}
	var cp *RoomState
	var state, timeline, invite bool // the copy has its own map / slices
	for key, evt := range rs.State {
		if small, ok := compactEvent(evt); ok {
			if cp == nil {
				c := *rs
				cp = &c
			}
			if !state {
				cp.State, state = maps.Clone(rs.State), true
			}
			cp.State[key] = small
		}
	}
	for i, evt := range rs.Timeline {
		if small, ok := compactEvent(evt); ok {
			if cp == nil {
				c := *rs
				cp = &c
			}
			if !timeline {
				cp.Timeline, timeline = slices.Clone(rs.Timeline), true
			}
			cp.Timeline[i] = small
		}
	}
	for i, evt := range rs.InviteState {
		if small, ok := compactEvent(evt); ok {
			if cp == nil {
				c := *rs
				cp = &c
			}
			if !invite {
				cp.InviteState, invite = slices.Clone(rs.InviteState), true
			}
			cp.InviteState[i] = small
		}
	}
	if cp == nil {
		return rs
	}
	return cp
}

// compactEvent returns a copy of evt without decoded content, and false when evt has none
// to drop or no raw JSON to keep.
func compactEvent(evt *event.Event) (*event.Event, bool) {
	if evt == nil || len(evt.Content.VeryRaw) == 0 {
		return nil, false
	}
	prev := evt.Unsigned.PrevContent
	prevDecoded := prev != nil && len(prev.VeryRaw) > 0 && (prev.Raw != nil || prev.Parsed != nil)
	if evt.Content.Raw == nil && evt.Content.Parsed == nil && !prevDecoded {
		return nil, false
	}
	cp := *evt
	cp.Content = event.Content{VeryRaw: evt.Content.VeryRaw}
	if prevDecoded {
		cp.Unsigned.PrevContent = &event.Content{VeryRaw: prev.VeryRaw}
	}
	return &cp, true
}

// emptyState reports whether a room entry carries the current state event of the given type
// (state key "") with an empty or absent string field, or a stub of it. required_state is the
// current state and wins over state events of the timeline.
func emptyState(r *RoomResponse, evtType, field string) bool {
	var found *event.Event
	for _, evts := range [][]*event.Event{r.Timeline, r.RequiredState} {
		for _, evt := range evts {
			if evt != nil && evt.Type.Type == evtType && evt.StateKey != nil && *evt.StateKey == "" {
				found = evt
			}
		}
	}
	if found == nil {
		return false
	}
	if IsStateStub(found) {
		return true
	}
	var content map[string]any
	if found.Content.Raw != nil {
		content = found.Content.Raw
	} else if err := json.Unmarshal(found.Content.VeryRaw, &content); err != nil {
		return false
	}
	value, _ := content[field].(string)
	return value == ""
}

func lastN(evts []*event.Event, n int) []*event.Event {
	if len(evts) > n {
		evts = evts[len(evts)-n:]
	}
	return slices.Clone(evts)
}

// ListState is what the client knows about one list.
type ListState struct {
	// Count is the number of rooms matching the list.
	Count int `json:"count"`
	// Rooms is the ordered window (MSC3575 ops); an empty ID marks an unknown position.
	// It never extends past Count.
	Rooms []id.RoomID `json:"rooms,omitempty"`
}

func (op ListOp) validate() error {
	switch op.Op {
	case ListOpSync, ListOpInvalidate:
		if op.Range == nil {
			return fmt.Errorf("%s without range", op.Op)
		}
		// The end may lie past maxWindowIndex: Synapse echoes the range a client asked for,
		// however wide. Only the positions the op fills are bounded.
		if !op.Range.valid() || op.Range.Start >= maxWindowIndex {
			return fmt.Errorf("%s with invalid range [%d, %d]", op.Op, op.Range.Start, op.Range.End)
		}
		if op.Op == ListOpSync && len(op.RoomIDs)-1 > op.Range.End-op.Range.Start {
			return fmt.Errorf("SYNC of %d rooms into range [%d, %d]", len(op.RoomIDs), op.Range.Start, op.Range.End)
		}
		if op.Op == ListOpSync && op.Range.Start+len(op.RoomIDs) > maxWindowIndex {
			return fmt.Errorf("SYNC of %d rooms from %d: past position %d", len(op.RoomIDs), op.Range.Start, maxWindowIndex)
		}
	case ListOpInsert, ListOpDelete:
		if op.Index == nil {
			return fmt.Errorf("%s without index", op.Op)
		}
		if *op.Index < 0 || *op.Index >= maxWindowIndex {
			return fmt.Errorf("%s with invalid index %d", op.Op, *op.Index)
		}
		if op.Op == ListOpInsert && op.RoomID == "" {
			return fmt.Errorf("INSERT without room_id")
		}
	default:
		// Unknown ops are ignored by MergeList, as unknown fields are.
	}
	return nil
}

// MergeList applies a list's response part to what was known and returns the new state. It is
// pure. SYNC sets a range, INVALIDATE clears one, DELETE removes an index shifting later
// entries left, INSERT inserts at an index shifting later entries right (so a DELETE+INSERT
// pair moves the entries between them one step toward the deleted index, as MSC3575 says).
// Unknown ops are skipped. The window is cut to Count afterwards.
func MergeList(old ListState, lr ListResponse) (ListState, error) {
	next := ListState{Count: old.Count}
	if lr.Count.HasValue() {
		if lr.Count.Val < 0 {
			return old, fmt.Errorf("negative count %d", lr.Count.Val)
		}
		next.Count = lr.Count.Val
	}
	if len(lr.Ops) > maxListOps {
		return old, fmt.Errorf("%d ops, more than %d", len(lr.Ops), maxListOps)
	}
	for i, op := range lr.Ops {
		if err := op.validate(); err != nil {
			return old, fmt.Errorf("op %d: %w", i, err)
		}
	}
	rooms := applyOps(old.Rooms, next.Count, lr.Ops)
	if len(rooms) > next.Count {
		rooms = rooms[:next.Count]
	}
	// Trailing unknown positions carry no information.
	for len(rooms) > 0 && rooms[len(rooms)-1] == "" {
		rooms = rooms[:len(rooms)-1]
	}
	if len(rooms) == 0 {
		rooms = nil
	}
	// Sharing old's array is safe: windows are never written in place once built.
	next.Rooms = slices.Clip(rooms)
	return next, nil
}

// applyOps applies validated list ops to a window and returns the new window. It copies the
// window only when an op changes it: most responses carry a count or a SYNC of what is
// already known, and a large window is costly to copy on every response.
func applyOps(rooms []id.RoomID, count int, ops []ListOp) []id.RoomID {
	owned := false
	own := func() {
		if !owned {
			rooms, owned = slices.Clone(rooms), true
		}
	}
	set := func(j int, roomID id.RoomID) {
		if j < len(rooms) && rooms[j] == roomID {
			return
		}
		own()
		if j >= len(rooms) {
			rooms = append(rooms, make([]id.RoomID, j+1-len(rooms))...)
		}
		rooms[j] = roomID
	}
	for _, op := range ops {
		switch op.Op {
		case ListOpSync:
			// Positions past the given IDs are unknown: clear what is there, but do not
			// materialise them. Positions past the count are cut at the end anyway.
			for j := op.Range.Start; j <= op.Range.End && j < count; j++ {
				if k := j - op.Range.Start; k < len(op.RoomIDs) {
					set(j, op.RoomIDs[k])
				} else if j < len(rooms) {
					set(j, "")
				} else {
					break
				}
			}
		case ListOpInvalidate:
			for j := op.Range.Start; j <= op.Range.End && j < len(rooms); j++ {
				set(j, "")
			}
		case ListOpDelete:
			// An op at or past the count only moves positions that are cut at the end.
			if *op.Index < len(rooms) && *op.Index < count {
				own()
				rooms = slices.Delete(rooms, *op.Index, *op.Index+1)
			}
		case ListOpInsert:
			if *op.Index >= count {
				continue
			}
			own()
			if *op.Index > len(rooms) {
				rooms = append(rooms, make([]id.RoomID, *op.Index-len(rooms))...)
			}
			rooms = slices.Insert(rooms, *op.Index, op.RoomID)
		}
	}
	return rooms
}

type roomStateAlias RoomState

type roomStateJSON struct {
	*roomStateAlias
	RequiredState []*event.Event `json:"required_state,omitempty"`
}

// MarshalJSON writes the room with its state as a list of events, sorted by type and state
// key so that equal states encode to equal bytes.
func (rs RoomState) MarshalJSON() ([]byte, error) {
	keys := slices.SortedFunc(maps.Keys(rs.State), func(a, b StateKey) int {
		if a.Type != b.Type {
			return strings.Compare(a.Type, b.Type)
		}
		return strings.Compare(a.StateKey, b.StateKey)
	})
	w := roomStateJSON{roomStateAlias: (*roomStateAlias)(&rs), RequiredState: make([]*event.Event, 0, len(keys))}
	for _, k := range keys {
		w.RequiredState = append(w.RequiredState, rs.State[k])
	}
	return json.Marshal(w)
}

// UnmarshalJSON reads what MarshalJSON writes.
func (rs *RoomState) UnmarshalJSON(data []byte) error {
	*rs = RoomState{}
	w := roomStateJSON{roomStateAlias: (*roomStateAlias)(rs)}
	if err := json.Unmarshal(data, &w); err != nil {
		return err
	}
	rs.State = make(map[StateKey]*event.Event, len(w.RequiredState))
	for i, evt := range w.RequiredState {
		if evt == nil || evt.StateKey == nil {
			return fmt.Errorf("room state: required_state[%d] has no state_key", i)
		}
		rs.State[StateKey{Type: evt.Type.Type, StateKey: *evt.StateKey}] = evt
	}
	return nil
}
