package bot

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/sliding-e2ee/sdk/internal/minihs"
	"github.com/sliding-e2ee/sdk/slidingsync"
)

// The bot logs in once with its password and keeps the session: a restart without a
// password reuses the device, and its handlers answer as before.
func TestLoginOnceAndKeepTheSession(t *testing.T) {
	ctx, _ := testCtx(t)
	f := newFixture(t, minihs.Options{})
	bot, dev, _ := f.srv.Bot()
	newClient := func() *mautrix.Client {
		cli, err := mautrix.NewClient(f.srv.URL(), "", "")
		require.NoError(t, err)
		return cli
	}
	cli := newClient()
	r := f.start(ctx, cli, Config{LoginAs: PasswordLogin(bot, minihs.BotPassword)}, nil)
	f.waitJoined(ctx, r)
	require.ErrorIs(t, r.stop(), context.Canceled)
	assert.Equal(t, dev, cli.DeviceID)
	assert.Equal(t, 1, f.srv.Logins())

	cli = newClient()
	r = f.start(ctx, cli, Config{LoginAs: PasswordLogin(bot, "a password that would fail")}, nil)
	_, err := f.alice.SendEncrypted(ctx, f.room, "after the restart")
	require.NoError(t, err)
	assert.Equal(t, []string{"echo: after the restart"}, f.replies(ctx, 1, 30*time.Second))
	assert.Equal(t, 1, f.srv.Logins(), "the stored session was used")
	assert.Equal(t, dev, cli.DeviceID)
	require.ErrorIs(t, r.stop(), context.Canceled)
}

// A bare localpart cannot find its stored session again: refused before any request.
func TestLoginNeedsAFullUserID(t *testing.T) {
	ctx, _ := testCtx(t)
	f := newFixture(t, minihs.Options{})
	cli, err := mautrix.NewClient(f.srv.URL(), "", "")
	require.NoError(t, err)
	h, err := New(cli, Config{DB: f.db, LoginAs: PasswordLogin("bot", minihs.BotPassword)})
	require.NoError(t, err)
	err = h.Run(ctx)
	assert.ErrorContains(t, err, "not a full user ID")
	assert.Zero(t, f.srv.Logins())
}

// countingTransport counts requests and answers none.
type countingTransport struct{ n atomic.Int32 }

func (c *countingTransport) RoundTrip(*http.Request) (*http.Response, error) {
	c.n.Add(1)
	return nil, errors.New("no network here")
}

// A homeserver on plain http:// that is not on loopback is refused before the login: the
// password never leaves, and the client's transport refuses such requests from then on.
func TestPlainHTTPRefusedBeforeLogin(t *testing.T) {
	ctx, _ := testCtx(t)
	cli, err := mautrix.NewClient("http://matrix.example.org", "", "")
	require.NoError(t, err)
	tr := &countingTransport{}
	cli.Client = &http.Client{Transport: tr}
	h, err := New(cli, Config{DB: t.TempDir() + "/bot.db", LoginAs: PasswordLogin("@bot:example.org", "secret")})
	require.NoError(t, err)
	err = h.Run(ctx)
	require.ErrorIs(t, err, slidingsync.ErrInsecureHTTP)
	_, err = cli.Login(ctx, PasswordLogin("@bot:example.org", "secret"))
	require.ErrorIs(t, err, slidingsync.ErrInsecureHTTP)
	assert.Zero(t, tr.n.Load(), "no request was sent")
}

// The Helper is the client's CryptoHelper: a send outside any handler to an encrypted room
// is encrypted; under WithIdempotencyKey, repeating it sends nothing new.
func TestClientSendsEncryptThroughTheHelper(t *testing.T) {
	ctx, _ := testCtx(t)
	f := newFixture(t, minihs.Options{NoTxnDedup: true})
	cli := f.client()
	r := f.start(ctx, cli, Config{}, func(*Helper, *mautrix.Client) {})
	f.waitJoined(ctx, r)
	select {
	case <-r.h.Ready():
	case <-time.After(30 * time.Second):
		t.Fatal("not ready")
	}
	kctx := WithIdempotencyKey(ctx, "announcement 1")
	first, err := cli.SendText(kctx, f.room, "announcement")
	require.NoError(t, err)
	again, err := cli.SendText(WithIdempotencyKey(ctx, "announcement 1"), f.room, "announcement")
	require.NoError(t, err)
	assert.Equal(t, first.EventID, again.EventID, "the repeat is answered from the outbox")
	assert.Equal(t, []string{"announcement"}, f.replies(ctx, 1, 30*time.Second))
	assert.Len(t, f.botReplies(), 1)
	var sent *event.Event
	for _, e := range f.srv.RoomEvents(f.room) {
		if e.ID == first.EventID {
			sent = e
		}
	}
	require.NotNil(t, sent)
	assert.Equal(t, event.EventEncrypted.Type, sent.Type.Type, "sent encrypted")

	// Outside Run, the Helper refuses to encrypt rather than send in clear.
	require.ErrorIs(t, r.stop(), context.Canceled)
	_, err = r.h.Encrypt(ctx, f.room, event.EventMessage, &event.MessageEventContent{Body: "x"})
	assert.ErrorIs(t, err, ErrNotRunning)
	_ = id.RoomID("")
}

// A homeserver without sliding sync fails Run at once with the discovery's error, and the
// failure leaves nothing half done: the crypto Machine of a new device starts only when the
// first sync response arrives, so no first key upload or account save is cut short ("Failed
// to save account").
func TestFastFailureStartsNoKeyWork(t *testing.T) {
	ctx, logs := testCtx(t)
	hs := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		if r.URL.Path == "/_matrix/client/versions" {
			_, _ = w.Write([]byte(`{"versions":["v1.11"]}`))
			return
		}
		w.WriteHeader(http.StatusNotFound)
		_, _ = w.Write([]byte(`{"errcode":"M_UNRECOGNIZED","error":"Unrecognized request"}`))
	}))
	defer hs.Close()
	cli := newClientFor(t, hs.URL, "@bot:example.org", "BOTDEV", "token")
	h, err := New(cli, Config{DB: t.TempDir() + "/bot.db"})
	require.NoError(t, err)
	err = h.Run(ctx)
	require.ErrorIs(t, err, slidingsync.ErrNotAdvertised)
	assert.False(t, strings.Contains(logs.String(), "Failed to save account"), "an account save was cut short")
	assert.False(t, strings.Contains(logs.String(), "keys/upload"), "a key upload was attempted")
}

// Logout deletes the device on the server and forgets the session and its Olm account: the
// old token is refused and the next Run logs in again, with a new account that answers.
func TestLogoutForgetsTheSession(t *testing.T) {
	ctx, _ := testCtx(t)
	f := newFixture(t, minihs.Options{})
	bot, _, _ := f.srv.Bot()
	cli, err := mautrix.NewClient(f.srv.URL(), "", "")
	require.NoError(t, err)
	cfg := Config{LoginAs: PasswordLogin(bot, minihs.BotPassword)}
	r := f.start(ctx, cli, cfg, nil)
	f.waitJoined(ctx, r)
	require.ErrorIs(t, r.stop(), context.Canceled)
	oldToken := cli.AccessToken

	cfg.DB = f.db
	out, err := mautrix.NewClient(f.srv.URL(), "", "")
	require.NoError(t, err)
	h, err := New(out, cfg)
	require.NoError(t, err)
	require.NoError(t, h.Logout(ctx))
	assert.Equal(t, 1, f.srv.Logouts())
	stale, err := mautrix.NewClient(f.srv.URL(), bot, oldToken)
	require.NoError(t, err)
	_, err = stale.Whoami(ctx)
	require.ErrorIs(t, err, mautrix.MUnknownToken, "the device's token no longer works")

	cli, err = mautrix.NewClient(f.srv.URL(), "", "")
	require.NoError(t, err)
	r = f.start(ctx, cli, cfg, nil)
	require.Eventually(t, func() bool { return f.srv.Logins() == 2 }, 30*time.Second, 10*time.Millisecond, "the next run logs in again")
	select {
	case <-r.h.Ready():
	case <-time.After(30 * time.Second):
		t.Fatal("the bot on its new account did not get ready")
	}
	require.ErrorIs(t, r.stop(), context.Canceled)
}
