package slidingsync_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/id"

	"github.com/sliding-e2ee/sdk/slidingsync"
	"github.com/sliding-e2ee/sdk/slidingsync/slidingsynctest"
	"github.com/sliding-e2ee/sdk/slidingsync/sqlstore"
	"github.com/sliding-e2ee/sdk/slidingsync/sqlstore/dbopen"
)

// quickstart is the README's quick-start code; TestReadmeQuickstartInSync keeps them equal.
func quickstart(ctx context.Context, cli *mautrix.Client, dbPath string) error {
	// quickstart:start
	db, err := dbopen.Open(dbPath, dbopen.Config{}) // SQLite, or a postgres:// URI
	if err != nil {
		return err
	}
	defer db.Close()
	store := sqlstore.New(db, nil)
	if err := store.Upgrade(ctx); err != nil {
		return err
	}
	conn, err := slidingsync.New(cli, slidingsync.Config{
		Store: store, // pos, rooms, lists and extension cursors survive restarts
		Lists: map[string]slidingsync.List{"all": {
			Window: slidingsync.Grow(500), // grows in the background until every room is known
			ListConfig: slidingsync.ListConfig{
				TimelineLimit: 1,
				RequiredState: slidingsync.RequiredState{Include: []slidingsync.StateFilter{
					{Type: "m.room.name", StateKey: ""}, {Type: "m.room.encryption", StateKey: ""},
				}},
			},
		}},
		OnResponse: func(ctx context.Context, res *slidingsync.Result) (slidingsync.Step, error) {
			for roomID, room := range res.Rooms {
				fmt.Printf("%s is called %q\n", roomID, room.Name)
			}
			return slidingsync.Step{}, nil // an error retries the same response later: handlers must be idempotent
		},
	})
	if err != nil {
		return err
	}
	return conn.Run(ctx) // blocks until ctx ends or a fatal error
	// quickstart:end
}

func Example_quickstart() {
	srv := slidingsynctest.NewServer(slidingsynctest.Options{})
	srv.Push(&slidingsync.Response{Rooms: map[id.RoomID]*slidingsync.RoomResponse{
		"!lobby:example.org": {Initial: true, Name: slidingsync.Some("Lobby")},
	}})
	dir, err := os.MkdirTemp("", "quickstart")
	if err != nil {
		panic(err)
	}
	defer os.RemoveAll(dir)
	ctx, cancel := context.WithCancel(context.Background())
	srv.SetResponder(func(req *slidingsync.Request) *slidingsync.Response {
		if req.Pos != "" {
			cancel() // the first response was processed and committed: stop the example
		}
		return nil
	})
	err = quickstart(ctx, srv.NewClient(), filepath.Join(dir, "bot.db"))
	fmt.Println(err)
	// Output:
	// !lobby:example.org is called "Lobby"
	// context canceled
}

func TestReadmeQuickstartInSync(t *testing.T) {
	readme, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	src, err := os.ReadFile("example_quickstart_test.go")
	if err != nil {
		t.Fatal(err)
	}
	block := regexp.MustCompile("(?s)<!-- quickstart-conn -->\\s*```go\\n(.*?)```").FindSubmatch(readme)
	code := regexp.MustCompile(`(?s)// quickstart:start\n(.*?)\s*// quickstart:end`).FindSubmatch(src)
	if block == nil || code == nil {
		t.Fatal("quick-start markers not found in README.md or example_quickstart_test.go")
	}
	norm := func(b []byte) string {
		var lines []string
		for _, l := range strings.Split(string(b), "\n") {
			if l = strings.TrimSpace(l); l != "" {
				lines = append(lines, l)
			}
		}
		return strings.Join(lines, "\n")
	}
	if norm(block[1]) != norm(code[1]) {
		t.Errorf("README quick-start differs from example_quickstart_test.go:\nREADME:\n%s\n\nexample:\n%s", block[1], code[1])
	}
}
