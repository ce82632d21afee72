// Command v2bot is the baseline of the side-by-side benchmark: an echo bot on mautrix's
// classic pipeline (Client.Sync with the default syncer, OlmMachine.ProcessSyncResponse
// through cryptohelper, SQLCryptoStore and sqlstatestore on one SQLite database), doing the
// same work as the SDK's example bot: upload keys at start, track device lists, answer every
// m.text from others with an encrypted "echo: <body>", join on invite.
//
// By default it is written as a mautrix user writes it: cryptohelper.NewCryptoHelper(cli,
// key, path), which opens the file with mautrix's own driver and settings (mattn's cgo
// SQLite, WAL, synchronous=NORMAL), so it needs a cgo build. -store dbopen opens the file
// through the SDK's dbopen instead (pure-Go SQLite, synchronous=FULL), the earlier baseline.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"runtime/pprof"
	"syscall"
	"time"

	"github.com/rs/zerolog"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/crypto/cryptohelper"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/sliding-e2ee/sdk/slidingsync/sqlstore/dbopen"
)

func main() {
	homeserver := flag.String("homeserver", "", "homeserver URL")
	user := flag.String("user", "", "user ID")
	token := flag.String("access-token", "", "access token")
	deviceID := flag.String("device-id", "", "device ID of the access token")
	dbPath := flag.String("db", "v2bot.db", "SQLite path or postgres:// URI")
	verbose := flag.Bool("v", false, "log at debug level")
	store := flag.String("store", "path", "how the database is opened: path (cryptohelper with a path, as mautrix users do) or dbopen (the SDK's opener)")
	idleConns := flag.Int("max-idle-conns", 0, "with -store dbopen: idle SQLite connections kept open; 0 is dbopen's default, negative keeps none (a connection is opened for every statement)")
	cpuProfile := flag.String("cpuprofile", "", "write a CPU profile of the whole run to this file")
	flag.Parse()
	if *cpuProfile != "" {
		f, err := os.Create(*cpuProfile)
		if err == nil {
			err = pprof.StartCPUProfile(f)
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "v2bot:", err)
			os.Exit(1)
		}
		defer pprof.StopCPUProfile()
	}

	level := zerolog.WarnLevel
	if *verbose {
		level = zerolog.DebugLevel
	}
	log := zerolog.New(zerolog.ConsoleWriter{Out: os.Stderr, TimeFormat: time.TimeOnly}).Level(level).With().Timestamp().Logger()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ctx = log.WithContext(ctx)
	if err := run(ctx, *homeserver, id.UserID(*user), *token, id.DeviceID(*deviceID), *dbPath, *store, *idleConns); err != nil && !errors.Is(err, context.Canceled) {
		fmt.Fprintln(os.Stderr, "v2bot:", err)
		pprof.StopCPUProfile()
		os.Exit(1)
	}
}

func run(ctx context.Context, homeserver string, userID id.UserID, token string, deviceID id.DeviceID, dbPath, store string, idleConns int) error {
	if homeserver == "" || userID == "" || token == "" || deviceID == "" {
		return errors.New("-homeserver, -user, -access-token and -device-id are required")
	}
	cli, err := mautrix.NewClient(homeserver, userID, token)
	if err != nil {
		return err
	}
	cli.DeviceID = deviceID
	cli.Log = *zerolog.Ctx(ctx)
	var dbArg any = dbPath
	switch store {
	case "path":
	case "dbopen":
		db, err := dbopen.Open(dbPath, dbopen.Config{MaxIdleConns: max(idleConns, 0)})
		if err != nil {
			return err
		}
		if idleConns < 0 {
			db.RawDB.SetMaxIdleConns(0)
		}
		dbArg = db
	default:
		return fmt.Errorf("-store %q: want path or dbopen", store)
	}
	helper, err := cryptohelper.NewCryptoHelper(cli, []byte("syncbench v2bot pickle key"), dbArg)
	if err != nil {
		return err
	}
	defer helper.Close() // closes the database in both cases
	// Init loads the account and uploads device and one-time keys when the server has none.
	if err := helper.Init(ctx); err != nil {
		return fmt.Errorf("crypto init: %w", err)
	}
	cli.Crypto = helper
	syncer := cli.Syncer.(*mautrix.DefaultSyncer)
	syncer.OnEventType(event.EventMessage, func(ctx context.Context, evt *event.Event) {
		msg := evt.Content.AsMessage()
		if evt.Sender == cli.UserID || msg == nil || msg.MsgType != event.MsgText {
			return
		}
		_, err := cli.SendMessageEvent(ctx, evt.RoomID, event.EventMessage, &event.MessageEventContent{
			MsgType: event.MsgText, Body: "echo: " + msg.Body,
		})
		if err != nil {
			zerolog.Ctx(ctx).Err(err).Stringer("room_id", evt.RoomID).Msg("Echo failed")
		}
	})
	syncer.OnEventType(event.StateMember, func(ctx context.Context, evt *event.Event) {
		if evt.GetStateKey() == cli.UserID.String() && evt.Content.AsMember().Membership == event.MembershipInvite {
			if _, err := cli.JoinRoomByID(ctx, evt.RoomID); err != nil {
				zerolog.Ctx(ctx).Err(err).Stringer("room_id", evt.RoomID).Msg("Join failed")
			}
		}
	})
	return cli.SyncWithContext(ctx)
}
