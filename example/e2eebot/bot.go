package main

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"os"

	"github.com/rs/zerolog"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/sliding-e2ee/sdk/crypto/bot"
	"github.com/sliding-e2ee/sdk/slidingsync"
)

// pickleKeyEnv names the environment variable that, when set, gives the key the Olm account
// and sessions are encrypted with in the database. Without it the package makes a random key
// on the first start and keeps it in the database.
const pickleKeyEnv = "E2EEBOT_PICKLE_KEY"

// config returns the client and the bot configuration that the options ask for. It makes no
// request.
func config(ctx context.Context, o options) (*mautrix.Client, bot.Config, error) {
	if o.user == "" {
		return nil, bot.Config{}, errors.New("-user is required with -homeserver")
	}
	user := id.UserID(o.user)
	if _, _, err := user.Parse(); err != nil {
		return nil, bot.Config{}, fmt.Errorf("-user %q: give the full user ID, like @bot:example.org", o.user)
	}
	proto, err := slidingsync.ParseProtocol(o.protocol)
	if err != nil {
		return nil, bot.Config{}, fmt.Errorf("-protocol: %w", err)
	}
	if o.syncURL != "" && proto == slidingsync.ProtocolAuto {
		proto = slidingsync.ProtocolMSC3575 // a separate sync server is a proxy
	}
	if err := checkURLFlag("-homeserver", o.homeserver, o.insecure); err != nil {
		return nil, bot.Config{}, err
	}
	if err := checkURLFlag("-sliding-sync-url", o.syncURL, o.insecure); o.syncURL != "" && err != nil {
		return nil, bot.Config{}, err
	}
	if len(o.connID) > 16 {
		return nil, bot.Config{}, fmt.Errorf("-conn-id %q: at most 16 characters", o.connID)
	}
	if o.pollTimeout < 0 {
		return nil, bot.Config{}, fmt.Errorf("-poll-timeout %s: must not be negative (0 means the default)", o.pollTimeout)
	}
	if o.leaseDuration < 0 {
		return nil, bot.Config{}, fmt.Errorf("-lease %s: must not be negative (0 means the default)", o.leaseDuration)
	}
	cli, err := mautrix.NewClient(o.homeserver, user, o.accessToken)
	if err != nil {
		return nil, bot.Config{}, fmt.Errorf("-homeserver: %w", err)
	}
	cli.DeviceID = id.DeviceID(o.deviceID)
	if o.accessToken != "" && o.deviceID == "" {
		return nil, bot.Config{}, errors.New("-access-token needs -device-id")
	}
	cli.Log = *zerolog.Ctx(ctx)
	cfg := bot.Config{
		DB:                o.db,
		PickleKey:         []byte(os.Getenv(pickleKeyEnv)),
		AutoJoin:          true,
		Protocol:          proto,
		BaseURL:           o.syncURL,
		ConnID:            o.connID,
		PollTimeout:       o.pollTimeout,
		AllowInsecureHTTP: o.insecure,
		Lease:             bot.LeaseConfig{Duration: o.leaseDuration, Holder: o.leaseHolder},
	}
	if o.password != "" && !o.logout {
		cfg.LoginAs = bot.PasswordLogin(user, o.password)
		cfg.LoginAs.InitialDeviceDisplayName = "e2eebot"
	}
	return cli, cfg, nil
}

// checkURLFlag refuses a URL flag without a scheme and host, and plain http:// to a host that
// is not on this machine unless -allow-insecure-http is given, before any request is made.
func checkURLFlag(flag, raw string, insecure bool) error {
	u, err := url.Parse(raw)
	if err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" {
		return fmt.Errorf("%s %q: give a URL with its scheme, like https://matrix.example.org", flag, raw)
	}
	if err := slidingsync.CheckTransport(u); err != nil && !insecure {
		return fmt.Errorf("%s %q: plain HTTP to a host that is not on this machine would send the password and token in clear; use https:// or -allow-insecure-http", flag, raw)
	}
	return nil
}

// newEcho returns the echo bot: every text message from others is answered with
// "echo: <body>", as a reply, encrypted in encrypted rooms, exactly once.
func newEcho(cli *mautrix.Client, cfg bot.Config) (*bot.Helper, error) {
	h, err := bot.New(cli, cfg)
	if err != nil {
		return nil, err
	}
	cli.Crypto = h
	h.OnEventType(event.EventMessage, func(ctx context.Context, evt *event.Event) {
		msg := evt.Content.AsMessage()
		if msg.MsgType != event.MsgText {
			return
		}
		reply := &event.MessageEventContent{MsgType: event.MsgText, Body: "echo: " + msg.Body}
		reply.RelatesTo = (&event.RelatesTo{}).SetReplyTo(evt.ID)
		if _, err := cli.SendMessageEvent(ctx, evt.RoomID, event.EventMessage, reply); err != nil {
			zerolog.Ctx(ctx).Warn().Err(err).Msg("Reply failed")
			return
		}
		zerolog.Ctx(ctx).Info().Bool("encrypted", evt.Mautrix.WasEncrypted).Msg("Replied")
	})
	return h, nil
}

// runBot runs the echo bot with the options of the command line until ctx is done or the bot
// fails.
func runBot(ctx context.Context, o options) error {
	cli, cfg, err := config(ctx, o)
	if err != nil {
		return err
	}
	h, err := newEcho(cli, cfg)
	if err != nil {
		return err
	}
	if o.logout {
		return h.Logout(ctx)
	}
	return h.Run(ctx)
}
