// Command e2eebot is the example bot of this SDK: an end-to-end encrypted echo bot on sliding
// sync. With no -homeserver it starts an embedded demo homeserver on loopback and shows, in
// readable lines, what the SDK does; with one it runs against a real account:
//
//	go run -tags goolm ./example/e2eebot [-homeserver URL] [-user @bot:example.org] [-password PW]
//	     [-access-token TOKEN -device-id ID] [-db PATH_OR_POSTGRES_URI] [-protocol auto|msc4186|msc3575|v4]
//	     [-conn-id ID]
//
// It logs in with the password once and stores the session in the database (SQLite by
// default, PostgreSQL for a postgres:// URI), so a restart reuses the device and its identity.
// It uploads its keys, syncs with the e2ee and to_device extensions, joins the rooms it is
// invited to and answers every text message from others with "echo: <body>", encrypted in
// encrypted rooms. Tasks (joins, replies) are queued in the transaction that commits the
// response they came from and marked done after they happened: a crash repeats a task rather
// than losing it, and a repeated reply carries the same transaction ID, which the homeserver
// deduplicates. SIGINT and SIGTERM stop it cleanly; logs go to stderr, without secrets or
// message contents.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net/http/httptest"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/rs/zerolog"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/sliding-e2ee/sdk/slidingsync"
	"github.com/sliding-e2ee/sdk/slidingsync/slidingsynctest"
	"github.com/sliding-e2ee/sdk/slidingsync/sqlstore"
	"github.com/sliding-e2ee/sdk/slidingsync/sqlstore/dbopen"
)

type options struct {
	homeserver  string
	user        string
	password    string
	accessToken string
	deviceID    string
	db          string
	protocol    string
	connID      string
	demoRooms   int
	dbSet       bool // -db was given; the demo then keeps its database there
	insecure    bool
	// leaseDuration is how long a bot that died keeps others from taking over its device.
	leaseDuration time.Duration
}

func main() {
	var o options
	flag.StringVar(&o.homeserver, "homeserver", "", "homeserver URL; empty runs the embedded demo homeserver")
	flag.StringVar(&o.user, "user", "", "user ID, e.g. @bot:example.org")
	flag.StringVar(&o.password, "password", "", "password (used once to log in)")
	flag.StringVar(&o.accessToken, "access-token", "", "access token (with -device-id) instead of a password")
	flag.StringVar(&o.deviceID, "device-id", "", "device ID belonging to -access-token")
	flag.StringVar(&o.db, "db", "e2eebot.db", "SQLite path or postgres:// URI; without -db the demo uses a temporary SQLite file")
	flag.StringVar(&o.protocol, "protocol", "auto", "sliding sync dialect: auto, msc4186, msc3575 or v4")
	flag.StringVar(&o.connID, "conn-id", "", "sliding sync conn_id")
	flag.IntVar(&o.demoRooms, "demo-rooms", 2000, "rooms in the demo account")
	flag.BoolVar(&o.insecure, "allow-insecure-http", false, "allow plain http:// to a homeserver that is not on loopback")
	flag.DurationVar(&o.leaseDuration, "lease", sqlstore.DefaultLeaseDuration, "how long a bot that died keeps another process from taking over its device")
	flag.Parse()
	flag.Visit(func(f *flag.Flag) { o.dbSet = o.dbSet || f.Name == "db" })

	log := zerolog.New(zerolog.ConsoleWriter{Out: os.Stderr, TimeFormat: time.TimeOnly}).Level(zerolog.InfoLevel).With().Timestamp().Logger()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ctx = log.WithContext(ctx)

	var err error
	if o.homeserver == "" {
		err = runDemo(ctx, o)
	} else {
		err = runBot(ctx, o, botHooks{})
	}
	if err != nil && !errors.Is(err, context.Canceled) {
		fmt.Fprintln(os.Stderr, "e2eebot:", err)
		os.Exit(1)
	}
}

// runDemo serves a scripted account over loopback HTTP and syncs it until the script is done.
func runDemo(ctx context.Context, o options) error {
	world := newDemoWorld(o.demoRooms)
	srv := slidingsynctest.NewServer(slidingsynctest.Options{Protocol: slidingsync.ProtocolMSC4186})
	srv.SetResponder(world.respond)
	hs := httptest.NewServer(srv)
	defer hs.Close()
	defer srv.Close()

	cli, err := mautrix.NewClient(hs.URL, slidingsynctest.DefaultUserID, slidingsynctest.DefaultAccessToken)
	if err != nil {
		return err
	}
	cli.DeviceID = slidingsynctest.DefaultDeviceID
	cli.Log = *zerolog.Ctx(ctx)
	fmt.Printf("demo: embedded homeserver at %s with %d rooms, bot %s\n", hs.URL, o.demoRooms, cli.UserID)

	dbTarget := o.db
	if !o.dbSet {
		dir, err := os.MkdirTemp("", "e2eebot-demo")
		if err != nil {
			return err
		}
		defer os.RemoveAll(dir)
		dbTarget = filepath.Join(dir, "demo.db")
	}
	store, closeStore, err := openStore(ctx, dbTarget)
	if err != nil {
		return err
	}
	defer closeStore()

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	const peer = id.UserID("@alice:demo.invalid")
	var (
		started     = time.Now()
		allKnownAt  time.Duration
		responses   int
		messageSeen bool
	)
	conn, err := slidingsync.New(cli, slidingsync.Config{
		Protocol: protocolOf(o.protocol),
		ConnID:   o.connID,
		Store:    store,
		Extensions: []slidingsync.Extension{afterCommit(func() {
			if messageSeen {
				cancel()
			}
		})},
		Lists: map[string]slidingsync.ListConfig{"all": {
			GrowBatch:     500,
			TimelineLimit: 1,
			RequiredState: slidingsync.RequiredState{Include: []slidingsync.StateFilter{
				{Type: "m.room.encryption"}, {Type: "m.room.name"}, {Type: "m.room.create"},
			}},
		}},
		OnResponse: func(_ context.Context, res *slidingsync.Result) error {
			responses++
			if ls, ok := res.Lists["all"]; ok {
				known := len(ls.Rooms)
				fmt.Printf("sync: rooms loaded %d of %d\n", known, ls.Count)
				if known == ls.Count && allKnownAt == 0 {
					allKnownAt = time.Since(started)
					fmt.Printf("sync: every room known after %s; a message arrives\n", allKnownAt.Round(time.Millisecond))
					srv.Push(world.message(7, peer, "hello from the demo"))
				}
			}
			for roomID, rs := range res.Rooms {
				for _, evt := range res.Response.Rooms[roomID].Timeline {
					if evt.Type == event.EventMessage && evt.Sender == peer {
						fmt.Printf("message: %s in %q: %v\n", evt.Sender, rs.Name, evt.Content.Raw["body"])
						messageSeen = true // stop once this response is committed
					}
				}
			}
			return nil
		},
	})
	if err != nil {
		return err
	}
	err = conn.Run(ctx)
	if !messageSeen {
		if err == nil || errors.Is(err, context.Canceled) {
			err = errors.New("demo interrupted before the script finished")
		}
		return fmt.Errorf("demo failed: %w", err)
	}
	// Reopen what was committed, as a restarted bot would.
	cp, err := store.Load(context.WithoutCancel(ctx), conn.Key())
	if err != nil {
		return fmt.Errorf("reload: %w", err)
	}
	if len(cp.Rooms) != o.demoRooms || cp.Pos != conn.Pos() {
		return fmt.Errorf("reload: %d rooms at pos %q, want %d at %q", len(cp.Rooms), cp.Pos, o.demoRooms, conn.Pos())
	}
	fmt.Printf("summary: discovered %s, loaded all %d rooms in %d responses (%s) with a window growing by 500, "+
		"then received a live message; each response was committed to SQLite in one transaction, "+
		"and reloading the database gives back all %d rooms at pos %q.\n",
		conn.Endpoint().Protocol, o.demoRooms, responses, allKnownAt.Round(time.Millisecond), len(cp.Rooms), cp.Pos)
	return nil
}

// openStore opens the database and upgrades the sliding sync store on it.
func openStore(ctx context.Context, target string) (*sqlstore.Store, func(), error) {
	db, err := dbopen.Open(target, dbopen.Config{})
	if err != nil {
		return nil, nil, err
	}
	store := sqlstore.New(db, nil)
	if err := store.Upgrade(ctx); err != nil {
		_ = db.Close()
		return nil, nil, fmt.Errorf("upgrade store: %w", err)
	}
	return store, func() { _ = db.Close() }, nil
}

// afterCommit is a client-side extension (it sends nothing) that runs fn after every commit.
type afterCommit func()

func (afterCommit) Name() string { return "demo_after_commit" }

func (afterCommit) Request(context.Context, slidingsync.RequestInfo) (any, error) { return nil, nil }

func (afterCommit) Process(context.Context, slidingsync.RequestInfo, json.RawMessage) error {
	return nil
}

func (fn afterCommit) AfterCommit(context.Context) { fn() }

func protocolOf(s string) slidingsync.Protocol {
	p, err := slidingsync.ParseProtocol(s)
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2eebot:", err)
		os.Exit(2)
	}
	return p
}
