package slidingsync_test

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"slices"
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
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/sliding-e2ee/sdk/slidingsync"
	"github.com/sliding-e2ee/sdk/slidingsync/slidingsynctest"
)

// Every dialect.
var allProtocols = []slidingsync.Protocol{slidingsync.ProtocolMSC4186, slidingsync.ProtocolMSC3575, slidingsync.ProtocolV4}

// What the zero values of Config mean, as documented.
const (
	zeroPollTimeout   = 30 * time.Second
	zeroTimeoutMargin = 15 * time.Second
	zeroMinBackoff    = time.Second
	zeroMaxBackoff    = 30 * time.Second
)

// recordingExt is a test extension that records what the loop asks of it. Its cursor lives in
// its checkpoint, which the Conn keeps for it.
type recordingExt struct {
	mu        sync.Mutex
	requests  []slidingsync.RequestInfo
	processed []json.RawMessage
	failNext  int
	// afterCommits records the cursor of each Step whose After ran: only committed cursors
	// appear.
	afterCommits []string
}

func (e *recordingExt) Name() string { return "test_ext" }

func (e *recordingExt) WireKey(slidingsync.Protocol) string { return "test_ext" }

func cursorOf(info slidingsync.RequestInfo) string {
	var cursor string
	if info.Checkpoint != nil {
		_ = json.Unmarshal(info.Checkpoint, &cursor)
	}
	return cursor
}

func (e *recordingExt) Request(_ context.Context, info slidingsync.RequestInfo) (any, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.requests = append(e.requests, info)
	return map[string]any{"enabled": true, "since": cursorOf(info)}, nil
}

func (e *recordingExt) Process(_ context.Context, info slidingsync.RequestInfo, raw json.RawMessage) (slidingsync.Step, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.processed = append(e.processed, raw)
	if e.failNext > 0 {
		e.failNext--
		return slidingsync.Step{}, errors.New("extension failure")
	}
	cursor := cursorOf(info)
	var step slidingsync.Step
	if raw != nil {
		var body struct {
			NextBatch string `json:"next_batch"`
			More      bool   `json:"more"`
		}
		if err := json.Unmarshal(raw, &body); err != nil {
			return step, err
		}
		cursor = body.NextBatch
		step.Checkpoint, _ = json.Marshal(cursor)
		step.More = body.More
	}
	step.Stalled = cursor == "stuck"
	step.After = func(context.Context) {
		e.mu.Lock()
		defer e.mu.Unlock()
		e.afterCommits = append(e.afterCommits, cursor)
	}
	return step, nil
}

// snapshot returns the requests the extension saw, how many of them started afresh (no pos)
// after the first, and the last committed cursor.
func (e *recordingExt) snapshot() (reqs []slidingsync.RequestInfo, resets int, cursor string) {
	e.mu.Lock()
	defer e.mu.Unlock()
	for i, info := range e.requests {
		if i > 0 && info.Pos == "" {
			resets++
		}
	}
	if n := len(e.afterCommits); n > 0 {
		cursor = e.afterCommits[n-1]
	}
	return append([]slidingsync.RequestInfo(nil), e.requests...), resets, cursor
}

var allList = slidingsync.ListConfig{
	Ranges:        []slidingsync.Range{{Start: 0, End: 9}},
	TimelineLimit: 1,
	RequiredState: slidingsync.RequiredState{Include: []slidingsync.StateFilter{{Type: "m.room.encryption", StateKey: ""}}},
}

type harness struct {
	srv    *slidingsynctest.Server
	conn   *slidingsync.Conn
	cancel context.CancelFunc
	done   chan error
	// run starts Run in a goroutine; tests queue the first answers before calling it, so
	// that the first request (which does not wait) finds them.
	run func()
}

// start prepares a Conn against a fresh fake server in the current synctest bubble.
func start(t *testing.T, proto slidingsync.Protocol, cfg slidingsync.Config) *harness {
	t.Helper()
	srv := slidingsynctest.NewServer(slidingsynctest.Options{Protocol: proto})
	return startWith(t, srv, srv.NewClient(), proto, cfg)
}

func startWith(t *testing.T, srv *slidingsynctest.Server, cli *mautrix.Client, proto slidingsync.Protocol, cfg slidingsync.Config) *harness {
	t.Helper()
	cfg.Protocol = proto
	if cfg.Lists == nil {
		cfg.Lists = map[string]slidingsync.List{"all": {ListConfig: allList}}
	}
	conn, err := slidingsync.New(cli, cfg)
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	h := &harness{srv: srv, conn: conn, cancel: cancel, done: make(chan error, 1)}
	h.run = func() { go func() { h.done <- conn.Run(ctx) }() }
	return h
}

// stop cancels Run and returns its error. synctest.Test itself fails if any goroutine the
// loop started is still alive when the bubble ends.
func (h *harness) stop(t *testing.T) error {
	t.Helper()
	h.cancel()
	return <-h.done
}

func roomResp(pos string, rooms ...id.RoomID) *slidingsync.Response {
	resp := &slidingsync.Response{Pos: pos, Rooms: map[id.RoomID]*slidingsync.RoomResponse{}}
	for _, r := range rooms {
		resp.Rooms[r] = &slidingsync.RoomResponse{Initial: true, Name: slidingsync.Some("room " + string(r))}
	}
	return resp
}

func TestRunSendsCompleteRequestsAndTimeouts(t *testing.T) {
	for _, proto := range allProtocols {
		t.Run(proto.String(), func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				ext := &recordingExt{}
				h := start(t, proto, slidingsync.Config{Extensions: []slidingsync.Extension{ext}, PollTimeout: 20 * time.Second})
				h.srv.Push(roomResp("p1", "!a:x"))
				h.srv.Push(roomResp("p2", "!b:x"))
				h.srv.Push(roomResp("p3"))
				h.run()
				reqs, err := h.srv.WaitRequests(context.Background(), 4)
				require.NoError(t, err)
				synctest.Wait()
				require.ErrorIs(t, h.stop(t), context.Canceled)

				wantPos := []string{"", "p1", "p2", "p3"}
				wantTimeout := []int64{0, 20000, 20000, 20000}
				for i, rr := range reqs[:4] {
					require.NoError(t, rr.ParseErr, "request %d", i)
					assert.Equal(t, proto.Path(), rr.Path)
					assert.Equal(t, wantPos[i], rr.Parsed.Pos, "request %d pos", i)
					require.NotNil(t, rr.Parsed.Timeout, "request %d timeout", i)
					assert.Equal(t, wantTimeout[i], *rr.Parsed.Timeout, "request %d timeout", i)
					// The client keeps stickiness: every request carries the whole configuration.
					require.Contains(t, rr.Parsed.Lists, "all", "request %d", i)
					assert.Equal(t, allList.TimelineLimit, rr.Parsed.Lists["all"].TimelineLimit)
					assert.Equal(t, allList.RequiredState.Include, rr.Parsed.Lists["all"].RequiredState.Include)
					assert.Contains(t, rr.Parsed.Extensions, "test_ext", "request %d", i)
					if proto != slidingsync.ProtocolV4 {
						assert.Equal(t, wantPos[i], rr.Query.Get("pos"))
					} else {
						assert.Empty(t, rr.Query.Get("pos"))
					}
				}
				assert.Equal(t, "p3", h.conn.Pos())
				room, ok := h.conn.Room("!b:x")
				require.True(t, ok)
				assert.Equal(t, "room !b:x", room.Name)
				assert.Equal(t, 1, h.srv.MaxInFlight(), "exactly one request in flight")
			})
		})
	}
}

func TestRunOnlyOnce(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := start(t, slidingsync.ProtocolMSC4186, slidingsync.Config{})
		h.run()
		_, err := h.srv.WaitRequests(context.Background(), 1)
		require.NoError(t, err)
		assert.ErrorIs(t, h.conn.Run(context.Background()), slidingsync.ErrAlreadyRunning)
		require.ErrorIs(t, h.stop(t), context.Canceled)
	})
}

// blockingTransport holds responses until released, so a test can change the configuration
// between the server answering and the client reading the answer.
type blockingTransport struct {
	inner   http.RoundTripper
	arrived chan struct{}
	release chan struct{}
}

func (b *blockingTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	resp, err := b.inner.RoundTrip(req)
	if req.URL.Path == slidingsync.ProtocolMSC4186.Path() {
		b.arrived <- struct{}{}
		<-b.release
	}
	return resp, err
}

func TestConfigChangeDiscardsInFlightResponse(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		srv := slidingsynctest.NewServer(slidingsynctest.Options{})
		cli := srv.NewClient()
		bt := &blockingTransport{inner: cli.Client.Transport, arrived: make(chan struct{}), release: make(chan struct{})}
		cli.Client = &http.Client{Transport: bt}
		h := startWith(t, srv, cli, slidingsync.ProtocolMSC4186, slidingsync.Config{})

		srv.Push(roomResp("p1", "!first:x"))
		h.run()
		<-bt.arrived
		bt.release <- struct{}{}
		synctest.Wait()
		require.Equal(t, "p1", h.conn.Pos())

		// The server answers the long-poll, but the list changes before the answer is read.
		srv.Push(roomResp("p2", "!stale:x"))
		<-bt.arrived
		h.conn.SetList("dms", slidingsync.List{ListConfig: slidingsync.ListConfig{Ranges: []slidingsync.Range{{Start: 0, End: 4}}}})
		srv.Push(roomResp("p3", "!fresh:x"))
		bt.release <- struct{}{}
		// The next request carries the new list, the old pos, and does not long-poll.
		<-bt.arrived
		assert.Equal(t, "p1", h.conn.Pos(), "the response of a cancelled request is never processed")
		_, ok := h.conn.Room("!stale:x")
		assert.False(t, ok)
		bt.release <- struct{}{}
		synctest.Wait()
		reqs := srv.Requests()
		require.Len(t, reqs, 4)
		third := reqs[2].Parsed
		assert.Equal(t, "p1", third.Pos)
		assert.Contains(t, third.Lists, "dms")
		assert.Equal(t, int64(0), *third.Timeout)
		assert.Equal(t, "p3", h.conn.Pos())
		_, ok = h.conn.Room("!stale:x")
		assert.False(t, ok)

		go func() {
			for range bt.arrived {
				bt.release <- struct{}{}
			}
		}()
		require.ErrorIs(t, h.stop(t), context.Canceled)
		close(bt.arrived)
	})
}

func TestConfigChangeCancelsLongPoll(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := start(t, slidingsync.ProtocolMSC4186, slidingsync.Config{PollTimeout: time.Minute})
		h.srv.Push(roomResp("p1"))
		h.run()
		_, err := h.srv.WaitRequests(context.Background(), 2)
		require.NoError(t, err)
		synctest.Wait()
		require.Equal(t, 1, h.srv.InFlight(), "second request is long-polling")
		began := time.Now()
		h.conn.Subscribe("!sub:x", slidingsync.RoomSubscription{TimelineLimit: 5})
		reqs, err := h.srv.WaitRequests(context.Background(), 3)
		require.NoError(t, err)
		assert.Equal(t, began, time.Now(), "the change cancels the poll at once")
		assert.False(t, reqs[1].Answered, "the cancelled request got no answer")
		assert.Contains(t, reqs[2].Parsed.RoomSubscriptions, id.RoomID("!sub:x"))
		synctest.Wait()
		assert.Equal(t, 1, h.srv.MaxInFlight())
		require.ErrorIs(t, h.stop(t), context.Canceled)
	})
}

func TestUnknownPosResetsConnection(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ext := &recordingExt{}
		h := start(t, slidingsync.ProtocolMSC4186, slidingsync.Config{Extensions: []slidingsync.Extension{ext}})
		h.srv.Push(roomResp("p1", "!a:x"))
		h.srv.PushError(slidingsync.MUnknownPos.WithMessage("Unknown position"))
		h.srv.Push(roomResp("fresh1"))
		h.run()
		reqs, err := h.srv.WaitRequests(context.Background(), 4)
		require.NoError(t, err)
		synctest.Wait()
		require.ErrorIs(t, h.stop(t), context.Canceled)

		assert.Equal(t, "p1", reqs[1].Parsed.Pos)
		assert.Empty(t, reqs[2].Parsed.Pos, "after M_UNKNOWN_POS the request goes out without pos")
		assert.Equal(t, int64(0), *reqs[2].Parsed.Timeout, "and does not long-poll")
		assert.Equal(t, "fresh1", reqs[3].Parsed.Pos)
		extReqs, resets, _ := ext.snapshot()
		assert.Equal(t, 1, resets)
		assert.Empty(t, extReqs[2].Pos, "extensions are told the request has no pos")
		_, ok := h.conn.Room("!a:x")
		assert.True(t, ok, "room state survives a reset")
	})
}

func TestBadRequestWithoutUnknownPosIsFatal(t *testing.T) {
	// A 400 is M_UNKNOWN_POS only when the errcode says so.
	synctest.Test(t, func(t *testing.T) {
		h := start(t, slidingsync.ProtocolMSC3575, slidingsync.Config{})
		h.srv.PushJSON(http.StatusBadRequest, `{"error":"HTTP 400 : invalid pos: abc"}`)
		h.run()
		err := <-h.done
		require.Error(t, err)
		assert.NotErrorIs(t, err, slidingsync.MUnknownPos)
		assert.Len(t, h.srv.Requests(), 1, "no retry")
		h.cancel()
	})
}

func TestUnknownTokenIsFatal(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := start(t, slidingsync.ProtocolMSC4186, slidingsync.Config{})
		h.srv.PushError(mautrix.MUnknownToken.WithMessage("Invalid access token"))
		h.run()
		err := <-h.done
		require.ErrorIs(t, err, mautrix.MUnknownToken)
		assert.Len(t, h.srv.Requests(), 1)
		h.cancel()
	})
}

func TestRateLimitWaitsRetryAfter(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := start(t, slidingsync.ProtocolMSC4186, slidingsync.Config{})
		h.srv.PushError(mautrix.MLimitExceeded.WithMessage("slow down").WithExtraField("retry_after_ms", 1500))
		h.srv.Push(roomResp("p1"))
		h.run()
		reqs, err := h.srv.WaitRequests(context.Background(), 2)
		require.NoError(t, err)
		assert.Equal(t, 1500*time.Millisecond, reqs[1].Received.Sub(reqs[0].Received))
		synctest.Wait()
		assert.Equal(t, "p1", h.conn.Pos())
		require.ErrorIs(t, h.stop(t), context.Canceled)
	})
}

func TestBackoffScheduleOnServerErrors(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const failures = 9
		h := start(t, slidingsync.ProtocolMSC4186, slidingsync.Config{})
		for range failures {
			h.srv.PushError(mautrix.MUnknown.WithStatus(http.StatusBadGateway).WithMessage("bad gateway"))
		}
		h.srv.Push(roomResp("p1"))
		h.run()
		reqs, err := h.srv.WaitRequests(context.Background(), failures+1)
		require.NoError(t, err)
		synctest.Wait()
		assert.Equal(t, "p1", h.conn.Pos(), "converges when the server recovers")
		require.ErrorIs(t, h.stop(t), context.Canceled)

		ceiling := zeroMinBackoff
		var total time.Duration
		for i := 1; i <= failures; i++ {
			gap := reqs[i].Received.Sub(reqs[i-1].Received)
			assert.GreaterOrEqual(t, gap, ceiling/2, "gap %d", i)
			assert.LessOrEqual(t, gap, ceiling, "gap %d", i)
			total += gap
			ceiling = min(ceiling*2, zeroMaxBackoff)
		}
		assert.Equal(t, zeroMaxBackoff, ceiling, "the schedule reached its cap")
		// At the cap an outage costs at most a few requests a minute.
		assert.GreaterOrEqual(t, reqs[failures].Received.Sub(reqs[failures-1].Received), zeroMaxBackoff/2)
	})
}

func TestUndecodableResponseIsRetriedWithoutStateChange(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ext := &recordingExt{}
		h := start(t, slidingsync.ProtocolMSC4186, slidingsync.Config{Extensions: []slidingsync.Extension{ext}})
		h.srv.Push(roomResp("p1", "!a:x"))
		h.srv.PushJSON(http.StatusOK, `{"pos":"p2","rooms":{"!a:x":{"name":42}}}`)
		h.srv.PushJSON(http.StatusOK, `{"pos":"p2","lists":{"all":{"ops":[{"op":"INSERT"}]}}}`)
		h.srv.PushJSON(http.StatusOK, `{"pos":"p2","rooms":`)
		h.srv.Push(roomResp("p2"))
		h.run()
		reqs, err := h.srv.WaitRequests(context.Background(), 6)
		require.NoError(t, err)
		synctest.Wait()
		require.ErrorIs(t, h.stop(t), context.Canceled)
		for i := 1; i <= 4; i++ {
			assert.Equal(t, "p1", reqs[i].Parsed.Pos, "request %d retries the last processed pos", i)
		}
		room, _ := h.conn.Room("!a:x")
		assert.Equal(t, "room !a:x", room.Name)
		assert.Greater(t, reqs[3].Received.Sub(reqs[2].Received), time.Duration(0), "backs off")
	})
}

func TestFailedCycleCommitsNothing(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		store := slidingsync.NewMemoryStore()
		ext := &recordingExt{failNext: 1}
		handlerFails := 1
		h := start(t, slidingsync.ProtocolMSC4186, slidingsync.Config{
			Store:      store,
			Extensions: []slidingsync.Extension{ext},
			OnResponse: func(_ context.Context, res *slidingsync.Result) (slidingsync.Step, error) {
				if res.Response.Pos == "p2" && handlerFails > 0 {
					handlerFails--
					return slidingsync.Step{}, errors.New("handler failure")
				}
				return slidingsync.Step{}, nil
			},
		})
		h.srv.PushJSON(http.StatusOK, `{"pos":"p1","extensions":{"test_ext":{"next_batch":"c1"}}}`)
		h.srv.PushJSON(http.StatusOK, `{"pos":"p1","extensions":{"test_ext":{"next_batch":"c1"}}}`)
		h.srv.PushJSON(http.StatusOK, `{"pos":"p2","extensions":{"test_ext":{"next_batch":"c2"}}}`)
		h.srv.PushJSON(http.StatusOK, `{"pos":"p2","extensions":{"test_ext":{"next_batch":"c2"}}}`)
		h.run()
		reqs, err := h.srv.WaitRequests(context.Background(), 5)
		require.NoError(t, err)
		synctest.Wait()
		require.ErrorIs(t, h.stop(t), context.Canceled)

		// Extension failure on the first p1: nothing committed, cursor restored to the last commit.
		assert.Empty(t, reqs[1].Parsed.Pos)
		assert.JSONEq(t, `{"enabled":true,"since":""}`, string(reqs[1].Parsed.Extensions["test_ext"]))
		// Handler failure on the first p2: the extension's cursor rolls back to c1.
		assert.Equal(t, "p1", reqs[3].Parsed.Pos)
		assert.JSONEq(t, `{"enabled":true,"since":"c1"}`, string(reqs[3].Parsed.Extensions["test_ext"]))
		assert.JSONEq(t, `{"enabled":true,"since":"c2"}`, string(reqs[4].Parsed.Extensions["test_ext"]))

		cp, err := store.Load(context.Background(), h.conn.Key())
		require.NoError(t, err)
		assert.Equal(t, "p2", cp.Pos)
		assert.JSONEq(t, `"c2"`, string(cp.Extensions["test_ext"]))
		ext.mu.Lock()
		assert.Equal(t, []string{"c1", "c2"}, ext.afterCommits, "After runs only after successful commits")
		ext.mu.Unlock()
	})
}

func TestRestartResumesFromStore(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		store := slidingsync.NewMemoryStore()
		srv := slidingsynctest.NewServer(slidingsynctest.Options{})
		ext1 := &recordingExt{}
		h := startWith(t, srv, srv.NewClient(), slidingsync.ProtocolMSC4186, slidingsync.Config{Store: store, Extensions: []slidingsync.Extension{ext1}})
		srv.PushJSON(http.StatusOK, `{"pos":"p1","rooms":{"!a:x":{"initial":true,"name":"A"}},"lists":{"all":{"count":1,"ops":[{"op":"SYNC","range":[0,0],"room_ids":["!a:x"]}]}},"extensions":{"test_ext":{"next_batch":"c1"}}}`)
		h.run()
		_, err := srv.WaitRequests(context.Background(), 2)
		require.NoError(t, err)
		synctest.Wait()
		require.ErrorIs(t, h.stop(t), context.Canceled)

		ext2 := &recordingExt{}
		h2 := startWith(t, srv, srv.NewClient(), slidingsync.ProtocolMSC4186, slidingsync.Config{Store: store, Extensions: []slidingsync.Extension{ext2}})
		h2.run()
		reqs, err := srv.WaitRequests(context.Background(), 3)
		require.NoError(t, err)
		synctest.Wait()
		assert.Equal(t, "p1", reqs[2].Parsed.Pos, "a restart resumes from the stored pos")
		assert.Equal(t, int64(0), *reqs[2].Parsed.Timeout, "the first request of a run does not wait")
		assert.JSONEq(t, `{"enabled":true,"since":"c1"}`, string(reqs[2].Parsed.Extensions["test_ext"]))
		room, ok := h2.conn.Room("!a:x")
		require.True(t, ok)
		assert.Equal(t, "A", room.Name)
		ls, ok := h2.conn.List("all")
		require.True(t, ok)
		assert.Equal(t, []id.RoomID{"!a:x"}, ls.Rooms)
		require.ErrorIs(t, h2.stop(t), context.Canceled)
	})
}

func TestMorePendingSkipsLongPoll(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ext := &recordingExt{}
		h := start(t, slidingsync.ProtocolMSC4186, slidingsync.Config{Extensions: []slidingsync.Extension{ext}, PollTimeout: 10 * time.Second})
		h.srv.PushJSON(http.StatusOK, `{"pos":"p1","extensions":{"test_ext":{"next_batch":"c1","more":true}}}`)
		h.srv.PushJSON(http.StatusOK, `{"pos":"p2","extensions":{"test_ext":{"next_batch":"c2"}}}`)
		h.run()
		reqs, err := h.srv.WaitRequests(context.Background(), 3)
		require.NoError(t, err)
		synctest.Wait()
		require.ErrorIs(t, h.stop(t), context.Canceled)
		assert.Equal(t, int64(0), *reqs[1].Parsed.Timeout, "more data pending: no long-poll")
		assert.Equal(t, int64(10000), *reqs[2].Parsed.Timeout)
	})
}

func TestHTTPTimeoutExceedsPollTimeout(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		// A server that never answers is abandoned only after the poll timeout plus the margin,
		// then the loop backs off and retries.
		srv := slidingsynctest.NewServer(slidingsynctest.Options{})
		cli := srv.NewClient()
		silent := &silentTransport{inner: cli.Client.Transport, passFirst: 1}
		cli.Client = &http.Client{Transport: silent}
		h := startWith(t, srv, cli, slidingsync.ProtocolMSC4186, slidingsync.Config{PollTimeout: 10 * time.Second, TimeoutMargin: 5 * time.Second})
		srv.Push(roomResp("p1"))
		h.run()
		for silent.callCount() < 3 {
			time.Sleep(time.Second)
		}
		calls := silent.callTimes()
		gap := calls[2].Sub(calls[1])
		assert.GreaterOrEqual(t, gap, 15*time.Second+zeroMinBackoff/2, "poll timeout + margin, then backoff")
		assert.LessOrEqual(t, gap, 15*time.Second+zeroMinBackoff)
		require.ErrorIs(t, h.stop(t), context.Canceled)
	})
}

// silentTransport passes the first requests through and then never answers, as a server that
// hangs would.
type silentTransport struct {
	inner     http.RoundTripper
	passFirst int
	mu        sync.Mutex
	calls     []time.Time
}

func (s *silentTransport) callCount() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.calls)
}

func (s *silentTransport) callTimes() []time.Time {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]time.Time(nil), s.calls...)
}

func (s *silentTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	s.mu.Lock()
	s.calls = append(s.calls, time.Now())
	n := len(s.calls)
	s.mu.Unlock()
	if n <= s.passFirst {
		return s.inner.RoundTrip(req)
	}
	<-req.Context().Done()
	return nil, req.Context().Err()
}

func TestNewRejectsBadConfig(t *testing.T) {
	srv := slidingsynctest.NewServer(slidingsynctest.Options{})
	cli := srv.NewClient()
	_, err := slidingsync.New(cli, slidingsync.Config{ConnID: "this-conn-id-is-too-long"})
	assert.Error(t, err)
	ext := &recordingExt{}
	_, err = slidingsync.New(cli, slidingsync.Config{Extensions: []slidingsync.Extension{ext, ext}})
	assert.Error(t, err)
	_, err = slidingsync.New(cli, slidingsync.Config{Protocol: slidingsync.ProtocolMSC4186, Lists: map[string]slidingsync.List{
		"x": {ListConfig: slidingsync.ListConfig{RequiredState: slidingsync.RequiredState{Exclude: []slidingsync.StateFilter{{Type: "m.room.member"}}}}},
	}})
	assert.Error(t, err, "exclusions need the v4 dialect")
	_, err = slidingsync.New(cli, slidingsync.Config{Protocol: "v5"})
	assert.Error(t, err)
	_, err = slidingsync.New(nil, slidingsync.Config{})
	assert.Error(t, err)
}

func TestGrowingWindowCoversEveryRoom(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const total = 23
		srv := slidingsynctest.NewServer(slidingsynctest.Options{})
		served := -1
		srv.SetResponder(func(req *slidingsync.Request) *slidingsync.Response {
			lc := req.Lists["all"]
			if len(lc.Ranges) != 1 || lc.Ranges[0].End <= served {
				return nil // nothing new: long-poll
			}
			served = lc.Ranges[0].End
			return rangesResp(total, lc.Ranges)
		})
		h := startWith(t, srv, srv.NewClient(), slidingsync.ProtocolMSC4186, slidingsync.Config{
			Lists: map[string]slidingsync.List{"all": {Window: slidingsync.Grow(10), ListConfig: slidingsync.ListConfig{TimelineLimit: 1}}},
		})
		h.run()
		for i := 0; ; i++ {
			if ls, ok := h.conn.List("all"); ok && len(ls.Rooms) == total {
				break
			}
			require.Less(t, i, 100, "the window never covered every room")
			time.Sleep(time.Second)
		}
		require.ErrorIs(t, h.stop(t), context.Canceled)
		reqs := srv.Requests()
		require.GreaterOrEqual(t, len(reqs), 3)
		assert.Equal(t, []slidingsync.Range{{Start: 0, End: 9}}, reqs[0].Parsed.Lists["all"].Ranges)
		assert.Equal(t, []slidingsync.Range{{Start: 0, End: 19}}, reqs[1].Parsed.Lists["all"].Ranges)
		assert.Equal(t, []slidingsync.Range{{Start: 0, End: 22}}, reqs[2].Parsed.Lists["all"].Ranges)
		for i := range 3 {
			assert.Equal(t, int64(0), *reqs[i].Parsed.Timeout, "no long-poll while growing (request %d)", i)
		}
		assert.Len(t, h.conn.Rooms(), total)
	})
}

// rangesResp answers list "all" of total rooms (!r0:x, !r1:x, ...) with every room of the
// ranges and one SYNC op per range, as Synapse does.
func rangesResp(total int, ranges []slidingsync.Range) *slidingsync.Response {
	resp := roomResp("")
	lr := slidingsync.ListResponse{Count: slidingsync.Some(total)}
	for _, r := range ranges {
		end := min(r.End, total-1)
		var ids []id.RoomID
		for i := r.Start; i <= end; i++ {
			roomID := id.RoomID("!r" + strconv.Itoa(i) + ":x")
			ids = append(ids, roomID)
			resp.Rooms[roomID] = &slidingsync.RoomResponse{Initial: true, Name: slidingsync.Some("room " + string(roomID))}
		}
		lr.Ops = append(lr.Ops, slidingsync.ListOp{Op: slidingsync.ListOpSync, Range: &slidingsync.Range{Start: r.Start, End: end}, RoomIDs: ids})
	}
	resp.Lists = map[string]slidingsync.ListResponse{"all": lr}
	return resp
}

// With a Scan window, the Conn scans the list (the head plus a range moving down by the batch,
// each reaching back batch/20 rooms) instead of growing one window, then keeps
// only the head: later requests ask for it alone, the list keeps only those positions, and
// every room stays known. The v4 dialect (one range per list) grows one window instead.
func TestGrownWindowShrinks(t *testing.T) {
	for _, tc := range []struct {
		proto slidingsync.Protocol
		want  [][]slidingsync.Range
	}{
		{slidingsync.ProtocolMSC4186, [][]slidingsync.Range{{{0, 39}}, {{0, 4}, {38, 79}}, {{0, 4}, {78, 91}}, {{0, 4}}}},
		{slidingsync.ProtocolMSC3575, [][]slidingsync.Range{{{0, 39}}, {{0, 4}, {38, 79}}, {{0, 4}, {78, 91}}, {{0, 4}}}},
		{slidingsync.ProtocolV4, [][]slidingsync.Range{{{0, 39}}, {{0, 79}}, {{0, 91}}, {{0, 4}}}},
	} {
		t.Run(tc.proto.String(), func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				const total = 92
				srv := slidingsynctest.NewServer(slidingsynctest.Options{Protocol: tc.proto})
				var served [][]slidingsync.Range
				srv.SetResponder(func(req *slidingsync.Request) *slidingsync.Response {
					rs := req.Lists["all"].Ranges
					if len(served) > 0 && slices.Equal(served[len(served)-1], rs) {
						return nil // nothing new: long-poll
					}
					served = append(served, rs)
					return rangesResp(total, rs)
				})
				h := startWith(t, srv, srv.NewClient(), tc.proto, slidingsync.Config{
					Lists: map[string]slidingsync.List{"all": {Window: slidingsync.Scan(40, 5), ListConfig: slidingsync.ListConfig{TimelineLimit: 1}}},
				})
				h.run()
				time.Sleep(time.Minute)
				synctest.Wait()
				require.ErrorIs(t, h.stop(t), context.Canceled)
				reqs := srv.Requests()
				var got [][]slidingsync.Range
				for _, r := range reqs {
					got = append(got, r.Parsed.Lists["all"].Ranges)
				}
				assert.Equal(t, tc.want, got[:min(len(tc.want), len(got))])
				for _, r := range got[min(len(tc.want), len(got)):] {
					assert.Equal(t, []slidingsync.Range{{Start: 0, End: 4}}, r, "the window stays small")
				}
				for i := range len(tc.want) - 1 {
					assert.Equal(t, int64(0), *reqs[i].Parsed.Timeout, "no long-poll while rooms are unseen (request %d)", i)
				}
				ls, _ := h.conn.List("all")
				assert.Equal(t, total, ls.Count)
				assert.Equal(t, []id.RoomID{"!r0:x", "!r1:x", "!r2:x", "!r3:x", "!r4:x"}, ls.Rooms)
				assert.Len(t, h.conn.Rooms(), total, "every room stays known")
			})
		})
	}
}

func TestStalledExtensionBacksOff(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ext := &recordingExt{}
		h := start(t, slidingsync.ProtocolMSC4186, slidingsync.Config{Extensions: []slidingsync.Extension{ext}})
		for i := range 4 {
			h.srv.PushJSON(http.StatusOK, `{"pos":"p`+strconv.Itoa(i+1)+`","extensions":{"test_ext":{"next_batch":"stuck"}}}`)
		}
		h.srv.PushJSON(http.StatusOK, `{"pos":"p5","extensions":{"test_ext":{"next_batch":"moving"}}}`)
		h.srv.PushJSON(http.StatusOK, `{"pos":"p6","extensions":{"test_ext":{"next_batch":"moving2"}}}`)
		h.run()
		reqs, err := h.srv.WaitRequests(context.Background(), 7)
		require.NoError(t, err)
		synctest.Wait()
		require.ErrorIs(t, h.stop(t), context.Canceled)
		assert.Equal(t, ext.requests[0].Key, h.conn.Key(), "extensions see the connection's key")
		for i := 1; i <= 4; i++ {
			gap := reqs[i].Received.Sub(reqs[i-1].Received)
			ceiling := zeroMinBackoff << (i - 1)
			assert.GreaterOrEqual(t, gap, ceiling/2, "gap %d", i)
			assert.LessOrEqual(t, gap, ceiling, "gap %d", i)
		}
		assert.Zero(t, reqs[5].Received.Sub(reqs[4].Received), "no backoff once the cursor moves")
		assert.Zero(t, reqs[6].Received.Sub(reqs[5].Received))
	})
}

func TestPlainHTTPToRemoteHostIsRefused(t *testing.T) {
	for _, tc := range []struct {
		name, homeserver, proxy string
		allow                   bool
		refused                 bool
	}{
		// A remote plain-HTTP homeserver is refused by New already (TestNewRefusesPlainHTTPToRemoteHomeserver).
		{name: "remote homeserver allowed", homeserver: "http://matrix.example.org", allow: true},
		{name: "loopback homeserver", homeserver: "http://127.0.0.1:8008"},
		{name: "localhost homeserver", homeserver: "http://localhost:8008"},
		{name: "ipv6 loopback", homeserver: "http://[::1]:8008"},
		{name: "https homeserver", homeserver: "https://matrix.example.org"},
		{name: "remote proxy from well-known", homeserver: "https://matrix.example.org", proxy: "http://proxy.example.org", refused: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				opts := slidingsynctest.Options{HomeserverURL: tc.homeserver}
				proto := slidingsync.ProtocolMSC4186
				if tc.proxy != "" {
					opts.Protocol, opts.ProxyURL, proto = slidingsync.ProtocolMSC3575, tc.proxy, slidingsync.ProtocolAuto
				}
				srv := slidingsynctest.NewServer(opts)
				h := startWith(t, srv, srv.NewClient(), proto, slidingsync.Config{AllowInsecureHTTP: tc.allow})
				h.run()
				synctest.Wait()
				if tc.refused {
					err := <-h.done
					require.ErrorIs(t, err, slidingsync.ErrInsecureHTTP)
					assert.Empty(t, srv.Requests(), "no sync request, so no token, went out")
					h.cancel()
					return
				}
				assert.NotEmpty(t, srv.Requests())
				require.ErrorIs(t, h.stop(t), context.Canceled)
			})
		})
	}
}

func TestAccessTokenNeverLogged(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const token = "syt_secret_token_that_must_not_leak"
		srv := slidingsynctest.NewServer(slidingsynctest.Options{AccessToken: token})
		var logs strings.Builder
		var mu sync.Mutex
		cli := srv.NewClient()
		cli.Log = zerolog.New(zerolog.SyncWriter(&lockedWriter{w: &logs, mu: &mu})).Level(zerolog.TraceLevel)
		h := startWith(t, srv, cli, slidingsync.ProtocolMSC4186, slidingsync.Config{})
		srv.Push(roomResp("p1", "!a:x"))
		srv.PushError(mautrix.MUnknown.WithStatus(http.StatusBadGateway).WithMessage("bad gateway"))
		srv.PushError(slidingsync.MUnknownPos.WithMessage("Unknown position"))
		srv.PushJSON(http.StatusOK, `{"pos":`)
		srv.Push(roomResp("p2"))
		h.run()
		_, err := srv.WaitRequests(context.Background(), 6)
		require.NoError(t, err)
		synctest.Wait()
		require.ErrorIs(t, h.stop(t), context.Canceled)
		mu.Lock()
		defer mu.Unlock()
		require.NotEmpty(t, logs.String(), "the test must capture real log output")
		assert.Contains(t, logs.String(), "Sync failed, retrying")
		assert.NotContains(t, logs.String(), token)
		assert.NotContains(t, logs.String(), token[4:12], "not even a fragment")
	})
}

type lockedWriter struct {
	w  *strings.Builder
	mu *sync.Mutex
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

func TestUnknownPosStormDoesNotSpin(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := start(t, slidingsync.ProtocolMSC4186, slidingsync.Config{})
		h.srv.Push(roomResp("p1"))
		for range 6 {
			h.srv.PushError(slidingsync.MUnknownPos.WithMessage("Unknown position"))
		}
		h.srv.Push(roomResp("p2"))
		h.run()
		reqs, err := h.srv.WaitRequests(context.Background(), 8)
		require.NoError(t, err)
		synctest.Wait()
		require.ErrorIs(t, h.stop(t), context.Canceled)
		assert.Equal(t, "p1", reqs[1].Parsed.Pos)
		assert.Zero(t, reqs[2].Received.Sub(reqs[1].Received), "the first M_UNKNOWN_POS restarts at once")
		for i := 3; i <= 6; i++ {
			assert.Empty(t, reqs[i].Parsed.Pos)
			assert.Positive(t, reqs[i].Received.Sub(reqs[i-1].Received), "M_UNKNOWN_POS without pos backs off (request %d)", i)
		}
		assert.Equal(t, "p2", h.conn.Pos())
	})
}

func TestRemovedListsAndSubscriptionsAreUndoneOnStickyServers(t *testing.T) {
	// The proxy keeps lists and subscriptions absent from a request, so removing one must be
	// said once; the other dialects just stop sending it.
	for _, proto := range allProtocols {
		t.Run(proto.String(), func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				h := start(t, proto, slidingsync.Config{
					Lists:             map[string]slidingsync.List{"all": {ListConfig: allList}, "dms": {ListConfig: allList}},
					RoomSubscriptions: map[id.RoomID]slidingsync.RoomSubscription{"!sub:x": {TimelineLimit: 1}},
				})
				h.srv.Push(roomResp("p1"))
				h.run()
				_, err := h.srv.WaitRequests(context.Background(), 2)
				require.NoError(t, err)
				synctest.Wait()
				h.conn.RemoveList("dms")
				h.conn.Unsubscribe("!sub:x")
				h.srv.Push(roomResp("p2"))
				_, err = h.srv.WaitRequests(context.Background(), 4)
				require.NoError(t, err)
				synctest.Wait()
				require.ErrorIs(t, h.stop(t), context.Canceled)

				// A request built between the two changes is cancelled by the second; the one
				// answered with p2 carries both.
				var removal, after *slidingsynctest.RecordedRequest
				reqs := h.srv.Requests()
				for i := range reqs[2:] {
					rr := &reqs[2+i]
					switch {
					case rr.Parsed.Pos == "p1" && rr.Answered:
						removal = rr
					case rr.Parsed.Pos == "p2" && after == nil:
						after = rr
					}
				}
				require.NotNil(t, removal)
				require.NotNil(t, after)
				assert.Contains(t, removal.Parsed.Lists, "all")
				assert.NotContains(t, removal.Parsed.Lists, "dms")
				assert.NotContains(t, removal.Parsed.RoomSubscriptions, id.RoomID("!sub:x"))
				if proto == slidingsync.ProtocolMSC3575 {
					assert.Equal(t, []string{"dms"}, removal.Parsed.DeletedLists)
					assert.Equal(t, []id.RoomID{"!sub:x"}, removal.Parsed.UnsubscribeRooms)
				} else {
					assert.Empty(t, removal.Parsed.DeletedLists)
					assert.Empty(t, removal.Parsed.UnsubscribeRooms)
				}
				assert.Empty(t, after.Parsed.DeletedLists, "said once, then forgotten")
				assert.Empty(t, after.Parsed.UnsubscribeRooms)
				assert.Equal(t, "p2", after.Parsed.Pos)
			})
		})
	}
}

// With CompactState the state model keeps raw content only, while OnResponse still sees the
// response's decoded events; a restart loads compact state too.
func TestCompactStateOnConnection(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		store := slidingsync.NewMemoryStore()
		var seen []*event.Event
		cfg := slidingsync.Config{Store: store, CompactState: true, OnResponse: func(_ context.Context, res *slidingsync.Result) (slidingsync.Step, error) {
			for _, rr := range res.Response.Rooms {
				seen = append(seen, rr.Timeline...)
			}
			return slidingsync.Step{}, nil
		}}
		h := start(t, slidingsync.ProtocolMSC4186, cfg)
		h.srv.PushJSON(http.StatusOK, `{"pos":"p1","rooms":{"!a:x":{"initial":true,
			"required_state":[{"type":"m.room.name","state_key":"","sender":"@a:x","event_id":"$n","content":{"name":"N"}}],
			"timeline":[{"type":"m.room.message","sender":"@a:x","event_id":"$t","content":{"body":"hi"}}]}}}`)
		h.run()
		_, err := h.srv.WaitRequests(context.Background(), 2)
		require.NoError(t, err)
		synctest.Wait()
		require.ErrorIs(t, h.stop(t), context.Canceled)
		require.Len(t, seen, 1)
		assert.Equal(t, "hi", seen[0].Content.Raw["body"], "the response keeps decoded events")
		rs, ok := h.conn.Room("!a:x")
		require.True(t, ok)
		assert.Nil(t, rs.Timeline[0].Content.Raw)
		assert.Nil(t, rs.StateEvent(event.StateRoomName, "").Content.Raw)
		assert.JSONEq(t, `{"body":"hi"}`, string(rs.Timeline[0].Content.VeryRaw))

		// A new Conn on the same store loads compact state.
		h2 := startWith(t, h.srv, h.srv.NewClient(), slidingsync.ProtocolMSC4186, slidingsync.Config{Store: store, CompactState: true})
		h2.srv.Push(roomResp("p2"))
		h2.run()
		_, err = h2.srv.WaitRequests(context.Background(), 4)
		require.NoError(t, err)
		synctest.Wait()
		require.ErrorIs(t, h2.stop(t), context.Canceled)
		rs, ok = h2.conn.Room("!a:x")
		require.True(t, ok)
		assert.Nil(t, rs.Timeline[0].Content.Raw)
		assert.JSONEq(t, `{"name":"N"}`, string(rs.StateEvent(event.StateRoomName, "").Content.VeryRaw))
	})
}

// A shrunk window whose last room had news may have overflowed: the Conn probes further at
// once, batch by batch, until a window ends with a room that had nothing new, then shrinks
// back. A burst that leaves the window's last room alone probes nothing.
func TestShrunkWindowProbesPastABurst(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const total = 50
		srv := slidingsynctest.NewServer(slidingsynctest.Options{})
		order := make([]id.RoomID, total)
		for i := range order {
			order[i] = id.RoomID("!r" + strconv.Itoa(i) + ":x")
		}
		var mu sync.Mutex
		news := map[id.RoomID]bool{} // rooms with news the client has not been sent
		sent := map[id.RoomID]bool{}
		bump := map[id.RoomID]int64{}
		var stamp int64
		var served [][]slidingsync.Range
		var midScan func() // runs before the answer to the first scan request
		srv.SetResponder(func(req *slidingsync.Request) *slidingsync.Response {
			mu.Lock()
			defer mu.Unlock()
			rs := req.Lists["all"].Ranges
			if len(served) == 1 && midScan != nil {
				midScan()
			}
			resp := &slidingsync.Response{Rooms: map[id.RoomID]*slidingsync.RoomResponse{}}
			lr := slidingsync.ListResponse{Count: slidingsync.Some(total)}
			for _, r := range rs {
				end := min(r.End, total-1)
				for _, roomID := range order[r.Start : end+1] {
					if !sent[roomID] || news[roomID] {
						resp.Rooms[roomID] = &slidingsync.RoomResponse{Initial: !sent[roomID], Name: slidingsync.Some("x"), BumpStamp: slidingsync.Some(bump[roomID])}
						sent[roomID], news[roomID] = true, false
					}
				}
				lr.Ops = append(lr.Ops, slidingsync.ListOp{Op: slidingsync.ListOpSync, Range: &slidingsync.Range{Start: r.Start, End: end}, RoomIDs: slices.Clone(order[r.Start : end+1])})
			}
			if len(resp.Rooms) == 0 && len(served) > 0 && slices.Equal(served[len(served)-1], rs) {
				return nil // nothing new: long-poll
			}
			served = append(served, rs)
			resp.Lists = map[string]slidingsync.ListResponse{"all": lr}
			return resp
		})
		// burst moves rooms to the top of the order (newest first) with news.
		burstLocked := func(rooms ...int) {
			var top []id.RoomID
			for _, i := range rooms {
				roomID := id.RoomID("!r" + strconv.Itoa(i) + ":x")
				top = append(top, roomID)
				news[roomID] = true
				stamp++
				bump[roomID] = stamp
			}
			rest := slices.DeleteFunc(slices.Clone(order), func(r id.RoomID) bool { return slices.Contains(top, r) })
			order = append(top, rest...)
		}
		burst := func(rooms ...int) {
			mu.Lock()
			defer mu.Unlock()
			burstLocked(rooms...)
		}
		// Twelve rooms seen in the first window get news while the list is scanned: the
		// head probes (and merges with the scan range) until it ends with a quiet room.
		midScan = func() { burstLocked(5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16) }
		h := startWith(t, srv, srv.NewClient(), slidingsync.ProtocolMSC4186, slidingsync.Config{
			Lists: map[string]slidingsync.List{"all": {Window: slidingsync.Scan(20, 5), ListConfig: slidingsync.ListConfig{TimelineLimit: 1}}},
		})
		h.run()
		rangesFrom := func(from int) [][]slidingsync.Range {
			var out [][]slidingsync.Range
			for _, r := range srv.Requests()[from:] {
				out = append(out, r.Parsed.Lists["all"].Ranges)
			}
			return out
		}
		time.Sleep(time.Minute)
		synctest.Wait()
		scanned := rangesFrom(0)
		assert.Equal(t, [][]slidingsync.Range{{{0, 19}}, {{0, 4}, {19, 39}}, {{0, 9}, {39, 49}}, {{0, 19}}, {{0, 4}}}, scanned[:min(5, len(scanned))], "scanned with a probe, then shrunk")
		mu.Lock()
		for roomID, pending := range news {
			assert.False(t, pending, "%s: news during the scan never sent", roomID)
		}
		mu.Unlock()
		mark := len(srv.Requests())

		// Three rooms with news: the window's last room (now !r6) had none.
		burst(30, 31, 32)
		time.Sleep(2 * time.Minute) // past a long-poll, which the next request answers
		synctest.Wait()
		for _, r := range rangesFrom(mark) {
			assert.Equal(t, []slidingsync.Range{{Start: 0, End: 4}}, r, "no probe after a burst the window held")
		}
		mark = len(srv.Requests())

		// 30 rooms with news: 25 fall past the window; the probe finds them, doubling the window.
		var many []int
		for i := range 30 {
			many = append(many, 10+i)
		}
		burst(many...)
		time.Sleep(2 * time.Minute)
		synctest.Wait()
		reqs := srv.Requests()[mark:]
		for len(reqs) > 0 && reqs[0].Parsed.Lists["all"].Ranges[0] == (slidingsync.Range{Start: 0, End: 4}) {
			reqs = reqs[1:]
		}
		var got []slidingsync.Range
		for _, r := range reqs[:min(4, len(reqs))] {
			got = append(got, r.Parsed.Lists["all"].Ranges[0])
		}
		assert.Equal(t, []slidingsync.Range{{0, 9}, {0, 19}, {0, 39}, {0, 4}}, got, "probe doubling, then shrink back")
		for _, r := range reqs[:min(3, len(reqs))] {
			assert.Equal(t, int64(0), *r.Parsed.Timeout, "a probe does not long-poll")
		}
		mu.Lock()
		for roomID, pending := range news {
			assert.False(t, pending, "%s: news never sent", roomID)
		}
		mu.Unlock()
		require.ErrorIs(t, h.stop(t), context.Canceled)
	})
}

// SetList makes a growing list start again from its first window: it is another list.
func TestSetListRestartsTheWindow(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const total = 30
		srv := slidingsynctest.NewServer(slidingsynctest.Options{})
		var served [][]slidingsync.Range
		srv.SetResponder(func(req *slidingsync.Request) *slidingsync.Response {
			rs := req.Lists["all"].Ranges
			if len(served) > 0 && slices.Equal(served[len(served)-1], rs) {
				return nil
			}
			served = append(served, rs)
			return rangesResp(total, rs)
		})
		lc := slidingsync.List{Window: slidingsync.Scan(20, 5), ListConfig: slidingsync.ListConfig{TimelineLimit: 1}}
		h := startWith(t, srv, srv.NewClient(), slidingsync.ProtocolMSC4186, slidingsync.Config{
			Lists: map[string]slidingsync.List{"all": lc},
		})
		h.run()
		time.Sleep(time.Minute)
		synctest.Wait()
		mark := len(srv.Requests())
		lc.TimelineLimit = 2
		h.conn.SetList("all", lc)
		time.Sleep(time.Minute)
		synctest.Wait()
		require.ErrorIs(t, h.stop(t), context.Canceled)
		reqs := srv.Requests()
		require.Greater(t, len(reqs), mark)
		assert.Equal(t, []slidingsync.Range{{Start: 0, End: 4}}, reqs[mark-1].Parsed.Lists["all"].Ranges, "shrunk before")
		var after [][]slidingsync.Range
		for _, r := range reqs[mark:] {
			if r.Parsed.Lists["all"].TimelineLimit == 2 {
				after = append(after, r.Parsed.Lists["all"].Ranges)
			}
		}
		require.NotEmpty(t, after)
		assert.Equal(t, []slidingsync.Range{{Start: 0, End: 19}}, after[0], "the new list starts from its first window")
	})
}
