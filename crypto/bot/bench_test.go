package bot

import (
	"context"
	"fmt"
	"io"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"
	"maunium.net/go/mautrix/event"

	"github.com/sliding-e2ee/sdk/internal/minihs"
	"github.com/sliding-e2ee/sdk/slidingsync"
)

// BenchmarkReplyLatency measures the time from the moment the server can deliver an
// encrypted message to the moment the echo bot's encrypted reply is stored on the server
// (demo homeserver on loopback, SQLite with fsync, every message under a new room key, so a
// room key travels with every message):
//
//   - same-response: the room key and the message arrive in one sync response (the server
//     holds the bot's long-poll while alice sends both);
//   - key-later: the message arrives first, its room key in a later response; the time runs
//     from the release of the key, and the bot must be woken by the key's commit.
//
// ns/op is the mean latency; p50-ms, p99-ms and max-ms its distribution.
//
//	go test -tags goolm -run '^$' -bench ReplyLatency -benchtime 200x ./crypto/bot/
func BenchmarkReplyLatency(b *testing.B) {
	for _, mode := range []string{"same-response", "key-later"} {
		b.Run(mode, func(b *testing.B) {
			ctx, cancel := context.WithCancel(zerolog.New(io.Discard).WithContext(context.Background()))
			defer cancel()
			srv, err := minihs.NewServer(minihs.Options{Rooms: 3, Dir: b.TempDir()})
			require.NoError(b, err)
			defer srv.Close()
			botUser, dev, token := srv.Bot()
			alice, err := srv.NewPeer(ctx, "@alice:"+minihs.ServerName)
			require.NoError(b, err)
			room, err := alice.CreateEncryptedRoom(ctx, "latency", botUser)
			require.NoError(b, err)
			cli := newClientFor(b, srv.URL(), botUser, dev, token)
			h, err := New(cli, Config{DB: filepath.Join(b.TempDir(), "bot.db"), AutoJoin: true, Protocol: slidingsync.ProtocolMSC4186})
			require.NoError(b, err)
			cli.Crypto = h
			echo(h, cli)
			done := make(chan error, 1)
			go func() { done <- h.Run(ctx) }()
			defer func() {
				cancel()
				<-done
			}()
			require.NoError(b, srv.WaitFor(ctx, func() bool { return srv.Membership(room, botUser) == event.MembershipJoin }))
			<-h.Ready()
			replies := func() int {
				n := 0
				for _, e := range srv.RoomEvents(room) {
					if e.Sender == botUser {
						n++
					}
				}
				return n
			}
			exchange := func(i int) time.Duration {
				// A new megolm session: its key goes to the bot with the message.
				require.NoError(b, alice.Olm.CryptoStore.RemoveOutboundGroupSession(ctx, room))
				before := replies()
				var release func()
				if mode == "same-response" {
					release = srv.HoldSync()
				} else {
					release = srv.HoldToDevice()
				}
				sent := time.Now()
				_, err := alice.SendEncrypted(ctx, room, fmt.Sprintf("ping %d", i))
				require.NoError(b, err)
				if mode == "key-later" {
					// The bot has committed the response with the message once it asks again.
					require.NoError(b, srv.WaitFor(ctx, func() bool {
						reqs := srv.SyncRequests()
						return len(reqs) > 0 && reqs[len(reqs)-1].Arrived.After(sent) && len(reqs) >= 2 &&
							!reqs[len(reqs)-2].Answered.Before(sent)
					}))
				}
				start := time.Now()
				release()
				require.NoError(b, srv.WaitFor(ctx, func() bool { return replies() > before }))
				return time.Since(start)
			}
			exchange(-1) // warm up
			var lat []time.Duration
			b.ResetTimer()
			for i := 0; b.Loop(); i++ {
				lat = append(lat, exchange(i))
			}
			b.StopTimer()
			slices.Sort(lat)
			var sum time.Duration
			for _, d := range lat {
				sum += d
			}
			ms := func(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
			b.ReportMetric(float64(sum)/float64(len(lat)), "ns/op")
			b.ReportMetric(ms(lat[len(lat)/2]), "p50-ms")
			b.ReportMetric(ms(lat[min(len(lat)-1, len(lat)*99/100)]), "p99-ms")
			b.ReportMetric(ms(lat[len(lat)-1]), "max-ms")
		})
	}
}
