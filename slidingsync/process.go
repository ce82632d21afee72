package slidingsync

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"slices"

	"maunium.net/go/mautrix/id"
)

// outcome is what a committed response asks of the loop.
type outcome struct {
	more    bool // request again at once, without long-polling
	stalled bool // an extension makes no progress: back off first
}

// process runs one response through the extensions, the merge and the handler, commits it
// with every Step, makes its pos and state current and only then runs the Steps' After.
func (c *Conn) process(ctx context.Context, info RequestInfo, resp *Response, gen uint64) (outcome, error) {
	if c.configGen() != gen {
		return outcome{}, errConfigChanged
	}
	steps, err := c.processExtensions(ctx, info, resp)
	if err != nil {
		return outcome{}, err
	}
	res := &Result{Response: resp, Initial: info.Pos == ""}
	if res.Lists, err = c.mergeLists(resp); err != nil {
		return outcome{}, err
	}
	news, err := c.mergeRooms(ctx, info, res)
	if err != nil {
		return outcome{}, err
	}
	if c.cfg.OnResponse != nil {
		step, err := c.cfg.OnResponse(ctx, res)
		if err != nil {
			return outcome{}, fmt.Errorf("response handler: %w", err)
		}
		step.Checkpoint = nil
		steps = append(steps, step)
	}
	upd := c.update(res, steps)
	// An idle long-poll on Synapse repeats pos and changes nothing: there is nothing to write.
	if resp.Pos != info.Pos || upd.Origin != "" || len(upd.Rooms) > 0 || len(upd.Lists) > 0 ||
		len(upd.Extensions) > 0 || len(upd.TxnHooks) > 0 {
		if err := c.store.Commit(ctx, c.key, upd); err != nil {
			return outcome{}, fmt.Errorf("commit: %w", err)
		}
	}
	out := outcome{more: c.applyCommitted(info, gen, res, upd, news)}
	for _, st := range steps {
		if st.After != nil {
			st.After(ctx)
		}
		out.more = out.more || st.More
		out.stalled = out.stalled || st.Stalled
	}
	return out, nil
}

// processExtensions hands every extension its part of the response (nil when omitted) and
// returns their Steps, in the order of Config.Extensions.
func (c *Conn) processExtensions(ctx context.Context, info RequestInfo, resp *Response) ([]Step, error) {
	steps := make([]Step, len(c.exts), len(c.exts)+1)
	for i, ext := range c.exts {
		var raw json.RawMessage
		if r, ok := resp.Extensions[ext.WireKey(info.Protocol)]; ok && string(r) != "null" {
			raw = r
		}
		step, err := ext.Process(ctx, c.extensionInfo(info, ext), raw)
		if err != nil {
			return nil, fmt.Errorf("extension %s: %w", ext.Name(), err)
		}
		steps[i] = step
	}
	return steps, nil
}

// mergeLists merges every list of the response, cutting the window of a list whose managed
// window no longer covers everything from the top.
func (c *Conn) mergeLists(resp *Response) (map[string]ListState, error) {
	trims := make(map[string]int)
	c.mu.Lock()
	for name := range resp.Lists {
		if end, ok := c.growth[name].trimEnd(); ok {
			trims[name] = end
		}
	}
	c.mu.Unlock()
	out := make(map[string]ListState, len(resp.Lists))
	c.stateMu.RLock()
	defer c.stateMu.RUnlock()
	for name, lr := range resp.Lists {
		ls, err := MergeList(c.listStates[name], lr)
		if err != nil {
			return nil, fmt.Errorf("%w: list %q: %w", ErrInvalidResponse, name, err)
		}
		if end, ok := trims[name]; ok && len(ls.Rooms) > end+1 {
			ls.Rooms = slices.Clip(ls.Rooms[:end+1])
		}
		out[name] = ls
	}
	return out, nil
}

// mergeRooms merges every room of the response into res.Rooms (reading rooms not in memory
// from the store) and returns the rooms with new activity.
func (c *Conn) mergeRooms(ctx context.Context, info RequestInfo, res *Result) (map[id.RoomID]bool, error) {
	resp := res.Response
	c.stateMu.RLock()
	missing := c.missingRooms(resp.Rooms)
	c.stateMu.RUnlock()
	var stored map[id.RoomID]*RoomState
	if len(missing) > 0 {
		var err error
		if stored, err = c.store.(RoomLoader).LoadRooms(ctx, c.key, missing); err != nil {
			return nil, fmt.Errorf("load rooms: %w", err)
		}
	}
	res.Rooms = make(map[id.RoomID]*RoomState, len(resp.Rooms))
	var news map[id.RoomID]bool
	c.stateMu.RLock()
	defer c.stateMu.RUnlock()
	for roomID, rr := range resp.Rooms {
		old, ok := c.rooms[roomID]
		if !ok {
			old = stored[roomID]
		}
		if info.Protocol == ProtocolMSC4186 && !rr.IsDM.Set {
			// Synapse sends is_dm with every entry of a DM and never false: absent means
			// the room is not (or no longer) a DM.
			cp := *rr
			cp.IsDM = Some(false)
			rr = &cp
		}
		if hasNews(old, rr) {
			if news == nil {
				news = make(map[id.RoomID]bool)
			}
			news[roomID] = true
		}
		rs := MergeRoom(old, roomID, rr, c.cfg.TimelineCap)
		if c.cfg.CompactState {
			rs = compactRoom(rs)
		}
		res.Rooms[roomID] = rs
	}
	return news, nil
}

// update builds what the commit writes. Only what changed is written: Synapse repeats every
// list (and the extensions their state) in every response, and an idle long-poll would
// otherwise rewrite them all. steps[i] is the Step of extension i; a last one, if any, the
// handler's.
func (c *Conn) update(res *Result, steps []Step) *Update {
	upd := &Update{Pos: res.Response.Pos, Rooms: res.Rooms}
	c.stateMu.RLock()
	defer c.stateMu.RUnlock()
	if c.originDirty {
		upd.Origin = c.origin
	}
	for name, ls := range res.Lists {
		if old, ok := c.listStates[name]; !ok || old.Count != ls.Count || !slices.Equal(old.Rooms, ls.Rooms) {
			if upd.Lists == nil {
				upd.Lists = make(map[string]ListState, len(res.Lists))
			}
			upd.Lists[name] = ls
		}
	}
	for i, st := range steps {
		if i < len(c.exts) && st.Checkpoint != nil {
			name := c.exts[i].Name()
			if old, had := c.checkpts[name]; !had || !bytes.Equal(old, st.Checkpoint) {
				if upd.Extensions == nil {
					upd.Extensions = make(map[string]json.RawMessage)
				}
				upd.Extensions[name] = st.Checkpoint
			}
		}
		if st.Commit != nil {
			upd.TxnHooks = append(upd.TxnHooks, st.Commit)
		}
	}
	return upd
}

// applyCommitted makes a committed response's pos and state current and moves the managed
// windows. It reports whether a window must be requested at once.
func (c *Conn) applyCommitted(info RequestInfo, gen uint64, res *Result, upd *Update, news map[id.RoomID]bool) bool {
	c.stateMu.Lock()
	c.pos = upd.Pos
	if upd.Origin != "" {
		c.originDirty = false
	}
	maps.Copy(c.listStates, res.Lists)
	maps.Copy(c.rooms, res.Rooms)
	c.evictRooms(res.Rooms)
	maps.Copy(c.checkpts, upd.Extensions)
	c.stateMu.Unlock()
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.gen == gen {
		// The request carried every pending unsubscription and list deletion, and the server
		// has applied them.
		c.unsubs, c.dellists = nil, nil
	}
	return c.growWindows(info.Protocol, res.Lists, news)
}
