package crypto

import (
	"bytes"
	"context"
	"encoding/json"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/rs/zerolog"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	mcrypto "maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
)

type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) count(s string) int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return strings.Count(b.buf.String(), s)
}

// shareRoomKey makes sender share a new Megolm session of room with the bot over Olm and
// returns the session and the encrypted to-device content the bot would receive.
func shareRoomKey(t *testing.T, sender *env, room id.RoomID) (*mcrypto.OutboundGroupSession, json.RawMessage) {
	t.Helper()
	ctx := context.Background()
	ogs, err := mcrypto.NewOutboundGroupSession(room, nil, nil)
	require.NoError(t, err)
	device, err := sender.olm.GetOrFetchDevice(ctx, testUser, testDevice)
	require.NoError(t, err)
	require.NoError(t, sender.olm.SendEncryptedToDevice(ctx, device, event.ToDeviceRoomKey, ogs.ShareContent()))
	sender.hs.mu.Lock()
	defer sender.hs.mu.Unlock()
	var body struct {
		Messages map[id.UserID]map[id.DeviceID]json.RawMessage `json:"messages"`
	}
	require.NoError(t, json.Unmarshal(sender.hs.sent[len(sender.hs.sent)-1], &body))
	raw := body.Messages[testUser][testDevice]
	require.NotEmpty(t, raw)
	return ogs, raw
}

// deliver hands an encrypted to-device event from sender to the bot's HandleToDevice.
func (e *env) deliver(sender id.UserID, raw json.RawMessage) {
	e.t.Helper()
	evt := &event.Event{Sender: sender, Type: event.ToDeviceEncrypted}
	evt.Type.Class = event.ToDeviceEventType
	require.NoError(e.t, json.Unmarshal(raw, &evt.Content))
	require.NoError(e.t, evt.Content.ParseRaw(evt.Type))
	require.NoError(e.t, e.m.HandleToDevice(context.Background(), []*event.Event{evt}))
}

func (e *env) hasRoomKey(room id.RoomID, sessionID id.SessionID) bool {
	e.t.Helper()
	igs, err := e.store.GetGroupSession(context.Background(), room, sessionID)
	require.NoError(e.t, err)
	return igs != nil
}

// A room key sent by another device over Olm is stored before HandleToDevice returns, and a
// re-delivery of the same message is recognised and not handled again.
func TestHandleToDeviceStoresRoomKeyOnce(t *testing.T) {
	ctx := context.Background()
	bot := newEnv(t, Config{})
	const senderUser id.UserID = "@sender:example.org"
	sender := newEnvAs(t, Config{}, senderUser, "SENDERDEV")
	link(bot, sender)
	require.NoError(t, bot.m.shareKeys(ctx))
	require.NoError(t, sender.m.shareKeys(ctx))
	logs := &lockedBuffer{}
	log := zerolog.New(logs)
	bot.olm.Log = &log

	const room id.RoomID = "!room:example.org"
	ogs, raw := shareRoomKey(t, sender, room)
	bot.deliver(senderUser, raw)
	assert.True(t, bot.hasRoomKey(room, ogs.ID()), "the room key is stored when HandleToDevice returns")

	bot.deliver(senderUser, raw)
	assert.Equal(t, 1, logs.count("Ignoring duplicate olm message"), "the re-delivered message is not decrypted again")
}

// When the server has no one-time key left, senders claim the fallback key. A pre-key message
// made with the previous fallback key decrypts through HandleToDevice during the grace period
// after a rotation, and no longer after it.
func TestPreKeyMessageWithPreviousFallbackKey(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ctx := context.Background()
		bot := newEnv(t, Config{FallbackKeyRotation: 10 * time.Minute, FallbackKeyGrace: time.Hour})
		defer bot.db.Close()
		early := newEnvAs(t, Config{}, "@early:example.org", "EARLY")
		defer early.db.Close()
		late := newEnvAs(t, Config{}, "@late:example.org", "LATE")
		defer late.db.Close()
		link(bot, early, late)
		bot.setUp(ctx)
		require.NoError(t, early.m.shareKeys(ctx))
		require.NoError(t, late.m.shareKeys(ctx))
		bot.hs.mu.Lock()
		clear(bot.hs.otks) // every one-time key was claimed: senders get the fallback key
		bot.hs.mu.Unlock()

		// Both senders start Olm sessions on the first fallback key.
		const room id.RoomID = "!room:example.org"
		ogsEarly, rawEarly := shareRoomKey(t, early, room)
		ogsLate, rawLate := shareRoomKey(t, late, room)

		// The server reports the key used; the bot rotates.
		time.Sleep(10 * time.Minute)
		require.NoError(t, bot.m.HandleE2EE(ctx, fallbackTypes()))
		next, err := bot.m.fallbackWork(ctx)
		require.NoError(t, err)
		require.Len(t, bot.fallbackUploads(), 2)

		bot.deliver(early.cli.UserID, rawEarly)
		assert.True(t, bot.hasRoomKey(room, ogsEarly.ID()), "decrypted with the previous fallback key during the grace period")

		time.Sleep(time.Until(next))
		_, err = bot.m.fallbackWork(ctx)
		require.NoError(t, err)
		bot.deliver(late.cli.UserID, rawLate)
		assert.False(t, bot.hasRoomKey(room, ogsLate.ID()), "the previous fallback key is forgotten after the grace period")
	})
}
