package bot

import (
	"context"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/sliding-e2ee/sdk/internal/minihs"
	"github.com/sliding-e2ee/sdk/internal/testlog"
	"github.com/sliding-e2ee/sdk/slidingsync"
)

// Secrets planted in every path a bot's logs could carry them, at trace level: the password
// of the login, the pickle key, an encrypted room's message and reply, an unencrypted room's
// message and its reply whose first send fails (the server stores it and loses the answer,
// so mautrix logs the failed request). With the logger wrapped as the package docs say
// (slidingsync.RedactRequestBodies) none of them is in the logs; without the wrapper the
// unencrypted reply is, which shows the test would see a leak.
func TestSecretsStayOutOfTheLogs(t *testing.T) {
	for _, redact := range []bool{true, false} {
		t.Run(map[bool]string{true: "redacted", false: "mautrix request logging"}[redact], func(t *testing.T) {
			const (
				encSecret   = "enc-secret-7f3a"
				plainSecret = "plain-secret-91bc"
				pickle      = "pickle-secret-5d2e"
			)
			logs := &testlog.Buffer{}
			var w = zerolog.SyncWriter(logs)
			if redact {
				w = slidingsync.RedactRequestBodies(w)
			}
			log := zerolog.New(w).Level(zerolog.TraceLevel)
			ctx := log.WithContext(t.Context())

			var plainRoom atomic.Value
			var failed atomic.Bool
			f := newFixture(t, minihs.Options{SendFault: func(roomID id.RoomID, _ string) minihs.SendFault {
				if r, _ := plainRoom.Load().(id.RoomID); r == roomID && failed.CompareAndSwap(false, true) {
					return minihs.SendStoreDropResponse
				}
				return minihs.SendAnswer
			}})
			bot, _, token := f.srv.Bot()
			plain, err := f.alice.CreatePlainRoom(ctx, "Plain", bot)
			require.NoError(t, err)
			plainRoom.Store(plain)

			cli, err := mautrix.NewClient(f.srv.URL(), "", "")
			require.NoError(t, err)
			cli.Log = log
			r := f.start(ctx, cli, Config{LoginAs: PasswordLogin(bot, minihs.BotPassword), PickleKey: []byte(pickle)}, nil)
			f.waitJoined(ctx, r)
			_, err = f.alice.SendEncrypted(ctx, f.room, encSecret)
			require.NoError(t, err)
			assert.Equal(t, []string{"echo: " + encSecret}, f.replies(ctx, 1, 30*time.Second))
			require.Eventually(t, func() bool { return f.srv.Membership(plain, bot) == "join" }, 30*time.Second, 10*time.Millisecond)
			_, err = f.alice.Client.SendText(ctx, plain, plainSecret)
			require.NoError(t, err)
			replies := func() int {
				n := 0
				for _, e := range f.srv.RoomEvents(plain) {
					if e.Sender == bot && e.Type == event.EventMessage {
						n++
					}
				}
				return n
			}
			require.Eventually(t, func() bool { return replies() > 0 }, 30*time.Second, 10*time.Millisecond,
				"the bot answers in clear in the unencrypted room")
			time.Sleep(200 * time.Millisecond) // a doubled reply would show now
			assert.Equal(t, 1, replies(), "answered once, though the first send's answer was lost")
			require.ErrorIs(t, r.stop(), context.Canceled)
			require.True(t, failed.Load(), "the reply's first send failed")

			out := logs.String()
			require.Contains(t, out, "/send/m.room.message/", "the logs hold the sends")
			if !redact {
				assert.Contains(t, out, plainSecret, "mautrix logs the body of a send")
				return
			}
			for _, secret := range []string{encSecret, plainSecret, pickle, minihs.BotPassword, token} {
				assert.False(t, strings.Contains(out, secret), "a secret reached the logs: %q", secret)
			}
		})
	}
}
