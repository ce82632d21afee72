package slidingsync

import (
	"cmp"
	"slices"

	"maunium.net/go/mautrix/id"
)

// missingRooms returns the rooms of a response that are not in memory but may be in the store
// (RoomCache only). Caller holds stateMu.
func (c *Conn) missingRooms(rooms map[id.RoomID]*RoomResponse) []id.RoomID {
	if c.cfg.RoomCache == 0 {
		return nil
	}
	var missing []id.RoomID
	for roomID := range rooms {
		if _, ok := c.rooms[roomID]; !ok {
			missing = append(missing, roomID)
		}
	}
	return missing
}

// evictRooms marks the rooms of a processed response as used and, once more than RoomCache
// rooms are in memory, drops the least recently used down to 7/8 of it (so that eviction is
// not paid on every response). Caller holds stateMu for writing.
func (c *Conn) evictRooms(touched map[id.RoomID]*RoomState) {
	limit := c.cfg.RoomCache
	if limit == 0 {
		return
	}
	if c.roomUsed == nil {
		c.roomUsed = make(map[id.RoomID]uint64, limit)
	}
	c.roomTick++
	for roomID := range touched {
		c.roomUsed[roomID] = c.roomTick
	}
	if len(c.rooms) <= limit {
		return
	}
	type used struct {
		id   id.RoomID
		tick uint64
	}
	all := make([]used, 0, len(c.rooms))
	for roomID := range c.rooms {
		all = append(all, used{roomID, c.roomUsed[roomID]})
	}
	slices.SortFunc(all, func(a, b used) int { return cmp.Compare(a.tick, b.tick) })
	keep := max(limit-limit/8, 1)
	for _, u := range all[:len(all)-keep] {
		delete(c.rooms, u.id)
		delete(c.roomUsed, u.id)
	}
}
