package bot

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/rs/zerolog"
	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/sliding-e2ee/sdk/crypto"
	"github.com/sliding-e2ee/sdk/slidingsync"
)

// invitePrefix starts the inbox key of an invite: "invite|<room ID>".
const invitePrefix = "invite|"

// maxBackfillPages bounds how far back a limited timeline is filled (pages of 100 events).
const maxBackfillPages = 20

// staged is one event of the response being processed, written to the inbox by the commit.
type stagedEvent struct {
	key    string
	roomID id.RoomID
	raw    []byte
}

// ownSend is an event of the bot's own device seen in a timeline, with its transaction ID.
type ownSend struct {
	txn     string
	eventID id.EventID
}

// inbox is the bot's part of every commit: the response handler (onResponse) stages the
// response's events and returns a Step that writes them, the room state and what the
// timelines say of the bot's own sends in the commit transaction; the dispatcher works
// through what was committed.
type inbox struct {
	h       *Helper
	db      *dbutil.Database
	mach    *crypto.Machine
	account string
	created time.Time // events older than the bot's first start are history
	seq     int64     // last inbox sequence number; Run's goroutine of the Conn only

	invitedMu sync.Mutex
	invited   map[id.RoomID]bool // rooms with an invite row

	requested map[id.SessionID]bool // room keys asked for in this Run; the dispatcher's only

	wake      chan struct{} // a commit queued events
	responded chan struct{} // closed when the first response arrives
	firstOnce sync.Once
}

// start reads what the inbox needs before the connection runs: the last sequence number and
// the rooms with invite rows.
func (in *inbox) start(ctx context.Context) error {
	var last *int64
	if err := in.db.QueryRow(ctx, `SELECT MAX(seq) FROM ssbot_inbox WHERE account=$1`, in.account).Scan(&last); err != nil {
		return fmt.Errorf("bot: read the inbox: %w", err)
	}
	if last != nil {
		in.seq = *last
	}
	rows, err := in.db.Query(ctx, `SELECT room_id FROM ssbot_inbox WHERE account=$1 AND event_key LIKE 'invite|%'`, in.account)
	rooms, err := dbutil.NewRowIterWithError(rows, dbutil.ScanSingleColumn[id.RoomID], err).AsList()
	if err != nil {
		return fmt.Errorf("bot: read the invites: %w", err)
	}
	in.invited = make(map[id.RoomID]bool, len(rooms))
	for _, r := range rooms {
		in.invited[r] = true
	}
	return nil
}

// staging is what one response gives the inbox, written by the commit.
type staging struct {
	res       *slidingsync.Result
	events    []stagedEvent
	own       []ownSend
	uninvited []id.RoomID // rooms with a handled invite row that are no longer invites
}

// onResponse is the Conn's response handler: it stages the response's events for the
// commit, filling the gaps of limited timelines first, and returns the Step that writes them.
func (in *inbox) onResponse(ctx context.Context, res *slidingsync.Result) (slidingsync.Step, error) {
	in.firstOnce.Do(func() { close(in.responded) })
	st := &staging{res: res}
	if err := in.stage(ctx, st); err != nil {
		return slidingsync.Step{}, err
	}
	var step slidingsync.Step
	if in.h.cfg.OnResponse != nil {
		var err error
		if step, err = in.h.cfg.OnResponse(ctx, res); err != nil {
			return slidingsync.Step{}, err
		}
	}
	if len(res.Response.Rooms) == 0 {
		// An idle long-poll: nothing to write, nothing to wake.
		return step, nil
	}
	appCommit, appAfter := step.Commit, step.After
	step.Commit = func(ctx context.Context) error {
		if err := in.commit(ctx, st); err != nil {
			return err
		}
		if appCommit != nil {
			return appCommit(ctx)
		}
		return nil
	}
	step.After = func(ctx context.Context) {
		in.committed(st)
		if appAfter != nil {
			appAfter(ctx)
		}
	}
	return step, nil
}

// stage collects the response's events, invites and own sends.
func (in *inbox) stage(ctx context.Context, st *staging) error {
	me := in.h.cli.UserID
	res := st.res
	for roomID, room := range res.Response.Rooms {
		if room == nil {
			continue
		}
		if inv := room.InviteState; inv.HasValue() && len(inv.Val) > 0 {
			ev, err := in.stageInvite(roomID, inv.Val)
			if err != nil {
				return err
			}
			st.events = append(st.events, ev)
			continue
		}
		in.invitedMu.Lock()
		if in.invited[roomID] {
			st.uninvited = append(st.uninvited, roomID)
		}
		in.invitedMu.Unlock()
		timeline := room.Timeline
		if room.Limited && room.PrevBatch.HasValue() && len(timeline) > 0 && timeline[0] != nil &&
			!time.UnixMilli(timeline[0].Timestamp).Before(in.created) {
			// More happened than the timeline holds, since the bot exists: fetch what was left
			// out, so no event goes undispatched. A failure fails the cycle, which is retried.
			older, err := in.backfill(ctx, roomID, room.PrevBatch.Val)
			if err != nil {
				return fmt.Errorf("bot: fetch the events a limited timeline left out in %s: %w", roomID, err)
			}
			timeline = append(older, timeline...)
		}
		for _, evt := range timeline {
			if evt == nil || evt.ID == "" {
				continue
			}
			if evt.Sender == me {
				if txn := evt.Unsigned.TransactionID; txn != "" {
					st.own = append(st.own, ownSend{txn, evt.ID})
				}
				continue // the bot's own events are not dispatched
			}
			if time.UnixMilli(evt.Timestamp).Before(in.created) {
				continue
			}
			cp := *evt
			cp.RoomID = roomID
			raw, err := json.Marshal(&cp)
			if err != nil {
				return fmt.Errorf("bot: encode event %s: %w", evt.ID, err)
			}
			st.events = append(st.events, stagedEvent{key: evt.ID.String(), roomID: roomID, raw: raw})
		}
	}
	return nil
}

// stageInvite returns the bot's own member event of an invite, to stage.
func (in *inbox) stageInvite(roomID id.RoomID, state []*event.Event) (stagedEvent, error) {
	me := in.h.cli.UserID.String()
	for _, evt := range state {
		if evt == nil || evt.Type != event.StateMember || evt.StateKey == nil || *evt.StateKey != me {
			continue
		}
		cp := *evt
		cp.RoomID = roomID
		raw, err := json.Marshal(&cp)
		if err != nil {
			return stagedEvent{}, fmt.Errorf("bot: encode the invite to %s: %w", roomID, err)
		}
		return stagedEvent{key: invitePrefix + roomID.String(), roomID: roomID, raw: raw}, nil
	}
	// No member event for the bot (a server that strips it): an invite all the same.
	raw, err := json.Marshal(&event.Event{Type: event.StateMember, StateKey: &me, RoomID: roomID,
		Content: event.Content{Raw: map[string]any{"membership": "invite"}}})
	return stagedEvent{key: invitePrefix + roomID.String(), roomID: roomID, raw: raw}, err
}

// backfill pages back from a limited timeline's prev_batch until an event already in the
// inbox, or one from before the bot existed, and returns the events in between, oldest first.
func (in *inbox) backfill(ctx context.Context, roomID id.RoomID, from string) ([]*event.Event, error) {
	var newestFirst []*event.Event
	for page := 0; from != ""; page++ {
		if page == maxBackfillPages {
			zerolog.Ctx(ctx).Warn().Stringer("room_id", roomID).Int("events", len(newestFirst)).
				Msg("Stopped filling a timeline gap: older events are not dispatched")
			break
		}
		resp, err := in.h.cli.Messages(ctx, roomID, from, "", mautrix.DirectionBackward, nil, 100)
		if err != nil {
			return nil, err
		}
		for _, evt := range resp.Chunk {
			if evt == nil {
				continue
			}
			if time.UnixMilli(evt.Timestamp).Before(in.created) {
				slices.Reverse(newestFirst)
				return newestFirst, nil
			}
			var known bool
			err := in.db.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM ssbot_inbox WHERE account=$1 AND event_key=$2)`, in.account, evt.ID).Scan(&known)
			if err != nil {
				return nil, fmt.Errorf("look up %s: %w", evt.ID, err)
			}
			if known {
				slices.Reverse(newestFirst)
				return newestFirst, nil
			}
			newestFirst = append(newestFirst, evt)
		}
		from = resp.End
	}
	slices.Reverse(newestFirst)
	return newestFirst, nil
}

// commit writes, in the transaction that commits the response: the room state into
// mautrix's state store, the staged events into the inbox (an event seen again keeps its
// row), the bot's own sends seen in timelines into the outbox, and forgets handled invites
// of rooms that are no longer invites (so a later invite is dispatched again; one still
// being handled is handled to its end).
func (in *inbox) commit(ctx context.Context, st *staging) error {
	in.mach.HandleRooms(ctx, st.res)
	now := time.Now()
	for _, s := range st.events {
		in.seq = max(in.seq+1, now.UnixNano())
		_, err := in.db.Exec(ctx, `INSERT INTO ssbot_inbox (account, event_key, room_id, event, seq, queued_at) VALUES ($1, $2, $3, $4, $5, $6)
			ON CONFLICT (account, event_key) DO NOTHING`, in.account, s.key, s.roomID, string(s.raw), in.seq, now.UnixMilli())
		if err != nil {
			return fmt.Errorf("bot: queue %s: %w", s.key, err)
		}
	}
	for _, o := range st.own {
		_, err := in.db.Exec(ctx, `UPDATE ssbot_outbox SET event_id=$3 WHERE account=$1 AND txn_id=$2 AND event_id IS NULL`, in.account, o.txn, o.eventID)
		if err != nil {
			return fmt.Errorf("bot: note sent %s: %w", o.txn, err)
		}
	}
	for _, roomID := range st.uninvited {
		_, err := in.db.Exec(ctx, `DELETE FROM ssbot_inbox WHERE account=$1 AND event_key=$2`, in.account, invitePrefix+roomID.String())
		if err != nil {
			return fmt.Errorf("bot: forget the invite to %s: %w", roomID, err)
		}
	}
	return nil
}

// committed notes the invites the commit wrote and forgot, and wakes the dispatcher when it
// queued events.
func (in *inbox) committed(st *staging) {
	in.invitedMu.Lock()
	for _, roomID := range st.uninvited {
		delete(in.invited, roomID)
	}
	for _, s := range st.events {
		if strings.HasPrefix(s.key, invitePrefix) {
			in.invited[s.roomID] = true
		}
	}
	in.invitedMu.Unlock()
	if len(st.events) > 0 {
		select {
		case in.wake <- struct{}{}:
		default:
		}
	}
}
