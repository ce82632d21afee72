package crypto

import (
	"context"
	"encoding/json"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
)

func closed(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

// RoomKeyCommitted is closed only when a room key is committed: not by the first decryption
// of an Olm message (which mautrix signals, then rolls back), nor by a key whose storage
// failed. Whoever it wakes finds the key.
func TestRoomKeyCommittedOnlyAfterCommit(t *testing.T) {
	ctx := context.Background()
	bot, sender, _ := twoDevices(t)
	const room id.RoomID = "!room:example.org"
	handle := func(raw json.RawMessage) error {
		return bot.m.HandleToDevice(ctx, []*event.Event{encryptedEvent(t, sender.cli.UserID, raw)})
	}
	ogs, raw := shareRoomKey(t, sender, room)

	next := bot.m.RoomKeyCommitted()
	fix := bot.breakTable("crypto_megolm_inbound_session")
	require.ErrorIs(t, handle(raw), ErrRoomKeyNotStored)
	fix()
	assert.False(t, closed(next), "a key that was not stored wakes no one")

	// mautrix's own signal fires during the decryption; RoomKeyCommitted after the commit.
	woken := make(chan bool, 1)
	go func() {
		<-next
		has, err := bot.m.hasRoomKey(ctx, room, ogs.ID())
		woken <- err == nil && has
	}()
	require.NoError(t, handle(raw))
	select {
	case found := <-woken:
		assert.True(t, found, "the reader woken by RoomKeyCommitted finds the key")
	case <-time.After(10 * time.Second):
		t.Fatal("RoomKeyCommitted was not closed by a committed room key")
	}
	assert.False(t, closed(bot.m.RoomKeyCommitted()), "the next call waits for the next key")

	// A message that carries no room key wakes no one either.
	next = bot.m.RoomKeyCommitted()
	require.NoError(t, handle(sendOlm(t, sender, bot, event.ToDeviceDummy, &event.DummyEventContent{})))
	assert.False(t, closed(next), "a to-device message without a room key wakes no one")
}

// WaitForRoomKey returns at once for a stored key, waits for one committed later, and gives
// up after its timeout.
func TestWaitForRoomKey(t *testing.T) {
	ctx := context.Background()
	bot, sender, _ := twoDevices(t)
	const room id.RoomID = "!room:example.org"
	ogs, raw := shareRoomKey(t, sender, room)

	assert.False(t, bot.m.WaitForRoomKey(ctx, room, ogs.ID(), 10*time.Millisecond), "no key: timeout")
	got := make(chan bool, 1)
	go func() { got <- bot.m.WaitForRoomKey(ctx, room, ogs.ID(), time.Minute) }()
	time.Sleep(20 * time.Millisecond) // let it wait (either way the result must be true)
	bot.deliver(sender.cli.UserID, raw)
	select {
	case ok := <-got:
		assert.True(t, ok)
	case <-time.After(10 * time.Second):
		t.Fatal("WaitForRoomKey was not woken by the committed key")
	}
	assert.True(t, bot.m.WaitForRoomKey(ctx, room, ogs.ID(), 0), "a stored key: at once")
}
