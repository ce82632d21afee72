package main

import (
	"context"
	"net/http"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"maunium.net/go/mautrix/event"

	"github.com/sliding-e2ee/sdk/internal/minihs"
)

// idleAnswers returns the requests that arrived after since and were answered with their
// own pos: Synapse's idle long-polls.
func idleAnswers(reqs []minihs.SyncRequest, since time.Time) []minihs.SyncRequest {
	var out []minihs.SyncRequest
	for _, r := range reqs {
		if r.Arrived.After(since) && r.Status == http.StatusOK && r.AnswerPos != "" && r.AnswerPos == r.Pos {
			out = append(out, r)
		}
	}
	return out
}

// TestBotLongPollsAgainAfterSamePos holds the bot to Synapse's idle long-poll, which answers
// with exactly the pos the request sent: the bot must process that answer like any other and
// long-poll again at once. So a message that arrives 1 s after such an answer (the third in a
// row, when a client that takes them for replays backs off longest) is answered within 1 s,
// and no answer is followed by a pause before the bot's next request.
func TestBotLongPollsAgainAfterSamePos(t *testing.T) {
	const idle = 2 * time.Second // the bot's long-poll, which the server honours as Synapse does
	srv, err := minihs.NewServer(minihs.Options{Rooms: 30, Dir: t.TempDir()})
	require.NoError(t, err)
	defer srv.Close()
	bot, dev, token := srv.Bot()
	alice, err := srv.NewPeer(t.Context(), demoPeer)
	require.NoError(t, err)
	roomID, err := alice.CreateEncryptedRoom(t.Context(), "Idle", bot)
	require.NoError(t, err)

	echoed := make(chan answered, 16)
	startBot(t, demoContext(t), options{
		homeserver: srv.URL(), user: bot.String(), accessToken: token, deviceID: dev.String(),
		db: filepath.Join(t.TempDir(), "bot.db"), protocol: "msc4186", pollTimeout: idle,
	}, nil, func(e answered) { echoed <- e })
	wctx, wcancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer wcancel()
	waitEcho := func(body string) answered {
		t.Helper()
		for {
			select {
			case e := <-echoed:
				if e.body == "echo: "+body {
					return e
				}
			case <-wctx.Done():
				t.Fatalf("no answer to %q", body)
			}
		}
	}

	// Set up: the bot joined, its keys are on the server, and one exchange shared the room
	// keys both ways, so that the timed message needs no key traffic.
	require.NoError(t, srv.WaitFor(wctx, func() bool {
		_, fb, _ := srv.KeyCounts(bot, dev)
		return srv.Membership(roomID, bot) == event.MembershipJoin && fb != ""
	}))
	_, err = alice.SendEncrypted(wctx, roomID, "warm up")
	require.NoError(t, err)
	waitEcho("warm up")
	warm := time.Now()

	// Three idle long-polls in a row answered with the request's pos.
	var third minihs.SyncRequest
	require.NoError(t, srv.WaitFor(wctx, func() bool {
		runs := idleAnswers(srv.SyncRequests(), warm)
		for i := 2; i < len(runs); i++ {
			if runs[i].AnswerPos == runs[i-2].AnswerPos {
				third = runs[i]
				return true
			}
		}
		return false
	}), "three idle long-polls with the same pos")

	time.Sleep(time.Until(third.Answered.Add(time.Second)))
	sent := time.Now()
	_, err = alice.SendEncrypted(wctx, roomID, "ping")
	require.NoError(t, err)
	got := waitEcho("ping")
	took := got.at.Sub(sent)
	assert.LessOrEqual(t, took, time.Second, "a message 1 s after an idle answer with the same pos was answered after %v", took)
	end := time.Now()

	// No pause between an answer and the bot's next request.
	const maxGap = 400 * time.Millisecond
	var bots []minihs.SyncRequest
	for _, r := range srv.SyncRequests() {
		if r.Arrived.After(warm) && r.Arrived.Before(end) {
			bots = append(bots, r)
		}
	}
	require.Greater(t, len(bots), 4)
	var worst time.Duration
	for i := 1; i < len(bots); i++ {
		prev := bots[i-1]
		if prev.Answered.IsZero() {
			continue // cancelled by the bot itself, as a changed window does
		}
		gap := bots[i].Arrived.Sub(prev.Answered)
		worst = max(worst, gap)
		assert.Less(t, gap, maxGap, "request %d came %v after the answer (pos %s) to the one before", i, gap, prev.AnswerPos)
	}
	t.Logf("%d requests after the warm-up; the answer to the timed message came after %v; longest gap between an answer and the next request %v",
		len(bots), took, worst)
}
