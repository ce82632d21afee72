package bot_test

import (
	"context"
	"fmt"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/sliding-e2ee/sdk/crypto/bot"
	"github.com/sliding-e2ee/sdk/internal/minihs"
)

// echoBot is the README's quick start; TestReadmeQuickstartInSync keeps them equal.
// quickstart:start
func echoBot(ctx context.Context, homeserver string, user id.UserID, password string) error {
	cli, err := mautrix.NewClient(homeserver, user, "")
	if err != nil {
		return err
	}
	h, err := bot.New(cli, bot.Config{
		DB:       "bot.db",                          // SQLite path or postgres:// URI: session, keys, sync state
		LoginAs:  bot.PasswordLogin(user, password), // once: the session is kept in the database
		AutoJoin: true,                              // join invites once the device keys are up
	})
	if err != nil {
		return err
	}
	cli.Crypto = h // the client's sends encrypt in encrypted rooms
	// Handlers get decrypted events; their sends happen exactly once, even across crashes.
	h.OnEventType(event.EventMessage, func(ctx context.Context, evt *event.Event) {
		if _, err := cli.SendText(ctx, evt.RoomID, "echo: "+evt.Content.AsMessage().Body); err != nil {
			zerolog.Ctx(ctx).Err(err).Msg("Reply failed")
		}
	})
	return h.Run(ctx) // until ctx ends or a fatal error
}

// quickstart:end

// The quick start against the demo homeserver: alice invites the bot to an encrypted room
// and sends a message; the bot joins, decrypts it and answers encrypted, and alice decrypts
// the answer.
func Example() {
	dir, err := os.MkdirTemp("", "quickstart")
	if err != nil {
		panic(err)
	}
	defer os.RemoveAll(dir)
	wd, _ := os.Getwd()
	_ = os.Chdir(dir) // the quick start keeps bot.db in the working directory
	defer os.Chdir(wd)

	srv, err := minihs.NewServer(minihs.Options{Rooms: 3, Dir: dir})
	if err != nil {
		panic(err)
	}
	defer srv.Close()
	botUser, _, _ := srv.Bot()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	alice, err := srv.NewPeer(ctx, "@alice:"+minihs.ServerName)
	if err != nil {
		panic(err)
	}
	room, err := alice.CreateEncryptedRoom(ctx, "Echo", botUser)
	if err != nil {
		panic(err)
	}
	botCtx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- echoBot(botCtx, srv.URL(), botUser, minihs.BotPassword) }()

	_ = srv.WaitFor(ctx, func() bool { return srv.Membership(room, botUser) == event.MembershipJoin })
	if _, err := alice.SendEncrypted(ctx, room, "hello"); err != nil {
		panic(err)
	}
	reply, err := alice.NextMessage(ctx, room, botUser)
	if err != nil {
		panic(err)
	}
	fmt.Println(reply.Content.AsMessage().Body, reply.Mautrix.WasEncrypted)
	stop()
	fmt.Println(<-done)
	// Output:
	// echo: hello true
	// context canceled
}

// lines returns the non-empty lines of b, trimmed.
func lines(b string) []string {
	var out []string
	for _, l := range strings.Split(b, "\n") {
		if l = strings.TrimSpace(l); l != "" {
			out = append(out, l)
		}
	}
	return out
}

func TestReadmeQuickstartInSync(t *testing.T) {
	readme, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	src, err := os.ReadFile("example_test.go")
	if err != nil {
		t.Fatal(err)
	}
	block := regexp.MustCompile("(?s)<!-- quickstart -->\\s*```go\\n(.*?)```").FindSubmatch(readme)
	code := regexp.MustCompile(`(?s)// quickstart:start\n(.*?)\s*// quickstart:end`).FindSubmatch(src)
	if block == nil || code == nil {
		t.Fatal("quick-start markers not found in README.md or example_test.go")
	}
	if got, want := strings.Join(lines(string(block[1])), "\n"), strings.Join(lines(string(code[1])), "\n"); got != want {
		t.Errorf("README quick-start differs from example_test.go:\nREADME:\n%s\n\nexample:\n%s", got, want)
	}
	if n := strings.Count(strings.TrimSpace(string(block[1])), "\n") + 1; n > 30 {
		t.Errorf("the quick start has %d lines, more than 30", n)
	}
}
