package main

import (
	"context"
	"net/http/httptest"
	"net/url"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/crypto/cryptohelper"
	"maunium.net/go/mautrix/crypto/signatures"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/sliding-e2ee/sdk/internal/dendritetest"
	"github.com/sliding-e2ee/sdk/internal/dendritetest/ssfront"
	"github.com/sliding-e2ee/sdk/internal/pgtest"
	"github.com/sliding-e2ee/sdk/slidingsync/sqlstore/dbopen"
)

// peerDevice is a client on mautrix's own v2 /sync with its own OlmMachine (cryptohelper):
// what a user of another Matrix client looks like to the bot.
type peerDevice struct {
	cli    *mautrix.Client
	helper *cryptohelper.CryptoHelper

	mu   sync.Mutex
	msgs []string // bodies of the decrypted messages the bot sent
}

func newPeerDevice(t *testing.T, ctx context.Context, cli *mautrix.Client, bot id.UserID) *peerDevice {
	t.Helper()
	db, err := dbopen.Open(filepath.Join(t.TempDir(), "peer.db"), dbopen.Config{})
	require.NoError(t, err)
	t.Cleanup(func() { _ = db.Close() })
	cli.Log = zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.InfoLevel).With().Str("peer", cli.DeviceID.String()).Logger()
	helper, err := cryptohelper.NewCryptoHelper(cli, []byte("peer pickle key"), db)
	require.NoError(t, err)
	require.NoError(t, helper.Init(ctx))
	cli.Crypto = helper
	p := &peerDevice{cli: cli, helper: helper}
	syncer := cli.Syncer.(*mautrix.DefaultSyncer)
	syncer.OnEventType(event.EventMessage, func(_ context.Context, evt *event.Event) {
		if evt.Sender != bot || !evt.Mautrix.WasEncrypted {
			return
		}
		p.mu.Lock()
		p.msgs = append(p.msgs, evt.Content.AsMessage().Body)
		p.mu.Unlock()
	})
	go func() { _ = cli.SyncWithContext(ctx) }()
	return p
}

func (p *peerDevice) received(body string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, m := range p.msgs {
		if m == body {
			return true
		}
	}
	return false
}

// waitFor polls cond every 100 ms for up to 90 s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(90 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// The acceptance run of the crypto layer against a real homeserver: Dendrite behind a
// translating sliding sync front, the bot run through the command's own code path (runBot
// with the options of its flags), and a peer on mautrix's v2 sync with its own OlmMachine.
// Keys, Olm and megolm sessions and messages are real.
// It runs once with the bot on SQLite and once on PostgreSQL (-db postgres://...).
func TestEncryptedEchoAgainstDendrite(t *testing.T) {
	srv := dendritetest.Start(t)
	upstream, err := url.Parse(srv.URL)
	require.NoError(t, err)
	front := httptest.NewServer(ssfront.New(upstream))
	t.Cleanup(front.Close)

	t.Run("sqlite", func(t *testing.T) {
		acceptance(t, srv, front.URL, "sqlite", filepath.Join(t.TempDir(), "bot.db"))
	})
	t.Run("postgres", func(t *testing.T) {
		acceptance(t, srv, front.URL, "pg", pgtest.NewDatabase(t))
	})
}

func acceptance(t *testing.T, srv *dendritetest.Server, frontURL, name, dbPath string) {
	const botPassword, peerPassword = "bot-password-1", "peer-password-1"
	botReg := srv.RegisterWithPassword(t, "echobot-"+name, botPassword)
	alice := srv.RegisterWithPassword(t, "alice-"+name, peerPassword)
	var err error

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	peer1 := newPeerDevice(t, ctx, alice, botReg.UserID)

	// An encrypted room the bot is invited to.
	resp, err := alice.CreateRoom(ctx, &mautrix.ReqCreateRoom{
		Preset: "private_chat",
		Invite: []id.UserID{botReg.UserID},
		InitialState: []*event.Event{{
			Type:    event.StateEncryption,
			Content: event.Content{Parsed: &event.EncryptionEventContent{Algorithm: id.AlgorithmMegolmV1}},
		}},
	})
	require.NoError(t, err)
	room := resp.RoomID

	opts := options{homeserver: frontURL, user: botReg.UserID.String(), password: botPassword, db: dbPath, protocol: "msc4186"}
	startBot := func() (stop func()) {
		botCtx, botCancel := context.WithCancel(zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.InfoLevel).
			With().Str("side", "bot").Logger().WithContext(context.Background()))
		done := make(chan error, 1)
		go func() { done <- runBot(botCtx, opts) }()
		return func() {
			botCancel()
			select {
			case err := <-done:
				require.ErrorIs(t, err, context.Canceled)
			case <-time.After(30 * time.Second):
				t.Fatal("the bot did not stop within 30 s")
			}
		}
	}
	stopBot := startBot()
	defer func() { stopBot() }()

	waitFor(t, "the bot to join", func() bool {
		return alice.StateStore.IsMembership(ctx, room, botReg.UserID, event.MembershipJoin)
	})

	// 1. The peer sends an encrypted message; the bot decrypts it and replies encrypted; the
	// peer decrypts the reply.
	_, err = alice.SendText(ctx, room, "hello bot")
	require.NoError(t, err)
	waitFor(t, "the encrypted echo of the first message", func() bool { return peer1.received("echo: hello bot") })

	// A restart reuses the stored session: same device, no second login.
	botDevice := storedDevice(t, dbPath)
	stopBot()
	opts.password = "" // a second login would fail now
	stopBot = startBot()
	require.Equal(t, botDevice, storedDevice(t, dbPath))

	// 2. The peer adds a second device; the bot learns of it from device_lists.changed, and
	// the new device can decrypt the bot's next reply.
	alice2 := srv.Client(t)
	_, err = alice2.Login(ctx, &mautrix.ReqLogin{
		Type:             mautrix.AuthTypePassword,
		Identifier:       mautrix.UserIdentifier{Type: mautrix.IdentifierTypeUser, User: alice.UserID.String()},
		Password:         peerPassword,
		StoreCredentials: true,
	})
	require.NoError(t, err)
	peer2 := newPeerDevice(t, ctx, alice2, botReg.UserID)
	_, err = alice.SendText(ctx, room, "second message")
	require.NoError(t, err)
	waitFor(t, "the second device to decrypt the echo", func() bool { return peer2.received("echo: second message") })
	require.True(t, peer1.received("echo: second message"))

	// 3. The bot's one-time keys are claimed until none is left; the bot tops up.
	claim := func() (id.KeyID, *mautrix.OneTimeKey) {
		res, err := alice.ClaimKeys(ctx, &mautrix.ReqClaimKeys{
			OneTimeKeys: mautrix.OneTimeKeysRequest{botReg.UserID: {botDevice: id.KeyAlgorithmSignedCurve25519}},
		})
		require.NoError(t, err)
		for keyID, key := range res.OneTimeKeys[botReg.UserID][botDevice] {
			return keyID, &key
		}
		return "", nil
	}
	claimed := 0
	for {
		keyID, _ := claim()
		if keyID == "" {
			break
		}
		claimed++
		require.Less(t, claimed, 200, "the server holds more one-time keys than the bot keeps")
	}
	t.Logf("claimed %d one-time keys until none was left", claimed)
	require.GreaterOrEqual(t, claimed, 1)
	// A message wakes the bot's long-poll, whose response carries the count of 0.
	_, err = alice.SendText(ctx, room, "third message")
	require.NoError(t, err)
	waitFor(t, "the echo of the third message", func() bool { return peer1.received("echo: third message") })
	var topped *mautrix.OneTimeKey
	waitFor(t, "a claimable one-time key after the top-up", func() bool {
		_, topped = claim()
		return topped != nil
	})
	// The new key is signed by the bot's device.
	devs, err := peer1.helper.Machine().CryptoStore.GetDevices(ctx, botReg.UserID)
	require.NoError(t, err)
	dev := devs[botDevice]
	require.NotNil(t, dev, "the peer knows the bot's device")
	ok, err := signatures.VerifySignatureJSON(topped, botReg.UserID, botDevice.String(), dev.SigningKey)
	require.NoError(t, err)
	require.True(t, ok, "the topped-up one-time key carries a valid signature")
}

// storedDevice reads the device of the session the bot stored.
func storedDevice(t *testing.T, dbPath string) id.DeviceID {
	t.Helper()
	db, err := dbopen.Open(dbPath, dbopen.Config{})
	require.NoError(t, err)
	defer db.Close()
	var dev id.DeviceID
	require.NoError(t, db.QueryRow(context.Background(), `SELECT device_id FROM ssbot_session`).Scan(&dev))
	return dev
}
