package bot_test

import (
	"context"
	"os"
	"regexp"
	"strings"
	"testing"

	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/crypto/cryptohelper"
	"maunium.net/go/mautrix/event"

	"github.com/sliding-e2ee/sdk/crypto/bot"
)

// onSync is a bot on mautrix's /sync with its cryptohelper, and onSliding the same bot on this
// SDK: the README's migration section shows the difference, and TestReadmeMigrationInSync
// keeps it equal to these two functions, which must compile.

func onSync(ctx context.Context, cli *mautrix.Client, pickleKey []byte, login *mautrix.ReqLogin) error {
	// migration:before
	helper, err := cryptohelper.NewCryptoHelper(cli, pickleKey, "bot.db")
	if err != nil {
		return err
	}
	helper.LoginAs = login
	if err := helper.Init(ctx); err != nil {
		return err
	}
	cli.Crypto = helper
	syncer := cli.Syncer.(*mautrix.DefaultSyncer)
	syncer.OnEventType(event.EventMessage, func(ctx context.Context, evt *event.Event) {
		if evt.Sender != cli.UserID {
			_, _ = cli.SendText(ctx, evt.RoomID, "echo: "+evt.Content.AsMessage().Body)
		}
	})
	return cli.SyncWithContext(ctx)
	// migration:before-end
}

func onSliding(ctx context.Context, cli *mautrix.Client, pickleKey []byte, login *mautrix.ReqLogin) error {
	// migration:after
	helper, err := bot.New(cli, bot.Config{DB: "bot.db", PickleKey: pickleKey, LoginAs: login})
	if err != nil {
		return err
	}
	cli.Crypto = helper
	syncer := cli.Syncer.(*mautrix.DefaultSyncer)
	syncer.OnEventType(event.EventMessage, func(ctx context.Context, evt *event.Event) {
		if evt.Sender != cli.UserID {
			_, _ = cli.SendText(ctx, evt.RoomID, "echo: "+evt.Content.AsMessage().Body)
		}
	})
	return helper.Run(ctx)
	// migration:after-end
}

var _, _ = onSync, onSliding

func TestReadmeMigrationInSync(t *testing.T) {
	readme, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	src, err := os.ReadFile("migration_test.go")
	if err != nil {
		t.Fatal(err)
	}
	diff := regexp.MustCompile("(?s)<!-- migration -->\\s*```diff\\n(.*?)```").FindSubmatch(readme)
	parts := regexp.MustCompile(`(?s)// migration:before\n(.*?)\n\s*// migration:before-end.*?// migration:after\n(.*?)\n\s*// migration:after-end`).FindSubmatch(src)
	if diff == nil || parts == nil {
		t.Fatal("migration markers not found in README.md or migration_test.go")
	}
	var before, after []string
	changed := 0
	for _, l := range strings.Split(strings.TrimRight(string(diff[1]), "\n"), "\n") {
		if l == "" {
			continue
		}
		text := l[1:]
		switch l[0] {
		case ' ':
			before, after = append(before, text), append(after, text)
		case '-':
			before = append(before, text)
			changed++
		case '+':
			after = append(after, text)
			changed++
		default:
			t.Fatalf("not a diff line: %q", l)
		}
	}
	if got, want := strings.Join(lines(strings.Join(before, "\n")), "\n"), strings.Join(lines(string(parts[1])), "\n"); got != want {
		t.Errorf("the README's migration diff does not start from onSync:\nREADME:\n%s\n\nonSync:\n%s", got, want)
	}
	if got, want := strings.Join(lines(strings.Join(after, "\n")), "\n"), strings.Join(lines(string(parts[2])), "\n"); got != want {
		t.Errorf("the README's migration diff does not end at onSliding:\nREADME:\n%s\n\nonSliding:\n%s", got, want)
	}
	if changed > 10 {
		t.Errorf("the migration changes %d lines, more than 10", changed)
	}
}
