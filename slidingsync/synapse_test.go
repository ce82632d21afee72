package slidingsync_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/rs/zerolog"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/id"

	"github.com/sliding-e2ee/sdk/slidingsync"
	"github.com/sliding-e2ee/sdk/slidingsync/slidingsynctest"
)

// synapseIdle answers requests with a pos as Synapse does: a long-poll waits for news or for
// its timeout, and on the timeout it answers with the very pos the request sent, carrying the
// extension's current data all the same. Requests without pos go to the scripted server.
type synapseIdle struct {
	next    http.RoundTripper
	news    chan string   // the pos of a response with a new room
	extData bool          // idle answers carry test_ext data
	capPoll time.Duration // when set, long-polls end after at most this long

	mu    sync.Mutex
	idles int
	sent  []sentRequest
}

type sentRequest struct {
	at      time.Time
	pos     string
	timeout string
}

func (s *synapseIdle) RoundTrip(req *http.Request) (*http.Response, error) {
	q := req.URL.Query()
	s.mu.Lock()
	s.sent = append(s.sent, sentRequest{at: time.Now(), pos: q.Get("pos"), timeout: q.Get("timeout")})
	s.mu.Unlock()
	pos := q.Get("pos")
	if pos == "" {
		return s.next.RoundTrip(req)
	}
	ms, _ := strconv.Atoi(q.Get("timeout"))
	wait := time.Duration(ms) * time.Millisecond
	if s.capPoll > 0 {
		wait = min(wait, s.capPoll)
	}
	timer := time.NewTimer(wait)
	defer timer.Stop()
	select {
	case newPos := <-s.news:
		return jsonResponse(http.StatusOK, `{"pos":"`+newPos+`","rooms":{"!msg:x":{"initial":true,"name":"msg"}},"extensions":{}}`, nil), nil
	case <-timer.C:
		s.mu.Lock()
		s.idles++
		n := s.idles
		s.mu.Unlock()
		ext := `{}`
		if s.extData {
			ext = fmt.Sprintf(`{"test_ext":{"next_batch":"idle%d"}}`, n)
		}
		return jsonResponse(http.StatusOK, fmt.Sprintf(`{"pos":%q,"rooms":{},"extensions":%s}`, pos, ext), nil), nil
	case <-req.Context().Done():
		return nil, req.Context().Err()
	}
}

func (s *synapseIdle) requests() []sentRequest {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]sentRequest(nil), s.sent...)
}

// countingStore counts the commits that reach the store.
type countingStore struct {
	*slidingsync.MemoryStore
	mu      sync.Mutex
	commits int
}

func (s *countingStore) Commit(ctx context.Context, key slidingsync.ConnKey, upd *slidingsync.Update) error {
	s.mu.Lock()
	s.commits++
	s.mu.Unlock()
	return s.MemoryStore.Commit(ctx, key, upd)
}

func (s *countingStore) count() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.commits
}

func TestSynapseIdleLongPollRepeatsPosAndIsProcessed(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		srv := slidingsynctest.NewServer(slidingsynctest.Options{})
		cli := srv.NewClient()
		tr := &synapseIdle{next: cli.Client.Transport, news: make(chan string), extData: true}
		cli.Client = &http.Client{Transport: tr}
		ext := &recordingExt{}
		h := startWith(t, srv, cli, slidingsync.ProtocolMSC4186, slidingsync.Config{Extensions: []slidingsync.Extension{ext}})
		srv.Push(roomResp("p1", "!a:x"))
		start := time.Now()
		h.run()

		// Three idle long-polls run out; a message arrives 1 s after the third answer.
		time.Sleep(3*zeroPollTimeout + time.Second)
		synctest.Wait()
		_, _, cursor := ext.snapshot()
		assert.Equal(t, "idle3", cursor, "the extension data of every same-pos answer is processed")
		sentNews := time.Now()
		tr.news <- "p2"
		synctest.Wait()
		_, ok := h.conn.Room("!msg:x")
		assert.True(t, ok, "the message is processed at once")
		assert.Equal(t, time.Duration(0), time.Since(sentNews), "no sleep between long-polls")
		assert.Equal(t, "p2", h.conn.Pos())
		require.ErrorIs(t, h.stop(t), context.Canceled)

		reqs := tr.requests()
		require.GreaterOrEqual(t, len(reqs), 5)
		for i, r := range reqs[1:5] {
			assert.Equal(t, "p1", r.pos, "request %d", i+1)
			assert.Equal(t, "30000", r.timeout, "request %d long-polls", i+1)
			assert.Equal(t, time.Duration(i)*zeroPollTimeout, r.at.Sub(start), "request %d follows the previous answer at once", i+1)
		}
	})
}

func TestSynapseIdleLongPollWithNothingNewCommitsNothing(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		srv := slidingsynctest.NewServer(slidingsynctest.Options{})
		cli := srv.NewClient()
		tr := &synapseIdle{next: cli.Client.Transport, news: make(chan string)}
		cli.Client = &http.Client{Transport: tr}
		store := &countingStore{MemoryStore: slidingsync.NewMemoryStore()}
		var handled int
		h := startWith(t, srv, cli, slidingsync.ProtocolMSC4186, slidingsync.Config{Store: store, OnResponse: func(context.Context, *slidingsync.Result) (slidingsync.Step, error) {
			handled++
			return slidingsync.Step{}, nil
		}})
		srv.Push(roomResp("p1", "!a:x"))
		h.run()
		time.Sleep(5*zeroPollTimeout + time.Second)
		synctest.Wait()
		require.ErrorIs(t, h.stop(t), context.Canceled)
		assert.Equal(t, 6, handled, "every answer reaches the handler")
		assert.Equal(t, 1, store.count(), "only the first answer had something to write")
	})
}

func TestSameposAnsweredAtOnceDoesNotSpin(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		// Not Synapse: a server that answers a long-poll at once with the pos it was sent.
		h := start(t, slidingsync.ProtocolMSC4186, slidingsync.Config{})
		h.srv.Push(roomResp("p1", "!a:x"))
		for range 5 {
			h.srv.Push(roomResp("p1"))
		}
		h.run()
		reqs, err := h.srv.WaitRequests(context.Background(), 6)
		require.NoError(t, err)
		require.ErrorIs(t, h.stop(t), context.Canceled)
		for i := 2; i < 6; i++ {
			assert.Greater(t, reqs[i].Received.Sub(reqs[i-1].Received), time.Duration(0), "request %d waits", i)
		}
	})
}

func TestSynapseInvalidStreamTokenStartsAfresh(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		// A pos Synapse cannot parse (another server issued it) gets 400 M_UNKNOWN "Invalid
		// stream token", not M_UNKNOWN_POS.
		store := slidingsync.NewMemoryStore()
		srv := slidingsynctest.NewServer(slidingsynctest.Options{})
		cli := srv.NewClient()
		key := slidingsync.ConnKey{UserID: cli.UserID, DeviceID: cli.DeviceID}
		require.NoError(t, store.Commit(context.Background(), key, &slidingsync.Update{Pos: "42"}))
		ext := &recordingExt{}
		h := startWith(t, srv, cli, slidingsync.ProtocolMSC4186, slidingsync.Config{Store: store, Extensions: []slidingsync.Extension{ext}})
		// The server never issued "42": its Synapse personality answers "Invalid stream token".
		srv.Push(roomResp("s1", "!a:x"))
		h.run()
		reqs, err := srv.WaitRequests(context.Background(), 3)
		require.NoError(t, err)
		require.ErrorIs(t, h.stop(t), context.Canceled)
		assert.Equal(t, "42", reqs[0].Parsed.Pos)
		assert.Equal(t, "", reqs[1].Parsed.Pos, "the next request starts a new connection")
		assert.Equal(t, "s1", reqs[2].Parsed.Pos)
		_, resets, _ := ext.snapshot()
		assert.Equal(t, 1, resets, "extensions learn of the reset as after M_UNKNOWN_POS")
	})
}

func TestStoredPosFromAnotherEndpointStartsNewConnection(t *testing.T) {
	for _, tc := range []struct {
		name       string
		origin     func(hs string) string
		keepCursor bool
	}{
		{"proxy then native Synapse", func(string) string { return "msc3575 https://proxy.example.org" }, false},
		{"other dialect, same server", func(hs string) string { return "v4 " + hs }, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				store := slidingsync.NewMemoryStore()
				srv := slidingsynctest.NewServer(slidingsynctest.Options{})
				cli := srv.NewClient()
				hs := strings.TrimSuffix(cli.HomeserverURL.String(), "/")
				key := slidingsync.ConnKey{UserID: cli.UserID, DeviceID: cli.DeviceID}
				require.NoError(t, store.Commit(context.Background(), key, &slidingsync.Update{
					Pos: "12", Origin: tc.origin(hs),
					Extensions: map[string]json.RawMessage{"test_ext": json.RawMessage(`"old-cursor"`)},
				}))
				ext := &recordingExt{}
				h := startWith(t, srv, cli, slidingsync.ProtocolMSC4186, slidingsync.Config{Store: store, Extensions: []slidingsync.Extension{ext}})
				srv.Push(roomResp("s1", "!a:x"))
				h.run()
				reqs, err := srv.WaitRequests(context.Background(), 2)
				require.NoError(t, err)
				require.ErrorIs(t, h.stop(t), context.Canceled)
				assert.Equal(t, "", reqs[0].Parsed.Pos, "a pos is only valid where it was issued")
				var body struct {
					Since string `json:"since"`
				}
				require.NoError(t, json.Unmarshal(reqs[0].Parsed.Extensions["test_ext"], &body))
				if tc.keepCursor {
					assert.Equal(t, "old-cursor", body.Since, "the same server keeps the extension cursors")
				} else {
					assert.Equal(t, "", body.Since, "another server's cursor means nothing here")
				}
				cp, err := store.Load(context.Background(), key)
				require.NoError(t, err)
				assert.Equal(t, "s1", cp.Pos)
				assert.Equal(t, "msc4186 "+hs, cp.Origin, "the new origin is stored with the first commit")
			})
		})
	}
}

func TestNoPollRequestWaitsForASlowServer(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		// Synapse computes a large initial response at once, which can take a minute on a
		// loaded server; the request must not be abandoned after the long-poll margin.
		srv := slidingsynctest.NewServer(slidingsynctest.Options{})
		cli := srv.NewClient()
		slow := &slowFirst{next: cli.Client.Transport, delay: time.Minute}
		cli.Client = &http.Client{Transport: slow}
		h := startWith(t, srv, cli, slidingsync.ProtocolMSC4186, slidingsync.Config{})
		srv.Push(roomResp("p1", "!a:x"))
		start := time.Now()
		h.run()
		time.Sleep(time.Minute + time.Second)
		synctest.Wait()
		assert.Equal(t, "p1", h.conn.Pos(), "the slow answer is taken")
		require.ErrorIs(t, h.stop(t), context.Canceled)
		reqs := srv.Requests()
		require.NotEmpty(t, reqs)
		assert.Equal(t, time.Minute, reqs[0].Received.Sub(start), "the first request was not abandoned and retried")
	})
}

// slowFirst delays the answer to the first request.
type slowFirst struct {
	next  http.RoundTripper
	delay time.Duration
	calls int
}

func (s *slowFirst) RoundTrip(req *http.Request) (*http.Response, error) {
	s.calls++
	if s.calls == 1 {
		select {
		case <-time.After(s.delay):
		case <-req.Context().Done():
			return nil, req.Context().Err()
		}
	}
	return s.next.RoundTrip(req)
}

func TestRepeatedServerErrorIsReportedAndLoggedOncePerStreak(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		// Synapse answers an unsupported filter with the same 500 every time.
		var reports []slidingsync.Failure
		srv := slidingsynctest.NewServer(slidingsynctest.Options{})
		cli := srv.NewClient()
		var logs strings.Builder
		var mu sync.Mutex
		cli.Log = zerolog.New(zerolog.SyncWriter(&lockedWriter{w: &logs, mu: &mu})).Level(zerolog.DebugLevel)
		h := startWith(t, srv, cli, slidingsync.ProtocolMSC4186, slidingsync.Config{OnFailure: func(_ context.Context, se slidingsync.Failure) {
			reports = append(reports, se)
		}})
		srv.Push(roomResp("p1", "!a:x"))
		for range 4 {
			srv.PushError(mautrix.MUnknown.WithMessage("Internal server error"))
		}
		srv.PushError(mautrix.MUnknown.WithStatus(http.StatusBadGateway).WithMessage("bad gateway"))
		srv.Push(roomResp("p2"))
		h.run()
		_, err := srv.WaitRequests(context.Background(), 7)
		require.NoError(t, err)
		synctest.Wait()
		require.ErrorIs(t, h.stop(t), context.Canceled)

		repeats := make([]int, len(reports))
		for i, r := range reports {
			repeats[i] = r.Repeats
			assert.Positive(t, r.RetryIn)
		}
		assert.Equal(t, []int{1, 2, 3, 4, 1}, repeats, "each failure is reported with its streak")
		assert.Equal(t, reports[0].Since, reports[3].Since, "one streak")
		mu.Lock()
		defer mu.Unlock()
		var errorLines int
		for _, line := range strings.Split(logs.String(), "\n") {
			if strings.Contains(line, `"level":"error"`) && strings.Contains(line, "Sync failed") {
				errorLines++
			}
		}
		assert.Equal(t, 2, errorLines, "one error line per streak of identical failures")
		assert.Contains(t, logs.String(), "Sync recovered")
	})
}

func TestConfigSynapseRefusesIsRefusedByNew(t *testing.T) {
	srv := slidingsynctest.NewServer(slidingsynctest.Options{})
	cli := srv.NewClient()
	lists := func(n int) map[string]slidingsync.List {
		out := make(map[string]slidingsync.List, n)
		for i := range n {
			out[fmt.Sprintf("l%d", i)] = slidingsync.List{ListConfig: allList}
		}
		return out
	}
	with := func(edit func(*slidingsync.ListConfig)) map[string]slidingsync.List {
		lc := allList
		edit(&lc)
		return map[string]slidingsync.List{"all": {ListConfig: lc}}
	}
	for _, tc := range []struct {
		name  string
		cfg   slidingsync.Config
		field string
	}{
		{"Synapse answers the spaces filter with 500", slidingsync.Config{Lists: with(func(lc *slidingsync.ListConfig) {
			lc.Filters = &slidingsync.ListFilters{Spaces: []string{"!space:x"}}
		})}, "Filters.Spaces"},
		{"Synapse answers room_name_like with 500", slidingsync.Config{Lists: with(func(lc *slidingsync.ListConfig) {
			lc.Filters = &slidingsync.ListFilters{RoomNameLike: "falcon"}
		})}, "Filters.RoomNameLike"},
		{"Synapse refuses a timeline limit over 1000", slidingsync.Config{Lists: with(func(lc *slidingsync.ListConfig) {
			lc.TimelineLimit = 1001
		})}, "TimelineLimit 1001"},
		{"Synapse refuses a subscription's timeline limit over 1000", slidingsync.Config{
			RoomSubscriptions: map[id.RoomID]slidingsync.RoomSubscription{"!a:x": {TimelineLimit: 5000}},
		}, "TimelineLimit 5000"},
		{"Synapse refuses a list name over 64 characters", slidingsync.Config{
			Lists: map[string]slidingsync.List{strings.Repeat("é", 65): {ListConfig: allList}},
		}, "longer than the 64 characters"},
		{"Synapse refuses more than 100 lists", slidingsync.Config{Lists: lists(101)}, "101 lists"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.cfg.Protocol = slidingsync.ProtocolMSC4186
			_, err := slidingsync.New(cli, tc.cfg)
			require.Error(t, err)
			assert.Contains(t, err.Error(), tc.field)
			assert.Contains(t, err.Error(), "msc4186")
			tc.cfg.Protocol = slidingsync.ProtocolMSC3575
			_, err = slidingsync.New(cli, tc.cfg)
			assert.NoError(t, err, "the proxy serves it")
		})
	}
	t.Run("at the limits", func(t *testing.T) {
		cfg := slidingsync.Config{Protocol: slidingsync.ProtocolMSC4186, Lists: lists(100)}
		cfg.Lists[strings.Repeat("é", 64)] = slidingsync.List{ListConfig: slidingsync.ListConfig{TimelineLimit: 1000}}
		delete(cfg.Lists, "l0")
		_, err := slidingsync.New(cli, cfg)
		assert.NoError(t, err)
	})
}

func TestConfigSynapseRefusesIsRefusedAfterDiscoveryAndBySetList(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		srv := slidingsynctest.NewServer(slidingsynctest.Options{}) // advertises MSC4186
		lc := allList
		lc.Filters = &slidingsync.ListFilters{Spaces: []string{"!space:x"}}
		conn, err := slidingsync.New(srv.NewClient(), slidingsync.Config{Lists: map[string]slidingsync.List{"spaces": {ListConfig: lc}}})
		require.NoError(t, err, "the dialect is not known before discovery")
		err = conn.Run(context.Background())
		require.Error(t, err)
		assert.Contains(t, err.Error(), "Filters.Spaces")
		assert.Empty(t, srv.Requests(), "no sync request was sent")

		h := start(t, slidingsync.ProtocolMSC4186, slidingsync.Config{})
		err = h.conn.SetList("spaces", slidingsync.List{ListConfig: lc})
		require.Error(t, err)
		assert.Contains(t, err.Error(), "msc4186")
		h.srv.Push(roomResp("p1"))
		h.run()
		reqs, err := h.srv.WaitRequests(context.Background(), 1)
		require.NoError(t, err)
		require.ErrorIs(t, h.stop(t), context.Canceled)
		assert.NotContains(t, reqs[0].Parsed.Lists, "spaces", "a refused list changes nothing")
	})
}

func TestListWithoutRangesGetsEveryRoomFromSynapse(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		// Synapse sends no room for a list without ranges, and echoes the requested range in
		// its SYNC op, however far past the list it reaches.
		lc := allList
		lc.Ranges = nil
		h := start(t, slidingsync.ProtocolMSC4186, slidingsync.Config{Lists: map[string]slidingsync.List{"all": {ListConfig: lc}}})
		h.srv.PushJSON(http.StatusOK, fmt.Sprintf(`{"pos":"p1","lists":{"all":{"count":2,"ops":[{"op":"SYNC","range":[0,%d],"room_ids":["!a:x","!b:x"]}]}},
			"rooms":{"!a:x":{"initial":true},"!b:x":{"initial":true}},"extensions":{}}`, (1<<18)-1))
		h.run()
		reqs, err := h.srv.WaitRequests(context.Background(), 2)
		require.NoError(t, err)
		synctest.Wait()
		require.ErrorIs(t, h.stop(t), context.Canceled)
		assert.Equal(t, []slidingsync.Range{{Start: 0, End: (1 << 18) - 1}}, reqs[0].Parsed.Lists["all"].Ranges)
		ls, ok := h.conn.List("all")
		require.True(t, ok, "the echoed range is accepted")
		assert.Equal(t, []id.RoomID{"!a:x", "!b:x"}, ls.Rooms)
		assert.Equal(t, "p1", reqs[1].Parsed.Pos)
	})
}

func TestSynapseRoomThatStopsBeingADMLosesIsDM(t *testing.T) {
	for _, tc := range []struct {
		proto  slidingsync.Protocol
		wantDM bool
	}{
		{slidingsync.ProtocolMSC4186, false}, // Synapse: is_dm only when true, on every entry
		{slidingsync.ProtocolMSC3575, true},  // absent means unchanged
	} {
		t.Run(tc.proto.String(), func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				h := start(t, tc.proto, slidingsync.Config{})
				h.srv.PushJSON(http.StatusOK, `{"pos":"p1","rooms":{"!dm:x":{"initial":true,"is_dm":true}}}`)
				h.srv.PushJSON(http.StatusOK, `{"pos":"p2","rooms":{"!dm:x":{"timeline":[]}}}`)
				h.run()
				_, err := h.srv.WaitRequests(context.Background(), 3)
				require.NoError(t, err)
				synctest.Wait()
				require.ErrorIs(t, h.stop(t), context.Canceled)
				rs, ok := h.conn.Room("!dm:x")
				require.True(t, ok)
				assert.Equal(t, tc.wantDM, rs.IsDM)
			})
		})
	}
}

func TestExplicitMSC3575TakesTheProxyFromWellKnown(t *testing.T) {
	for _, tc := range []struct {
		name     string
		proxyURL string
		wantHost string
	}{
		{"named by .well-known", "https://proxy.invalid", "proxy.invalid"},
		{"none named: the homeserver serves it", "", "slidingsynctest.invalid"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				// One in-process server answers for both hosts; the recorded Host shows which
				// one the client used.
				srv := slidingsynctest.NewServer(slidingsynctest.Options{Protocol: slidingsync.ProtocolMSC3575, ProxyURL: tc.proxyURL})
				h := startWith(t, srv, srv.NewClient(), slidingsync.ProtocolMSC3575, slidingsync.Config{})
				srv.Push(roomResp("p1", "!a:x"))
				h.run()
				reqs, err := srv.WaitRequests(context.Background(), 1)
				require.NoError(t, err)
				synctest.Wait()
				require.ErrorIs(t, h.stop(t), context.Canceled)
				assert.Equal(t, tc.wantHost, reqs[0].Host)
			})
		})
	}
}

func TestServerCappingLongPollsIsNotBackedOff(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		// A server (or a reverse proxy in front of it) that ends every long-poll after 2 s
		// with the same pos: the client asks again at once each time.
		srv := slidingsynctest.NewServer(slidingsynctest.Options{})
		cli := srv.NewClient()
		tr := &synapseIdle{next: cli.Client.Transport, news: make(chan string), capPoll: 2 * time.Second}
		cli.Client = &http.Client{Transport: tr}
		h := startWith(t, srv, cli, slidingsync.ProtocolMSC4186, slidingsync.Config{})
		srv.Push(roomResp("p1", "!a:x"))
		start := time.Now()
		h.run()
		time.Sleep(20*time.Second + time.Second)
		synctest.Wait()
		require.ErrorIs(t, h.stop(t), context.Canceled)
		reqs := tr.requests()
		require.GreaterOrEqual(t, len(reqs), 11)
		for i, r := range reqs[1:11] {
			assert.Equal(t, time.Duration(i)*2*time.Second, r.at.Sub(start), "request %d follows the previous answer at once", i+1)
		}
	})
}
