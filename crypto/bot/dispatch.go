package bot

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net/http"
	"strings"
	"time"

	"github.com/rs/zerolog"
	"maunium.net/go/mautrix"
	mcrypto "maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
)

// item is one pending inbox row, as the dispatcher holds it.
type item struct {
	key    string
	roomID id.RoomID
	raw    string
	seq    int64
	// queuedAt is when the event was queued, or when this Run's dispatcher started if that is
	// later: an event waits for its room key (Config.KeyWait, KeyRequestDelay) only while the
	// bot runs, so a restart after a long stop does not give up what the to-device backlog
	// may still deliver.
	queuedAt time.Time

	evt     *event.Event // decoded on first use
	waiting bool         // waits for its room key
	tries   int          // failed attempts (an invite's join, a room key request)
	nextTry time.Time    // not before, after a failed attempt

	// The room key a waiting event needs, and when to ask its sender for it (zero: asked).
	roomKey  *event.EncryptedEventContent
	askAfter time.Time
}

// load reads the pending inbox rows after seq, in order. Their clock starts no earlier than
// started.
func (in *inbox) load(ctx context.Context, after int64, started time.Time) ([]*item, error) {
	rows, err := in.db.Query(ctx, `SELECT event_key, room_id, event, seq, queued_at FROM ssbot_inbox
		WHERE account=$1 AND done=false AND seq>$2 ORDER BY seq`, in.account, after)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var items []*item
	for rows.Next() {
		it := &item{}
		var queued int64
		if err := rows.Scan(&it.key, &it.roomID, &it.raw, &it.seq, &queued); err != nil {
			return nil, err
		}
		it.queuedAt = time.UnixMilli(queued)
		if it.queuedAt.Before(started) {
			it.queuedAt = started
		}
		items = append(items, it)
	}
	return items, rows.Err()
}

// dispatchLoop dispatches the committed events, in the order they were committed, until ctx
// is done. It starts once the device keys are on the server. An event whose room key has not
// arrived waits without holding back the others, and is tried again when a room key is
// committed.
func (in *inbox) dispatchLoop(ctx context.Context) error {
	select {
	case <-ctx.Done():
		return context.Cause(ctx)
	case <-in.mach.KeysUploaded():
	}
	in.h.readyOnce.Do(func() { close(in.h.ready) })
	started := time.Now()
	var queue []*item
	after := int64(math.MinInt64)
	load, keys := true, false
	var pruned time.Time
	for {
		// Taken before any decryption is tried: a key committed from now on closes it.
		keyCommitted := in.mach.RoomKeyCommitted()
		if load {
			items, err := in.load(ctx, after, started)
			if err != nil {
				return fmt.Errorf("bot: read the inbox: %w", err)
			}
			if len(items) > 0 {
				after = items[len(items)-1].seq
				queue = append(queue, items...)
			}
		}
		var next time.Time
		var waiting bool
		var err error
		if queue, next, waiting, err = in.pass(ctx, queue, keys); err != nil {
			return err
		}
		pruned = in.pruneIfDue(ctx, pruned)
		var timer <-chan time.Time
		var t *time.Timer
		if !next.IsZero() {
			t = time.NewTimer(time.Until(next))
			timer = t.C
		}
		var keyCh <-chan struct{}
		if waiting {
			keyCh = keyCommitted
		}
		load, keys = false, false
		select {
		case <-ctx.Done():
			return context.Cause(ctx)
		case <-in.wake:
			load = true
		case <-keyCh:
			keys = true
		case <-timer:
		}
		if t != nil {
			t.Stop()
		}
	}
}

// pass tries every queued event that is due (keys: a room key was committed since the last
// pass) and returns those still queued, the earliest time one is due again, and whether one
// waits for a room key.
func (in *inbox) pass(ctx context.Context, queue []*item, keys bool) (kept []*item, next time.Time, waiting bool, err error) {
	log := zerolog.Ctx(ctx)
	now := time.Now()
	kept = queue[:0]
	for _, it := range queue {
		switch {
		case it.waiting && !keys && now.Sub(it.queuedAt) < in.h.cfg.KeyWait:
		case !it.nextTry.IsZero() && now.Before(it.nextTry):
		default:
			done, err := in.handle(ctx, it)
			if ctx.Err() != nil {
				return nil, time.Time{}, false, context.Cause(ctx)
			}
			if err != nil {
				it.tries++
				it.nextTry = now.Add(min(time.Second<<min(it.tries, 6), time.Minute))
				log.Warn().Err(err).Stringer("room_id", it.roomID).Int("tries", it.tries).Msg("Dispatching an event failed; retrying")
			}
			if done {
				if _, err := in.db.Exec(ctx, `UPDATE ssbot_inbox SET done=true, event='' WHERE account=$1 AND event_key=$2`, in.account, it.key); err != nil {
					return nil, time.Time{}, false, fmt.Errorf("bot: mark %s done: %w", it.key, err)
				}
				continue
			}
		}
		kept = append(kept, it)
		if it.waiting {
			in.requestKey(ctx, it, now)
			waiting = true
			next = earliest(next, it.queuedAt.Add(in.h.cfg.KeyWait))
			if !it.askAfter.IsZero() {
				next = earliest(next, it.askAfter)
			}
		} else if !it.nextTry.IsZero() {
			next = earliest(next, it.nextTry)
		}
	}
	clear(queue[len(kept):])
	return kept, next, waiting, nil
}

func earliest(a, b time.Time) time.Time {
	if a.IsZero() || b.Before(a) {
		return b
	}
	return a
}

// handle dispatches one item. done is true when the item needs nothing more; an error asks for
// a retry after a backoff. An event waiting for its room key returns neither.
func (in *inbox) handle(ctx context.Context, it *item) (done bool, err error) {
	log := zerolog.Ctx(ctx).With().Stringer("room_id", it.roomID).Str("event", it.key).Logger()
	ctx = log.WithContext(ctx)
	if it.evt == nil {
		var evt event.Event
		if err := json.Unmarshal([]byte(it.raw), &evt); err != nil {
			log.Error().Err(err).Msg("Dropping a queued event that does not decode")
			return true, nil
		}
		evt.RoomID = it.roomID
		it.evt = &evt
	}
	evt := it.evt
	if strings.HasPrefix(it.key, invitePrefix) {
		if in.h.cfg.AutoJoin {
			_, err := in.h.cli.JoinRoomByID(ctx, it.roomID)
			switch {
			case refused(err):
				log.Warn().Err(err).Msg("Could not join a room the bot was invited to")
			case err != nil:
				return false, fmt.Errorf("join: %w", err)
			default:
				log.Info().Msg("Joined a room the bot was invited to")
			}
		}
		cp := *evt
		cp.Type.Class = event.StateEventType
		cp.Mautrix.EventSource = event.SourceInvite | event.SourceState
		return in.dispatch(ctx, it, &cp)
	}

	cp := *evt
	cp.Mautrix.EventSource = event.SourceJoin | event.SourceTimeline
	if cp.StateKey != nil {
		cp.Type.Class = event.StateEventType
	} else {
		cp.Type.Class = event.MessageEventType
	}
	if cp.Type != event.EventEncrypted {
		if err := cp.Content.ParseRaw(cp.Type); err != nil && !errors.Is(err, event.ErrUnsupportedContentType) &&
			!errors.Is(err, event.ErrContentAlreadyParsed) {
			log.Warn().Err(err).Stringer("type", cp.Type).Msg("Dropping an event whose content does not parse")
			return true, nil
		}
		return in.dispatch(ctx, it, &cp)
	}
	if cp.Content.Parsed == nil {
		if err := cp.Content.ParseRaw(cp.Type); err != nil {
			return in.undecryptable(ctx, &cp, err), nil
		}
	}
	dec, err := in.mach.OlmMachine().DecryptMegolmEvent(ctx, &cp)
	if errors.Is(err, mcrypto.ErrNoSessionFound) {
		if time.Since(it.queuedAt) >= in.h.cfg.KeyWait {
			return in.undecryptable(ctx, &cp, err), nil
		}
		if !it.waiting {
			log.Debug().Msg("Waiting for the room key of an encrypted event")
			it.waiting = true
			it.roomKey = cp.Content.AsEncrypted()
			if in.h.cfg.KeyRequestDelay > 0 {
				it.askAfter = it.queuedAt.Add(in.h.cfg.KeyRequestDelay)
			}
		}
		return false, nil
	}
	if err != nil {
		return in.undecryptable(ctx, &cp, err), nil
	}
	it.waiting = false
	dec.Mautrix.EventSource = cp.Mautrix.EventSource
	return in.dispatch(ctx, it, dec)
}

// requestKey asks the device that sent a waiting event for its room key once the event has
// waited Config.KeyRequestDelay, unless this Run already asked for that key. A request that
// failed is made again with a backoff (up to 10 min); one the server refused is not.
func (in *inbox) requestKey(ctx context.Context, it *item, now time.Time) {
	if it.askAfter.IsZero() || now.Before(it.askAfter) {
		return
	}
	it.askAfter = time.Time{}
	if in.requested[it.roomKey.SessionID] || it.roomKey.SessionID == "" || it.evt.Sender == "" {
		return
	}
	device := it.roomKey.DeviceID
	if device == "" {
		device = "*" // recent clients leave device_id out of their Megolm events
	}
	log := zerolog.Ctx(ctx).With().Stringer("room_id", it.roomID).Stringer("session_id", it.roomKey.SessionID).
		Stringer("sender", it.evt.Sender).Stringer("sender_device", device).Logger()
	err := in.mach.OlmMachine().SendRoomKeyRequest(ctx, it.roomID, it.roomKey.SenderKey, it.roomKey.SessionID, "",
		map[id.UserID][]id.DeviceID{it.evt.Sender: {device}})
	if refused(err) {
		log.Warn().Err(err).Msg("The server refused the request for the room key of a waiting event")
		in.requested[it.roomKey.SessionID] = true // asking again would be refused again
		return
	} else if err != nil {
		it.tries++
		it.askAfter = now.Add(min(in.h.cfg.KeyRequestDelay<<min(it.tries, 6), 10*time.Minute))
		log.Warn().Err(err).Int("tries", it.tries).Msg("Asking for the room key of a waiting event failed; retrying")
		return
	}
	log.Info().Msg("Asked the sender's device for the room key of a waiting event")
	in.requested[it.roomKey.SessionID] = true
}

// refused reports whether err is the server's refusal of a request (a 4xx other than 429),
// which a retry would meet again.
func refused(err error) bool {
	var httpErr mautrix.HTTPError
	return errors.As(err, &httpErr) && httpErr.Response != nil && httpErr.Response.StatusCode >= http.StatusBadRequest &&
		httpErr.Response.StatusCode < http.StatusInternalServerError && httpErr.Response.StatusCode != http.StatusTooManyRequests
}

// undecryptable gives an event up.
func (in *inbox) undecryptable(ctx context.Context, evt *event.Event, err error) bool {
	zerolog.Ctx(ctx).Warn().Err(err).Msg("Giving up on an event that cannot be decrypted")
	if fn := in.h.cfg.OnDecryptionError; fn != nil {
		fn(ctx, evt, err)
	}
	return true
}

// dispatch hands evt to the syncer's handlers under the item's idempotency key. A handler
// that panics is logged and the event counts as handled; an event whose handlers were cut
// short by the end of ctx is handled again by the next Run.
func (in *inbox) dispatch(ctx context.Context, it *item, evt *event.Event) (done bool, err error) {
	dctx := withDispatch(ctx, newDispatch(eventKey(it.key)))
	func() {
		defer func() {
			if r := recover(); r != nil {
				zerolog.Ctx(ctx).Error().Any("panic", r).Stringer("type", evt.Type).Msg("An event handler panicked")
			}
		}()
		in.h.syncer.Dispatch(dctx, evt)
	}()
	return ctx.Err() == nil, nil
}
