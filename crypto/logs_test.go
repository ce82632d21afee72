package crypto

import (
	"context"
	"encoding/json"
	"path/filepath"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/sliding-e2ee/sdk/internal/testlog"
	"github.com/sliding-e2ee/sdk/slidingsync/sqlstore/dbopen"
)

// newLoggedEnv builds a device like newEnvOn, with its own access token and pickle key and
// with every logger (the client's, the OlmMachine's) writing to log.
func newLoggedEnv(t *testing.T, user id.UserID, device id.DeviceID, token string, pickleKey []byte, log zerolog.Logger) *env {
	t.Helper()
	e := buildDevice(t, Config{}, user, device, filepath.Join(t.TempDir(), "bot.db"), dbopen.Config{RelaxedSync: true}, token, pickleKey, log)
	e.t = t
	return e
}

// Secrets never reach the logs, even at trace level: a decrypted message body, the pickle key
// that encrypts the crypto store, the access token, and the Megolm session key a room key
// carries.
func TestSecretsNeverLogged(t *testing.T) {
	const (
		body       = "plaintext-body-7d1f0c2b-must-not-be-logged"
		botToken   = "syt_bot_token_5b8e2a91_must_not_be_logged"
		peerToken  = "syt_peer_token_0c4d7e13_must_not_be_logged"
		pickleText = "pickle-key-9a3f6b04-must-not-be-logged"
		senderUser = id.UserID("@sender:example.org")
		room       = id.RoomID("!room:example.org")
	)
	logs := &testlog.Buffer{}
	log := zerolog.New(logs).Level(zerolog.TraceLevel).With().Timestamp().Logger()
	ctx := log.WithContext(context.Background())

	bot := newLoggedEnv(t, testUser, testDevice, botToken, []byte(pickleText), log)
	sender := newLoggedEnv(t, senderUser, "SENDERDEV", peerToken, []byte(pickleText+"-peer"), log)
	require.NoError(t, bot.m.shareKeys(ctx))
	require.NoError(t, sender.m.shareKeys(ctx))

	ogs, raw := shareRoomKey(t, sender, room)
	sessionKey := ogs.ShareContent().Parsed.(*event.RoomKeyEventContent).SessionKey
	evt := &event.Event{Sender: senderUser, Type: event.ToDeviceEncrypted}
	evt.Type.Class = event.ToDeviceEventType
	require.NoError(t, json.Unmarshal(raw, &evt.Content))
	require.NoError(t, evt.Content.ParseRaw(evt.Type))
	require.NoError(t, bot.m.HandleToDevice(ctx, []*event.Event{evt}))
	require.True(t, bot.hasRoomKey(room, ogs.ID()))

	ogs.Shared = true // shareRoomKey sent it to the bot
	require.NoError(t, sender.store.AddOutboundGroupSession(ctx, ogs))
	enc, err := sender.olm.EncryptMegolmEvent(ctx, room, event.EventMessage, &event.MessageEventContent{MsgType: event.MsgText, Body: body})
	require.NoError(t, err)
	encRaw, err := json.Marshal(enc)
	require.NoError(t, err)
	msg := &event.Event{Sender: senderUser, Type: event.EventEncrypted, RoomID: room, ID: "$secret", Timestamp: time.Now().UnixMilli()}
	require.NoError(t, json.Unmarshal(encRaw, &msg.Content))
	require.NoError(t, msg.Content.ParseRaw(msg.Type))
	dec, err := bot.olm.DecryptMegolmEvent(ctx, msg)
	require.NoError(t, err)
	require.Equal(t, body, dec.Content.AsMessage().Body, "the test must really decrypt")

	out := logs.String()
	require.Greater(t, logs.Count(`"level":"trace"`), 0, "the test must capture trace output")
	require.Greater(t, logs.Count(`"level":"debug"`), 0, "the test must capture debug output")
	for name, secret := range map[string]string{
		"plaintext body":     body,
		"bot access token":   botToken,
		"peer access token":  peerToken,
		"pickle key":         pickleText,
		"Megolm session key": sessionKey,
	} {
		assert.NotContains(t, out, secret, "%s in the logs", name)
	}
	t.Logf("checked %d log lines (%d at trace level)", logs.Count("\n"), logs.Count(`"level":"trace"`))
}
