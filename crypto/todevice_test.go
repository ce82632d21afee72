package crypto

import (
	"bytes"
	"context"
	"encoding/json"
	"strings"
	"sync"
	"testing"

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

// A room key sent by another device over Olm is stored before HandleToDevice returns, and a
// re-delivery of the same message is recognised and not handled again.
func TestHandleToDeviceStoresRoomKeyOnce(t *testing.T) {
	ctx := context.Background()
	bot := newEnv(t, Config{})
	const senderUser id.UserID = "@sender:example.org"
	sender := newEnvAs(t, Config{}, senderUser, "SENDERDEV")
	sender.hs.peer, bot.hs.peer = bot.hs, sender.hs
	require.NoError(t, bot.m.shareKeys(ctx))
	require.NoError(t, sender.m.shareKeys(ctx))
	logs := &lockedBuffer{}
	log := zerolog.New(logs)
	bot.olm.Log = &log

	// The sender shares a Megolm session with the bot over a new Olm session.
	const room id.RoomID = "!room:example.org"
	ogs, err := mcrypto.NewOutboundGroupSession(room, nil, nil)
	require.NoError(t, err)
	device, err := sender.olm.GetOrFetchDevice(ctx, testUser, testDevice)
	require.NoError(t, err)
	require.NoError(t, sender.olm.SendEncryptedToDevice(ctx, device, event.ToDeviceRoomKey, ogs.ShareContent()))
	sender.hs.mu.Lock()
	require.Len(t, sender.hs.sent, 1)
	var body struct {
		Messages map[id.UserID]map[id.DeviceID]json.RawMessage `json:"messages"`
	}
	require.NoError(t, json.Unmarshal(sender.hs.sent[0], &body))
	sender.hs.mu.Unlock()
	raw := body.Messages[testUser][testDevice]
	require.NotEmpty(t, raw)

	deliver := func() {
		evt := &event.Event{Sender: senderUser, Type: event.ToDeviceEncrypted}
		evt.Type.Class = event.ToDeviceEventType
		require.NoError(t, json.Unmarshal(raw, &evt.Content))
		require.NoError(t, evt.Content.ParseRaw(evt.Type))
		require.NoError(t, bot.m.HandleToDevice(ctx, []*event.Event{evt}))
	}
	deliver()
	igs, err := bot.store.GetGroupSession(ctx, room, ogs.ID())
	require.NoError(t, err)
	require.NotNil(t, igs, "the room key is stored when HandleToDevice returns")

	deliver()
	assert.Equal(t, 1, logs.count("Ignoring duplicate olm message"), "the re-delivered message is not decrypted again")
}
