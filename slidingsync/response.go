package slidingsync

import (
	"encoding/json"
	"fmt"

	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
)

// Response is one sliding sync response. One type decodes every dialect: fields a dialect does
// not send stay absent, and unknown fields are ignored.
type Response struct {
	// Pos is the opaque position to send with the next request once this one is processed.
	Pos string `json:"pos"`
	// TxnID is the MSC3575 echo of the request's txn_id.
	TxnID string `json:"txn_id,omitempty"`
	// Lists holds per-list counts and, on MSC3575 and Synapse, window operations.
	Lists map[string]ListResponse `json:"lists,omitempty"`
	// Rooms holds room entries that are new on this connection or changed.
	Rooms map[id.RoomID]*RoomResponse `json:"rooms,omitempty"`
	// Extensions maps an extension's wire key to its raw response body.
	Extensions map[string]json.RawMessage `json:"extensions,omitempty"`
}

// ListResponse is a list's part of a response.
type ListResponse struct {
	// Count is the number of rooms matching the list; absent means unchanged.
	Count Opt[int] `json:"count,omitzero"`
	// Ops are window operations (MSC3575; Synapse sends one SYNC per range).
	Ops []ListOp `json:"ops,omitempty"`
}

// ListOpKind is the operation of a ListOp.
type ListOpKind string

// The list operations of MSC3575.
const (
	ListOpSync       ListOpKind = "SYNC"
	ListOpInsert     ListOpKind = "INSERT"
	ListOpDelete     ListOpKind = "DELETE"
	ListOpInvalidate ListOpKind = "INVALIDATE"
)

// ListOp changes a list's window. SYNC and INVALIDATE use Range; INSERT and DELETE use Index.
type ListOp struct {
	Op      ListOpKind  `json:"op"`                 // the operation
	Range   *Range      `json:"range,omitempty"`    // SYNC and INVALIDATE: the positions affected
	RoomIDs []id.RoomID `json:"room_ids,omitempty"` // SYNC: the rooms at Range.Start onwards
	Index   *int        `json:"index,omitempty"`    // INSERT and DELETE: the position
	RoomID  id.RoomID   `json:"room_id,omitempty"`  // INSERT: the room inserted
}

// Hero is a member used to name a room that has no name.
type Hero struct {
	UserID      id.UserID           `json:"user_id"`               // the member
	DisplayName string              `json:"displayname,omitempty"` // their display name, if any
	AvatarURL   id.ContentURIString `json:"avatar_url,omitempty"`  // their avatar, if any
}

// RoomResponse is one room's entry in a response. With Initial set it replaces what the client
// knew and an absent field means unset; otherwise an absent field is unchanged and an explicit
// null clears it.
type RoomResponse struct {
	Name    Opt[string]              `json:"name,omitzero"`     // null: the room lost its name
	Avatar  Opt[id.ContentURIString] `json:"avatar,omitzero"`   // null: the room lost its avatar
	Heroes  Opt[[]Hero]              `json:"heroes,omitzero"`   // members that name a room without a name
	Initial bool                     `json:"initial,omitempty"` // full data: replaces what the client knew
	IsDM    Opt[bool]                `json:"is_dm,omitzero"`    // the room is a direct message
	// Membership is the user's own membership (MSC4186).
	Membership Opt[event.Membership] `json:"membership,omitzero"`
	// RequiredState is current state. An entry without content is a stub meaning "deleted".
	RequiredState []*event.Event `json:"required_state,omitempty"`
	// Timeline holds the latest events, oldest first.
	Timeline  []*event.Event `json:"timeline,omitempty"`
	PrevBatch Opt[string]    `json:"prev_batch,omitzero"` // token to paginate back from the timeline
	// Limited says the timeline has a gap; lazily loaded membership may be stale.
	Limited bool `json:"limited,omitempty"`
	// ExpandedTimeline is decoded from both expanded_timeline and unstable_expanded_timeline.
	ExpandedTimeline bool     `json:"expanded_timeline,omitempty"`
	NumLive          Opt[int] `json:"num_live,omitzero"`      // how many timeline events are new since the last response
	JoinedCount      Opt[int] `json:"joined_count,omitzero"`  // joined members
	InvitedCount     Opt[int] `json:"invited_count,omitzero"` // invited members
	// NotificationCount and HighlightCount are always 0 from Synapse and absent in v4.
	NotificationCount Opt[int]   `json:"notification_count,omitzero"`
	HighlightCount    Opt[int]   `json:"highlight_count,omitzero"` // see NotificationCount
	BumpStamp         Opt[int64] `json:"bump_stamp,omitzero"`      // ordering stamp of the last activity
	// InviteState is the stripped state of an invite, decoded from invite_state or
	// stripped_state.
	InviteState Opt[[]*event.Event] `json:"invite_state,omitzero"`
}

type roomResponseAlias RoomResponse

type roomResponseWire struct {
	*roomResponseAlias
	UnstableExpandedTimeline bool                `json:"unstable_expanded_timeline,omitempty"`
	StrippedState            Opt[[]*event.Event] `json:"stripped_state,omitzero"`
}

// UnmarshalJSON accepts both spellings seen in the wild for the invite state and the expanded
// timeline flag. It does no merging.
func (r *RoomResponse) UnmarshalJSON(data []byte) error {
	*r = RoomResponse{}
	w := roomResponseWire{roomResponseAlias: (*roomResponseAlias)(r)}
	if err := json.Unmarshal(data, &w); err != nil {
		return err
	}
	if w.UnstableExpandedTimeline {
		r.ExpandedTimeline = true
	}
	if !r.InviteState.Set && w.StrippedState.Set {
		r.InviteState = w.StrippedState
	}
	return nil
}

// IsStateStub reports whether a required_state entry is a stub {type, state_key} without
// content, which the merged MSC uses to say the state was deleted.
func IsStateStub(evt *event.Event) bool {
	return evt != nil && evt.Content.VeryRaw == nil && evt.Content.Raw == nil && evt.Content.Parsed == nil
}

// DecodeResponse parses a response body. It rejects what no dialect sends (a missing pos, a
// room with an invalid ID) with an error that says so, so a broken server cannot corrupt state.
func DecodeResponse(body []byte) (*Response, error) {
	var resp Response
	if err := json.Unmarshal(body, &resp); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalidResponse, err)
	}
	if err := resp.validate(); err != nil {
		return nil, err
	}
	return &resp, nil
}

// validate checks the invariants the merge relies on.
func (r *Response) validate() error {
	if r.Pos == "" {
		return fmt.Errorf("%w: no pos", ErrInvalidResponse)
	}
	for roomID, room := range r.Rooms {
		if room == nil {
			return fmt.Errorf("%w: room %s is null", ErrInvalidResponse, roomID)
		}
		if len(roomID) < 2 || roomID[0] != '!' {
			return fmt.Errorf("%w: invalid room ID %q", ErrInvalidResponse, roomID)
		}
		for i, evt := range room.RequiredState {
			if evt == nil || evt.StateKey == nil {
				return fmt.Errorf("%w: room %s: required_state[%d] has no state_key", ErrInvalidResponse, roomID, i)
			}
		}
		for i, evt := range room.Timeline {
			if evt == nil {
				return fmt.Errorf("%w: room %s: timeline[%d] is null", ErrInvalidResponse, roomID, i)
			}
		}
		for i, evt := range room.InviteState.Val {
			if evt == nil {
				return fmt.Errorf("%w: room %s: invite state[%d] is null", ErrInvalidResponse, roomID, i)
			}
		}
	}
	for name, l := range r.Lists {
		if len(l.Ops) > maxListOps {
			return fmt.Errorf("%w: list %q has %d ops, more than %d", ErrInvalidResponse, name, len(l.Ops), maxListOps)
		}
		for i, op := range l.Ops {
			if err := op.validate(); err != nil {
				return fmt.Errorf("%w: list %q op %d: %w", ErrInvalidResponse, name, i, err)
			}
		}
	}
	return nil
}
