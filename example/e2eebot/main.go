// Command e2eebot is the example bot of this SDK: an end-to-end encrypted echo bot on sliding
// sync. With no -homeserver it starts an embedded demo homeserver on loopback and shows, in
// readable lines, what the SDK does; with one it runs against a real account:
//
//	go run -tags goolm ./example/e2eebot [-homeserver URL] [-user @bot:example.org] [-password PW]
//	     [-access-token TOKEN -device-id ID] [-db PATH_OR_POSTGRES_URI] [-protocol auto|msc4186|msc3575|v4]
//	     [-conn-id ID]
//
// It is a thin program on package crypto/bot, which does the work: it logs in with the
// password once and keeps the session in the database (SQLite by default, PostgreSQL for a
// postgres:// URI), so a restart reuses the device and its identity; it uploads its keys,
// syncs with the e2ee and to_device extensions, joins the rooms it is invited to (once its
// keys are on the server) and answers every text message from others with "echo: <body>",
// encrypted in encrypted rooms, fetching the events a limited timeline left out. Every
// message is answered exactly once, across crashes and on servers that do not deduplicate
// transaction IDs. SIGINT and SIGTERM stop it cleanly; logs go to stderr, without secrets,
// request bodies or message contents. E2EEBOT_PICKLE_KEY, when set, is the key of the Olm
// account in the database.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/rs/zerolog"

	"github.com/sliding-e2ee/sdk/slidingsync"
)

type options struct {
	homeserver  string
	user        string
	password    string
	accessToken string
	deviceID    string
	db          string
	protocol    string
	syncURL     string // where sliding sync is served, when not the homeserver
	connID      string
	demoRooms   int
	dbSet       bool // -db was given; the demo then keeps its database there
	insecure    bool
	logout      bool // delete the stored device and exit
	// leaseDuration is how long a bot that died keeps others from taking over its device.
	leaseDuration time.Duration
	// leaseHolder names this bot in the lease; a restart with the same name takes the lease
	// back at once. Empty: a name unique to the process.
	leaseHolder string
	// pollTimeout is the long-poll asked of the server; zero means the SDK's default.
	pollTimeout time.Duration
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
	flag.StringVar(&o.syncURL, "sliding-sync-url", "", "sliding sync server when it is not the homeserver (an MSC3575 proxy); implies -protocol msc3575 unless another is given. Without it, -protocol msc3575 takes the proxy from .well-known")
	flag.StringVar(&o.connID, "conn-id", "", "sliding sync conn_id")
	flag.IntVar(&o.demoRooms, "demo-rooms", 2000, "rooms in the demo account")
	flag.BoolVar(&o.logout, "logout", false, "delete the device stored in -db on the server (peers stop encrypting for it) and forget it, then exit")
	flag.BoolVar(&o.insecure, "allow-insecure-http", false, "allow plain http:// to a homeserver that is not on loopback")
	flag.DurationVar(&o.pollTimeout, "poll-timeout", 0, "how long the server may hold a sync request with nothing new (0 means the SDK's 30 s); shorter when a proxy on the way cuts idle requests")
	flag.DurationVar(&o.leaseDuration, "lease", 30*time.Second, "how long a bot that died keeps another process from taking over its device")
	flag.StringVar(&o.leaseHolder, "lease-holder", "", "a stable name for this bot in the lease, so that a restart on another host takes it back at once; only when a supervisor guarantees one process at a time (without it, a restart on the same host takes over at once once the old process is gone)")
	flag.Parse()
	flag.Visit(func(f *flag.Flag) { o.dbSet = o.dbSet || f.Name == "db" })

	// mautrix logs request bodies (the plain text of sends to unencrypted rooms): drop them.
	out := slidingsync.RedactRequestBodies(zerolog.ConsoleWriter{Out: os.Stderr, TimeFormat: time.TimeOnly})
	log := zerolog.New(out).Level(zerolog.InfoLevel).With().Timestamp().Logger()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ctx = log.WithContext(ctx)

	var err error
	if o.homeserver == "" {
		err = runDemo(ctx, o)
	} else {
		err = runBot(ctx, o)
	}
	if err != nil && !errors.Is(err, context.Canceled) {
		fmt.Fprintln(os.Stderr, "e2eebot:", err)
		os.Exit(1)
	}
}
