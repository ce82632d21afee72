package crypto

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"testing"
	"testing/synctest"
	"time"

	"github.com/rs/zerolog"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	mcrypto "maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/sliding-e2ee/sdk/internal/testlog"
)

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
	raw := sender.hs.lastSent(t, testUser, testDevice)
	require.NotEmpty(t, raw)
	return ogs, raw
}

// deliver hands an encrypted to-device event from sender to the bot's HandleToDevice.
func (e *env) deliver(sender id.UserID, raw json.RawMessage) {
	e.t.Helper()
	require.NoError(e.t, e.m.HandleToDevice(context.Background(), []*event.Event{encryptedEvent(e.t, sender, raw)}))
}

func encryptedEvent(t *testing.T, sender id.UserID, raw json.RawMessage) *event.Event {
	t.Helper()
	evt := &event.Event{Sender: sender, Type: event.ToDeviceEncrypted}
	evt.Type.Class = event.ToDeviceEventType
	require.NoError(t, json.Unmarshal(raw, &evt.Content))
	require.NoError(t, evt.Content.ParseRaw(evt.Type))
	return evt
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
	require.NoError(t, bot.m.shareKeys(ctx))
	require.NoError(t, sender.m.shareKeys(ctx))
	logs := &testlog.Buffer{}
	log := zerolog.New(logs)
	bot.olm.Log = &log

	const room id.RoomID = "!room:example.org"
	ogs, raw := shareRoomKey(t, sender, room)
	bot.deliver(senderUser, raw)
	assert.True(t, bot.hasRoomKey(room, ogs.ID()), "the room key is stored when HandleToDevice returns")

	bot.deliver(senderUser, raw)
	assert.Equal(t, 1, logs.Count("Ignoring duplicate olm message"), "the re-delivered message is not decrypted again")
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
		bot.setUp(ctx)
		require.NoError(t, early.m.shareKeys(ctx))
		require.NoError(t, late.m.shareKeys(ctx))
		bot.claimAll() // senders get the fallback key

		// Both senders start Olm sessions on the first fallback key.
		const room id.RoomID = "!room:example.org"
		ogsEarly, rawEarly := shareRoomKey(t, early, room)
		ogsLate, rawLate := shareRoomKey(t, late, room)

		// The server reports the key used; the bot rotates.
		time.Sleep(10 * time.Minute)
		require.NoError(t, bot.m.record(ctx, fallbackTypes()))
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

// sendOlm makes from send content to the device of to over Olm and returns the encrypted
// content that device receives.
func sendOlm(t *testing.T, from, to *env, typ event.Type, content any) json.RawMessage {
	t.Helper()
	ctx := context.Background()
	device, err := from.olm.GetOrFetchDevice(ctx, to.cli.UserID, to.cli.DeviceID)
	require.NoError(t, err)
	require.NoError(t, from.olm.SendEncryptedToDevice(ctx, device, typ, event.Content{Parsed: content}))
	raw := from.hs.lastSent(t, to.cli.UserID, to.cli.DeviceID)
	require.NotEmpty(t, raw)
	return raw
}

// olmType is the Olm message type of an encrypted content for the device of e.
func (e *env) olmType(raw json.RawMessage) id.OlmMsgType {
	e.t.Helper()
	var c event.EncryptedEventContent
	require.NoError(e.t, json.Unmarshal(raw, &c))
	own, ok := c.OlmCiphertext[e.olm.GetAccount().IdentityKey()]
	require.True(e.t, ok)
	return own.Type
}

// twoDevices returns the bot and a linked sender device, both with uploaded keys. Unwedging
// (which mautrix would start on a goroutine) is only counted.
func twoDevices(t *testing.T) (bot, sender *env, unwedged *int) {
	t.Helper()
	ctx := context.Background()
	bot = newEnv(t, Config{})
	sender = newEnvAs(t, Config{}, "@sender:example.org", "SENDERDEV")
	require.NoError(t, bot.m.shareKeys(ctx))
	require.NoError(t, sender.m.shareKeys(ctx))
	unwedged = new(int)
	bot.olm.NeedsUnwedgeCallback = func(context.Context, id.UserID, id.SenderKey) { *unwedged++ }
	sender.olm.NeedsUnwedgeCallback = bot.olm.NeedsUnwedgeCallback
	return bot, sender, unwedged
}

// breakTable renames a crypto store table away until the returned function renames it back.
func (e *env) breakTable(table string) (fix func()) {
	e.t.Helper()
	ctx := context.Background()
	_, err := e.db.Exec(ctx, "ALTER TABLE "+table+" RENAME TO "+table+"_away")
	require.NoError(e.t, err)
	return func() {
		_, err := e.db.Exec(ctx, "ALTER TABLE "+table+"_away RENAME TO "+table)
		require.NoError(e.t, err)
	}
}

// A room key that cannot be stored fails HandleToDevice, so the batch is not acknowledged, and
// the re-delivered message decrypts again and stores the key: the message hash and the Olm
// session state of the failed attempt were rolled back. Both a pre-key message (which creates
// the Olm session and uses up a one-time key) and a normal message (which ratchets an existing
// session) are covered, each failing twice before it succeeds.
func TestHandleToDeviceRoomKeyStoreFailureIsRedelivered(t *testing.T) {
	ctx := context.Background()
	bot, sender, unwedged := twoDevices(t)
	const room id.RoomID = "!room:example.org"
	handle := func(raw json.RawMessage) error {
		return bot.m.HandleToDevice(ctx, []*event.Event{encryptedEvent(t, sender.cli.UserID, raw)})
	}
	failTwiceThenStore := func(ogs *mcrypto.OutboundGroupSession, raw json.RawMessage) {
		t.Helper()
		fix := bot.breakTable("crypto_megolm_inbound_session")
		for range 2 {
			err := handle(raw)
			require.ErrorIs(t, err, ErrRoomKeyNotStored)
		}
		fix()
		assert.False(t, bot.hasRoomKey(room, ogs.ID()))
		require.NoError(t, handle(raw), "the re-delivered message decrypts again")
		assert.True(t, bot.hasRoomKey(room, ogs.ID()))
		require.NoError(t, handle(raw), "a message handled in a successful batch is skipped")
	}

	ogs1, raw1 := shareRoomKey(t, sender, room)
	require.Equal(t, id.OlmMsgTypePreKey, bot.olmType(raw1))
	failTwiceThenStore(ogs1, raw1)

	// Once the sender has received an answer on the session, it sends normal messages.
	sender.deliver(bot.cli.UserID, sendOlm(t, bot, sender, event.ToDeviceDummy, &event.DummyEventContent{}))
	ogs2, raw2 := shareRoomKey(t, sender, room)
	require.Equal(t, id.OlmMsgTypeMsg, bot.olmType(raw2))
	failTwiceThenStore(ogs2, raw2)

	assert.Zero(t, *unwedged, "no session looked broken")
}

// Messages that do not decrypt or carry an unusable room key are skipped without an error, so
// they cannot block the queue; the valid key after them in the same batch is stored.
func TestHandleToDeviceSkipsUndecryptable(t *testing.T) {
	ctx := context.Background()
	bot, sender, unwedged := twoDevices(t)
	const room id.RoomID = "!room:example.org"
	botKey := bot.olm.GetAccount().IdentityKey()
	garbage := func(recipient id.IdentityKey, typ id.OlmMsgType, body string) *event.Event {
		raw, err := json.Marshal(&event.EncryptedEventContent{
			Algorithm:     id.AlgorithmOlmV1,
			SenderKey:     sender.olm.GetAccount().IdentityKey(),
			OlmCiphertext: event.OlmCiphertexts{recipient: {Type: typ, Body: body}},
		})
		require.NoError(t, err)
		return encryptedEvent(t, sender.cli.UserID, raw)
	}
	notOlm := base64.RawStdEncoding.EncodeToString([]byte("this is not an Olm message at all"))
	badKey := sendOlm(t, sender, bot, event.ToDeviceRoomKey, &event.RoomKeyEventContent{
		Algorithm: id.AlgorithmMegolmV1, RoomID: room, SessionID: "bogus", SessionKey: "bogus",
	})
	ogs, good := shareRoomKey(t, sender, room)

	evts := []*event.Event{
		garbage(botKey, id.OlmMsgTypePreKey, notOlm), // bad ciphertext
		garbage(botKey, id.OlmMsgTypeMsg, notOlm),    // no session it could belong to
		garbage("someoneElsesKey", id.OlmMsgTypeMsg, notOlm),
		garbage(botKey, id.OlmMsgTypeMsg, "%%% not base64"),
		encryptedEvent(t, sender.cli.UserID, badKey),
		encryptedEvent(t, sender.cli.UserID, good),
	}
	require.NoError(t, bot.m.HandleToDevice(ctx, evts))
	assert.True(t, bot.hasRoomKey(room, ogs.ID()))
	assert.False(t, bot.hasRoomKey(room, "bogus"))
	assert.Equal(t, 2, *unwedged, "mautrix asks to unwedge the sessions of the two undecryptable messages")
}

// A withheld notice whose storage fails fails the batch; delivered again it is stored.
func TestHandleToDeviceWithheldStoreFailure(t *testing.T) {
	ctx := context.Background()
	bot := newEnv(t, Config{})
	const room id.RoomID = "!room:example.org"
	evt := &event.Event{Sender: "@sender:example.org", Type: event.ToDeviceRoomKeyWithheld}
	evt.Content.Parsed = &event.RoomKeyWithheldEventContent{
		RoomID: room, Algorithm: id.AlgorithmMegolmV1, SessionID: "withheld", SenderKey: "senderkey",
		Code: event.RoomKeyWithheldUnauthorized,
	}
	fix := bot.breakTable("crypto_megolm_inbound_session")
	require.Error(t, bot.m.HandleToDevice(ctx, []*event.Event{evt}))
	fix()
	require.NoError(t, bot.m.HandleToDevice(ctx, []*event.Event{evt}))
	_, err := bot.store.GetGroupSession(ctx, room, "withheld")
	assert.ErrorIs(t, err, mcrypto.ErrGroupSessionWithheld)
}

// A normal Olm message on a session the bot lost (a restore from an older backup) cannot be
// decrypted, and mautrix asks to unwedge the session: a new session and an m.dummy on it. The
// Machine does that in Run, under the account lock every other use of the Olm account holds,
// not on a goroutine of mautrix's: nothing is sent while Run does not run. The sender
// decrypts the m.dummy, and its next room key reaches the bot on the new session.
func TestWedgedSessionIsUnwedgedByRun(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		bot := newEnv(t, Config{})
		sender := newEnvAs(t, Config{}, "@sender:example.org", "SENDERDEV")
		require.NoError(t, bot.m.shareKeys(ctx))
		require.NoError(t, sender.m.shareKeys(ctx))
		const room id.RoomID = "!room:example.org"

		_, raw := shareRoomKey(t, sender, room)
		bot.deliver(sender.cli.UserID, raw)
		sender.deliver(bot.cli.UserID, sendOlm(t, bot, sender, event.ToDeviceDummy, &event.DummyEventContent{}))
		_, err := bot.db.Exec(ctx, `DELETE FROM crypto_olm_session WHERE sender_key=$1`, sender.olm.GetAccount().IdentityKey())
		require.NoError(t, err)

		lost, raw := shareRoomKey(t, sender, room)
		require.Equal(t, id.OlmMsgTypeMsg, bot.olmType(raw), "a message on the session the bot lost")
		sends := func() int {
			bot.hs.mu.Lock()
			defer bot.hs.mu.Unlock()
			return len(bot.hs.sent)
		}
		before := sends()
		bot.deliver(sender.cli.UserID, raw)
		synctest.Wait()
		assert.False(t, bot.hasRoomKey(room, lost.ID()))
		assert.Equal(t, before, sends(), "nothing is sent before Run")

		done := make(chan error, 1)
		go func() { done <- bot.m.Run(ctx) }()
		synctest.Wait()
		dummy := bot.hs.lastSent(t, sender.cli.UserID, sender.cli.DeviceID)
		require.Equal(t, id.OlmMsgTypePreKey, sender.olmType(dummy), "a new session")
		time.Sleep(time.Minute) // fake time: mautrix encrypts on the session last decrypted from
		sender.deliver(bot.cli.UserID, dummy)

		again, raw := shareRoomKey(t, sender, room)
		bot.deliver(sender.cli.UserID, raw)
		assert.True(t, bot.hasRoomKey(room, again.ID()), "the sender's next room key decrypts")
		cancel()
		require.ErrorIs(t, <-done, context.Canceled)
	})
}
