package slidingsynctest_test

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/id"

	"github.com/sliding-e2ee/sdk/slidingsync"
	"github.com/sliding-e2ee/sdk/slidingsync/slidingsynctest"
)

// reply is what a raw request got back.
type reply struct {
	status int
	header http.Header
	body   []byte
	err    error
}

// send makes one request through the server's Transport with the default token.
func send(ctx context.Context, srv *slidingsynctest.Server, method, path string, query url.Values, body string) reply {
	return sendAuth(ctx, srv, method, path, query, body, "Bearer "+srv.Options().AccessToken)
}

func sendAuth(ctx context.Context, srv *slidingsynctest.Server, method, path string, query url.Values, body, auth string) reply {
	u := srv.Options().HomeserverURL + path
	if len(query) > 0 {
		u += "?" + query.Encode()
	}
	req, err := http.NewRequestWithContext(ctx, method, u, strings.NewReader(body))
	if err != nil {
		return reply{err: err}
	}
	if auth != "" {
		req.Header.Set("Authorization", auth)
	}
	res, err := (&http.Client{Transport: slidingsynctest.HandlerTransport(srv)}).Do(req)
	if err != nil {
		return reply{err: err}
	}
	defer res.Body.Close()
	data, err := io.ReadAll(res.Body)
	return reply{status: res.StatusCode, header: res.Header, body: data, err: err}
}

// syncReq sends a sync request on the server's own dialect with the given query timeout
// ("" for none).
func syncReq(ctx context.Context, srv *slidingsynctest.Server, timeout string) reply {
	q := url.Values{}
	if timeout != "" {
		q.Set("timeout", timeout)
	}
	return send(ctx, srv, http.MethodPost, srv.Options().Protocol.Path(), q, `{"lists":{}}`)
}

func posOf(t *testing.T, r reply) string {
	t.Helper()
	require.NoError(t, r.err)
	require.Equal(t, http.StatusOK, r.status, "body: %s", r.body)
	resp, err := slidingsync.DecodeResponse(r.body)
	require.NoError(t, err)
	return resp.Pos
}

func errcodeOf(t *testing.T, r reply) string {
	t.Helper()
	require.NoError(t, r.err)
	var body map[string]any
	require.NoError(t, json.Unmarshal(r.body, &body), "body: %s", r.body)
	code, _ := body["errcode"].(string)
	return code
}

func TestFIFO(t *testing.T) {
	ctx := context.Background()
	srv := slidingsynctest.NewServer(slidingsynctest.Options{})
	srv.Push(&slidingsync.Response{Pos: "a"})
	srv.PushError(mautrix.MUnknown.WithMessage("boom"))
	srv.PushJSON(http.StatusOK, `{"pos":"c"}`)
	srv.PushError(slidingsync.MUnknownPos.WithMessage("Unknown position"))
	srv.Push(&slidingsync.Response{Pos: "e"})
	require.Equal(t, 5, srv.Pending())

	assert.Equal(t, "a", posOf(t, syncReq(ctx, srv, "")))
	r := syncReq(ctx, srv, "")
	assert.Equal(t, http.StatusInternalServerError, r.status)
	assert.Equal(t, "M_UNKNOWN", errcodeOf(t, r))
	assert.Equal(t, "c", posOf(t, syncReq(ctx, srv, "")))
	r = syncReq(ctx, srv, "")
	assert.Equal(t, http.StatusBadRequest, r.status)
	assert.Equal(t, "M_UNKNOWN_POS", errcodeOf(t, r))
	assert.Equal(t, "e", posOf(t, syncReq(ctx, srv, "")))
	assert.Zero(t, srv.Pending())

	reqs := srv.Requests()
	require.Len(t, reqs, 5)
	for i, rq := range reqs {
		assert.True(t, rq.Answered, "request %d", i)
		assert.Equal(t, http.MethodPost, rq.Method)
		assert.Equal(t, slidingsync.ProtocolMSC4186.Path(), rq.Path)
		assert.Zero(t, rq.Timeout)
		require.NoError(t, rq.ParseErr)
		require.NotNil(t, rq.Parsed)
	}
	assert.Equal(t, []int{200, 500, 200, 400, 200}, []int{reqs[0].Status, reqs[1].Status, reqs[2].Status, reqs[3].Status, reqs[4].Status})
	assert.Zero(t, srv.InFlight())
	assert.Equal(t, 1, srv.MaxInFlight())
}

func TestPosAssignment(t *testing.T) {
	ctx := context.Background()
	srv := slidingsynctest.NewServer(slidingsynctest.Options{})
	room := id.RoomID("!a:example.org")
	srv.Push(nil)
	srv.Push(&slidingsync.Response{Rooms: map[id.RoomID]*slidingsync.RoomResponse{
		room: {Initial: true, Name: slidingsync.Some("A")},
	}})
	srv.Push(&slidingsync.Response{Pos: "opaque/1"})
	srv.Push(&slidingsync.Response{})
	srv.Push(&slidingsync.Response{Pos: "7"}) // numeric: moves the counter forward
	srv.Push(&slidingsync.Response{})

	assert.Equal(t, "1", posOf(t, syncReq(ctx, srv, "")))
	r := syncReq(ctx, srv, "")
	resp, err := slidingsync.DecodeResponse(r.body)
	require.NoError(t, err)
	assert.Equal(t, "2", resp.Pos)
	require.Contains(t, resp.Rooms, room)
	assert.Equal(t, "A", resp.Rooms[room].Name.Val)
	assert.True(t, resp.Rooms[room].Initial)
	assert.Equal(t, "opaque/1", posOf(t, syncReq(ctx, srv, "")))
	assert.Equal(t, "3", posOf(t, syncReq(ctx, srv, "")))
	assert.Equal(t, "7", posOf(t, syncReq(ctx, srv, "")))
	assert.Equal(t, "8", posOf(t, syncReq(ctx, srv, "")))
	// An empty long-poll answer takes the next pos from the same counter.
	assert.Equal(t, "9", posOf(t, syncReq(ctx, srv, "0")))
}

func TestPosAssignedWhenServedNotWhenPushed(t *testing.T) {
	ctx := context.Background()
	srv := slidingsynctest.NewServer(slidingsynctest.Options{})
	srv.Push(&slidingsync.Response{})
	srv.Push(&slidingsync.Response{})
	assert.Equal(t, "1", posOf(t, syncReq(ctx, srv, "")))
	assert.Equal(t, "2", posOf(t, syncReq(ctx, srv, "")))
	assert.Equal(t, "3", posOf(t, syncReq(ctx, srv, "")), "empty answer")
	srv.Push(&slidingsync.Response{})
	assert.Equal(t, "4", posOf(t, syncReq(ctx, srv, "")))
}

// TestLongPollWaitsForTimeout holds the polite personality to its empty answer: {"pos": "N"}
// and nothing else, with a fresh pos.
func TestLongPollWaitsForTimeout(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		srv := slidingsynctest.NewServer(slidingsynctest.Options{Personality: slidingsynctest.PersonalityPolite})
		start := time.Now()
		r := syncReq(t.Context(), srv, "5000")
		assert.Equal(t, 5*time.Second, time.Since(start))
		require.NoError(t, r.err)
		assert.Equal(t, http.StatusOK, r.status)
		assert.JSONEq(t, `{"pos":"1"}`, string(r.body))
		assert.Equal(t, "application/json", r.header.Get("Content-Type"))
		reqs := srv.Requests()
		require.Len(t, reqs, 1)
		assert.Equal(t, 5*time.Second, reqs[0].Timeout)
		assert.True(t, reqs[0].Answered)
		assert.Zero(t, srv.InFlight())
	})
}

func TestLongPollNotAnsweredEarly(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		srv := slidingsynctest.NewServer(slidingsynctest.Options{})
		done := make(chan reply, 1)
		go func() { done <- syncReq(t.Context(), srv, "5000") }()
		time.Sleep(5*time.Second - time.Millisecond)
		synctest.Wait()
		require.Empty(t, done, "answered before the timeout")
		assert.Equal(t, 1, srv.InFlight())
		time.Sleep(time.Millisecond)
		synctest.Wait()
		require.Len(t, done, 1)
		assert.Equal(t, "1", posOf(t, <-done))
	})
}

func TestDefaultTimeouts(t *testing.T) {
	for _, tc := range []struct {
		proto slidingsync.Protocol
		want  time.Duration
	}{
		{slidingsync.ProtocolMSC4186, 0},
		{slidingsync.ProtocolMSC3575, 10 * time.Second},
		{slidingsync.ProtocolV4, 0},
	} {
		t.Run(tc.proto.String(), func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				srv := slidingsynctest.NewServer(slidingsynctest.Options{Protocol: tc.proto})
				start := time.Now()
				assert.Equal(t, "1", posOf(t, syncReq(t.Context(), srv, "")))
				assert.Equal(t, tc.want, time.Since(start))
				assert.Equal(t, tc.want, srv.Requests()[0].Timeout)
			})
		})
	}
}

func TestPushDuringLongPollAnswersAtOnce(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		srv := slidingsynctest.NewServer(slidingsynctest.Options{})
		start := time.Now()
		done := make(chan reply, 1)
		go func() { done <- syncReq(t.Context(), srv, "30000") }()
		synctest.Wait()
		require.Empty(t, done)
		require.Equal(t, 1, srv.InFlight())

		srv.Push(&slidingsync.Response{Pos: "pushed"})
		synctest.Wait()
		require.Len(t, done, 1, "the push did not wake the long-poll")
		assert.Equal(t, "pushed", posOf(t, <-done))
		assert.Zero(t, time.Since(start))
		assert.Zero(t, srv.InFlight())
		assert.Zero(t, srv.Pending())
	})
}

func TestWaitingRequestsAreServedInArrivalOrder(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		srv := slidingsynctest.NewServer(slidingsynctest.Options{})
		first, second := make(chan reply, 1), make(chan reply, 1)
		go func() { first <- syncReq(t.Context(), srv, "30000") }()
		synctest.Wait()
		go func() { second <- syncReq(t.Context(), srv, "30000") }()
		synctest.Wait()
		require.Equal(t, 2, srv.InFlight())

		srv.Push(&slidingsync.Response{Pos: "A"})
		synctest.Wait()
		require.Len(t, first, 1)
		require.Empty(t, second)
		assert.Equal(t, "A", posOf(t, <-first))

		srv.Push(&slidingsync.Response{Pos: "B"})
		synctest.Wait()
		require.Len(t, second, 1)
		assert.Equal(t, "B", posOf(t, <-second))
		assert.Equal(t, 2, srv.MaxInFlight())
	})
}

func TestCancelWhileWaitingConsumesNothing(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		srv := slidingsynctest.NewServer(slidingsynctest.Options{})
		start := time.Now()
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan reply, 1)
		go func() { done <- syncReq(ctx, srv, "30000") }()
		synctest.Wait()
		require.Equal(t, 1, srv.InFlight())

		cancel()
		synctest.Wait()
		require.Len(t, done, 1, "cancellation was not prompt")
		r := <-done
		require.ErrorIs(t, r.err, context.Canceled)
		assert.Zero(t, time.Since(start))
		assert.Zero(t, srv.InFlight())

		srv.Push(&slidingsync.Response{Pos: "kept"})
		assert.Equal(t, 1, srv.Pending())
		assert.Equal(t, "kept", posOf(t, syncReq(t.Context(), srv, "")))

		reqs := srv.Requests()
		require.Len(t, reqs, 2)
		assert.False(t, reqs[0].Answered)
		assert.Zero(t, reqs[0].Status)
		assert.True(t, reqs[1].Answered)
	})
}

// lateCancelCtx reports cancellation through Err without ever closing Done. A request
// waiting on it wakes only for an answer, and then finds itself cancelled: the moment of
// cancellation coincides with the hand-over, deterministically.
type lateCancelCtx struct {
	context.Context
	cancelled atomic.Bool
}

func (c *lateCancelCtx) Err() error {
	if c.cancelled.Load() {
		return context.Canceled
	}
	return nil
}

func TestCancelRacingPushGivesItemBack(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		srv := slidingsynctest.NewServer(slidingsynctest.Options{})
		ctx := &lateCancelCtx{Context: context.Background()}
		done := make(chan reply, 1)
		go func() { done <- syncReq(ctx, srv, "30000") }()
		synctest.Wait()
		require.Equal(t, 1, srv.InFlight())

		ctx.cancelled.Store(true)
		srv.Push(&slidingsync.Response{Pos: "A"}) // handed to the waiting request
		srv.Push(&slidingsync.Response{Pos: "B"})
		synctest.Wait()
		require.Len(t, done, 1)
		require.ErrorIs(t, (<-done).err, context.Canceled)
		assert.Equal(t, 2, srv.Pending())
		assert.Zero(t, srv.InFlight())
		assert.False(t, srv.Requests()[0].Answered)
		assert.Equal(t, "A", posOf(t, syncReq(t.Context(), srv, "")))
		assert.Equal(t, "B", posOf(t, syncReq(t.Context(), srv, "")))
	})
}

func TestCancelledBeforeArrivalConsumesNothing(t *testing.T) {
	srv := slidingsynctest.NewServer(slidingsynctest.Options{})
	srv.Push(&slidingsync.Response{Pos: "A"})
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	require.ErrorIs(t, syncReq(ctx, srv, "").err, context.Canceled)
	assert.Equal(t, 1, srv.Pending())
	assert.Equal(t, "A", posOf(t, syncReq(context.Background(), srv, "")))
}

func TestAuth(t *testing.T) {
	ctx := context.Background()
	srv := slidingsynctest.NewServer(slidingsynctest.Options{AccessToken: "secret"})
	srv.Push(&slidingsync.Response{Pos: "A"})
	path := srv.Options().Protocol.Path()

	for _, auth := range []string{"", "Bearer token", "Bearer secret2", "secret"} {
		r := sendAuth(ctx, srv, http.MethodPost, path, nil, `{}`, auth)
		assert.Equal(t, http.StatusUnauthorized, r.status, "auth %q", auth)
		assert.Equal(t, "M_UNKNOWN_TOKEN", errcodeOf(t, r), "auth %q", auth)
	}
	assert.Equal(t, 1, srv.Pending(), "a rejected request consumed the script")

	cli := srv.NewClient()
	cli.AccessToken = "wrong"
	_, err := cli.MakeFullRequest(ctx, mautrix.FullRequest{Method: http.MethodPost, URL: srv.Options().HomeserverURL + path, RequestJSON: map[string]any{}})
	require.ErrorIs(t, err, mautrix.MUnknownToken)
	// /versions checks a token only when one is sent.
	_, err = cli.Versions(ctx)
	require.ErrorIs(t, err, mautrix.MUnknownToken)
	assert.Equal(t, http.StatusOK, sendAuth(ctx, srv, http.MethodGet, "/_matrix/client/versions", nil, "", "").status)

	r := sendAuth(ctx, srv, http.MethodPost, path, nil, `{}`, "Bearer secret")
	assert.Equal(t, "A", posOf(t, r))
	reqs := srv.Requests()
	require.Len(t, reqs, 6)
	assert.Equal(t, http.StatusUnauthorized, reqs[0].Status)
	assert.True(t, reqs[0].Answered)
	assert.Equal(t, http.StatusOK, reqs[5].Status)
}

func TestErrorShapes(t *testing.T) {
	ctx := context.Background()
	srv := slidingsynctest.NewServer(slidingsynctest.Options{})
	srv.PushError(mautrix.MLimitExceeded.WithMessage("Too many requests").WithExtraField("retry_after_ms", 1500))
	srv.PushError(slidingsync.MUnknownPos.WithMessage("Unknown position"))
	srv.PushError(mautrix.RespError{StatusCode: http.StatusBadRequest, Err: "HTTP 400 : invalid pos: abc"})
	srv.PushError(mautrix.MUnknown.WithStatus(http.StatusBadGateway).WithMessage("upstream").WithExtraData(map[string]any{"errcode": "ignored", "extra": true}))

	r := syncReq(ctx, srv, "")
	assert.Equal(t, http.StatusTooManyRequests, r.status)
	assert.JSONEq(t, `{"errcode":"M_LIMIT_EXCEEDED","error":"Too many requests","retry_after_ms":1500}`, string(r.body))
	r = syncReq(ctx, srv, "")
	assert.Equal(t, http.StatusBadRequest, r.status)
	assert.JSONEq(t, `{"errcode":"M_UNKNOWN_POS","error":"Unknown position"}`, string(r.body))
	r = syncReq(ctx, srv, "")
	assert.Equal(t, http.StatusBadRequest, r.status)
	assert.JSONEq(t, `{"error":"HTTP 400 : invalid pos: abc"}`, string(r.body))
	r = syncReq(ctx, srv, "")
	assert.Equal(t, http.StatusBadGateway, r.status)
	assert.JSONEq(t, `{"errcode":"M_UNKNOWN","error":"upstream","extra":true}`, string(r.body))

	// The same shapes as the SDK sees them through mautrix.
	srv.PushError(mautrix.MLimitExceeded.WithMessage("Too many requests").WithExtraField("retry_after_ms", 1500))
	srv.PushError(slidingsync.MUnknownPos.WithMessage("Unknown position"))
	cli := srv.NewClient()
	syncURL := srv.Options().HomeserverURL + srv.Options().Protocol.Path()
	_, err := cli.MakeFullRequest(ctx, mautrix.FullRequest{Method: http.MethodPost, URL: syncURL, RequestJSON: map[string]any{}})
	var httpErr mautrix.HTTPError
	require.ErrorAs(t, err, &httpErr)
	require.NotNil(t, httpErr.RespError)
	assert.Equal(t, http.StatusTooManyRequests, httpErr.Response.StatusCode)
	assert.Equal(t, "M_LIMIT_EXCEEDED", httpErr.RespError.ErrCode)
	assert.Equal(t, 1500.0, httpErr.RespError.ExtraData["retry_after_ms"])
	_, err = cli.MakeFullRequest(ctx, mautrix.FullRequest{Method: http.MethodPost, URL: syncURL, RequestJSON: map[string]any{}})
	require.ErrorIs(t, err, slidingsync.MUnknownPos)
}

func TestMalformedBodiesServedVerbatim(t *testing.T) {
	ctx := context.Background()
	srv := slidingsynctest.NewServer(slidingsynctest.Options{})
	bodies := []struct {
		status int
		body   string
	}{
		{http.StatusOK, `{"pos": "1", "rooms": [`},
		{http.StatusOK, `{"rooms":{"not-a-room-id":null}}`},
		{http.StatusOK, ""},
		{http.StatusBadGateway, "<html>Bad Gateway</html>\n"},
		{http.StatusOK, "  {\"pos\" :\"x\",\n\"unknown\":[1,2]}  "},
	}
	for _, b := range bodies {
		srv.PushJSON(b.status, b.body)
	}
	for i, b := range bodies {
		r := syncReq(ctx, srv, "")
		require.NoError(t, r.err)
		assert.Equal(t, b.status, r.status, "body %d", i)
		assert.Equal(t, b.body, string(r.body), "body %d", i)
		assert.Equal(t, "application/json", r.header.Get("Content-Type"))
	}
	_, err := slidingsync.DecodeResponse([]byte(bodies[0].body))
	assert.ErrorIs(t, err, slidingsync.ErrInvalidResponse)
}

func TestDiscover(t *testing.T) {
	const proxy = "https://proxy.example.org/base"
	for _, tc := range []struct {
		name      string
		opts      slidingsynctest.Options
		want      slidingsync.Protocol
		wantProxy string
		wantErr   bool
	}{
		{name: "simplified advertised", opts: slidingsynctest.Options{}, want: slidingsync.ProtocolMSC4186},
		{name: "proxy", opts: slidingsynctest.Options{Protocol: slidingsync.ProtocolMSC3575, ProxyURL: proxy}, want: slidingsync.ProtocolMSC3575, wantProxy: proxy},
		{name: "neither on msc3575", opts: slidingsynctest.Options{Protocol: slidingsync.ProtocolMSC3575}, wantErr: true},
		{name: "neither on v4", opts: slidingsynctest.Options{Protocol: slidingsync.ProtocolV4}, wantErr: true},
		{name: "simplified off, proxy on", opts: slidingsynctest.Options{AdvertiseSimplified: new(false), ProxyURL: proxy}, want: slidingsync.ProtocolMSC3575, wantProxy: proxy},
		{name: "simplified forced on", opts: slidingsynctest.Options{Protocol: slidingsync.ProtocolMSC3575, AdvertiseSimplified: new(true), ProxyURL: proxy}, want: slidingsync.ProtocolMSC4186},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := slidingsynctest.NewServer(tc.opts)
			ep, err := slidingsync.Discover(context.Background(), srv.NewClient(), slidingsync.ProtocolAuto)
			if tc.wantErr {
				require.ErrorIs(t, err, slidingsync.ErrNotAdvertised)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tc.want, ep.Protocol)
			if tc.wantProxy == "" {
				assert.Nil(t, ep.BaseURL)
			} else {
				require.NotNil(t, ep.BaseURL)
				assert.Equal(t, tc.wantProxy, ep.BaseURL.String())
			}
			assert.Empty(t, srv.Requests(), "discovery is not a sync request")
		})
	}
}

func TestV4ReadsPosAndTimeoutFromBody(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		srv := slidingsynctest.NewServer(slidingsynctest.Options{Protocol: slidingsync.ProtocolV4})
		timeout := int64(5000)
		query, body, err := slidingsync.EncodeRequest(slidingsync.ProtocolV4, &slidingsync.Request{Pos: "3", Timeout: &timeout})
		require.NoError(t, err)
		require.Empty(t, query)
		// A query timeout means nothing to a v4 server.
		query.Set("timeout", "0")

		start := time.Now()
		r := send(t.Context(), srv, http.MethodPost, slidingsync.ProtocolV4.Path(), query, string(body))
		assert.Equal(t, 5*time.Second, time.Since(start))
		assert.Equal(t, "1", posOf(t, r))
		reqs := srv.Requests()
		require.Len(t, reqs, 1)
		require.NotNil(t, reqs[0].Parsed)
		assert.Equal(t, "3", reqs[0].Parsed.Pos)
		assert.Equal(t, 5*time.Second, reqs[0].Timeout)
	})
}

func TestQueryDialectsIgnoreBodyTimeout(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		srv := slidingsynctest.NewServer(slidingsynctest.Options{})
		srv.IssuePos("", "3")
		start := time.Now()
		r := send(t.Context(), srv, http.MethodPost, srv.Options().Protocol.Path(), url.Values{"pos": {"3"}}, `{"timeout":5000}`)
		assert.Zero(t, time.Since(start))
		assert.Equal(t, "3", posOf(t, r), "Synapse keeps the pos of a timeout=0 request with nothing new")
		assert.Zero(t, srv.Requests()[0].Timeout)
		assert.Equal(t, "3", srv.Requests()[0].Parsed.Pos)
	})
}

func TestMethodsAndPaths(t *testing.T) {
	ctx := context.Background()
	srv := slidingsynctest.NewServer(slidingsynctest.Options{})
	srv.Push(&slidingsync.Response{Pos: "A"})

	r := send(ctx, srv, http.MethodGet, srv.Options().Protocol.Path(), nil, "")
	assert.Equal(t, http.StatusMethodNotAllowed, r.status)
	assert.Equal(t, "M_UNRECOGNIZED", errcodeOf(t, r))
	for _, path := range []string{slidingsync.ProtocolV4.Path(), slidingsync.ProtocolMSC3575.Path(), "/_matrix/client/v3/sync", "/"} {
		r = send(ctx, srv, http.MethodPost, path, nil, "{}")
		assert.Equal(t, http.StatusNotFound, r.status, path)
		assert.Equal(t, "M_UNRECOGNIZED", errcodeOf(t, r), path)
	}
	for _, path := range []string{"/_matrix/client/versions", "/.well-known/matrix/client"} {
		r = send(ctx, srv, http.MethodPost, path, nil, "{}")
		assert.Equal(t, http.StatusMethodNotAllowed, r.status, path)
		assert.Equal(t, "M_UNRECOGNIZED", errcodeOf(t, r), path)
	}

	assert.Equal(t, 1, srv.Pending())
	reqs := srv.Requests()
	require.Len(t, reqs, 1, "only the sync path is recorded")
	assert.Equal(t, http.MethodGet, reqs[0].Method)
	assert.Equal(t, http.StatusMethodNotAllowed, reqs[0].Status)
}

func TestRejectsBadRequests(t *testing.T) {
	ctx := context.Background()
	srv := slidingsynctest.NewServer(slidingsynctest.Options{})
	srv.Push(&slidingsync.Response{Pos: "A"})
	path := srv.Options().Protocol.Path()

	r := send(ctx, srv, http.MethodPost, path, nil, `{"lists":5}`)
	assert.Equal(t, http.StatusBadRequest, r.status)
	assert.Equal(t, "M_BAD_JSON", errcodeOf(t, r))
	r = send(ctx, srv, http.MethodPost, path, url.Values{"timeout": {"soon"}}, `{}`)
	assert.Equal(t, http.StatusBadRequest, r.status)
	assert.Equal(t, "M_INVALID_PARAM", errcodeOf(t, r))
	assert.Equal(t, 1, srv.Pending())

	reqs := srv.Requests()
	require.Len(t, reqs, 2)
	assert.Nil(t, reqs[0].Parsed)
	assert.Error(t, reqs[0].ParseErr)
	assert.Equal(t, []byte(`{"lists":5}`), reqs[0].Body)
}

func TestClose(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		srv := slidingsynctest.NewServer(slidingsynctest.Options{})
		done := make(chan reply, 2)
		for range 2 {
			go func() { done <- syncReq(t.Context(), srv, "30000") }()
		}
		synctest.Wait()
		require.Equal(t, 2, srv.InFlight())

		srv.Close()
		synctest.Wait()
		require.Len(t, done, 2)
		for range 2 {
			r := <-done
			assert.Equal(t, http.StatusServiceUnavailable, r.status)
		}
		assert.Zero(t, srv.InFlight())

		srv.Push(&slidingsync.Response{Pos: "A"})
		assert.Equal(t, http.StatusServiceUnavailable, syncReq(t.Context(), srv, "").status)
		assert.Equal(t, 1, srv.Pending())
		srv.Close()

		reqs := srv.Requests()
		require.Len(t, reqs, 3)
		for _, rq := range reqs {
			assert.True(t, rq.Answered)
			assert.Equal(t, http.StatusServiceUnavailable, rq.Status)
		}
	})
}

func TestWaitRequests(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		srv := slidingsynctest.NewServer(slidingsynctest.Options{})
		got := make(chan []slidingsynctest.RecordedRequest, 1)
		go func() {
			reqs, err := srv.WaitRequests(t.Context(), 2)
			assert.NoError(t, err)
			got <- reqs
		}()
		synctest.Wait()
		syncReq(t.Context(), srv, "")
		synctest.Wait()
		require.Empty(t, got)
		syncReq(t.Context(), srv, "")
		synctest.Wait()
		require.Len(t, got, 1)
		assert.Len(t, <-got, 2)

		ctx, cancel := context.WithTimeout(t.Context(), time.Second)
		defer cancel()
		reqs, err := srv.WaitRequests(ctx, 3)
		require.ErrorIs(t, err, context.DeadlineExceeded)
		assert.Len(t, reqs, 2)

		reqs, err = srv.WaitRequests(t.Context(), 0)
		require.NoError(t, err)
		assert.Len(t, reqs, 2)
	})
}

func TestRequestsAreCopies(t *testing.T) {
	srv := slidingsynctest.NewServer(slidingsynctest.Options{})
	syncReq(context.Background(), srv, "")
	reqs := srv.Requests()
	reqs[0].Header.Set("Authorization", "changed")
	reqs[0].Body[0] = 'X'
	reqs[0].Query.Set("timeout", "changed")
	again := srv.Requests()
	assert.Equal(t, "Bearer token", again[0].Header.Get("Authorization"))
	assert.Equal(t, `{"lists":{}}`, string(again[0].Body))
	assert.False(t, again[0].Query.Has("timeout"))
}

// TestConcurrentUse runs under -race: many requests and pushes at once, and every pushed
// answer is served exactly once.
func TestConcurrentUse(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		srv := slidingsynctest.NewServer(slidingsynctest.Options{})
		const n = 20
		var wg sync.WaitGroup
		var mu sync.Mutex
		seen := map[string]int{}
		for range n {
			wg.Go(func() {
				r := syncReq(t.Context(), srv, "1000")
				mu.Lock()
				seen[posOf(t, r)]++
				mu.Unlock()
			})
			wg.Go(func() { srv.Push(&slidingsync.Response{}) })
			wg.Go(func() { _ = srv.InFlight(); _ = srv.Requests() })
		}
		wg.Wait()
		assert.Len(t, seen, n)
		for pos, count := range seen {
			assert.Equal(t, 1, count, pos)
		}
		assert.Zero(t, srv.Pending())
		assert.Zero(t, srv.InFlight())
		assert.Len(t, srv.Requests(), n)
	})
}

// TestBehindRealHTTPServer serves through sockets, as a user might with httptest.NewServer.
func TestBehindRealHTTPServer(t *testing.T) {
	srv := slidingsynctest.NewServer(slidingsynctest.Options{})
	ts := httptest.NewServer(srv)
	defer ts.Close()
	srv.Push(&slidingsync.Response{Pos: "A"})

	cli, err := mautrix.NewClient(ts.URL, srv.Options().UserID, srv.Options().AccessToken)
	require.NoError(t, err)
	ep, err := slidingsync.Discover(t.Context(), cli, slidingsync.ProtocolAuto)
	require.NoError(t, err)
	assert.Equal(t, slidingsync.ProtocolMSC4186, ep.Protocol)
	data, err := cli.MakeFullRequest(t.Context(), mautrix.FullRequest{Method: http.MethodPost, URL: ts.URL + ep.Protocol.Path(), RequestJSON: map[string]any{}})
	require.NoError(t, err)
	assert.JSONEq(t, `{"pos":"A"}`, string(data))
}

// TestConnKeepsOneRequestInFlight drives a real Conn: it changes its configuration while a
// long-poll waits, which must cancel that request before the next one goes out.
func TestConnKeepsOneRequestInFlight(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		srv := slidingsynctest.NewServer(slidingsynctest.Options{})
		room := id.RoomID("!r:example.org")
		srv.Push(&slidingsync.Response{Rooms: map[id.RoomID]*slidingsync.RoomResponse{
			room: {Initial: true, Name: slidingsync.Some("Room")},
		}})
		conn, err := slidingsync.New(srv.NewClient(), slidingsync.Config{Protocol: slidingsync.ProtocolMSC4186})
		require.NoError(t, err)
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan error, 1)
		go func() { done <- conn.Run(ctx) }()

		_, err = srv.WaitRequests(t.Context(), 2)
		require.NoError(t, err)
		synctest.Wait()
		rs, ok := conn.Room(room)
		require.True(t, ok)
		assert.Equal(t, "Room", rs.Name)
		assert.Equal(t, "1", conn.Pos())
		require.Equal(t, 1, srv.InFlight())

		conn.SetList("all", slidingsync.List{ListConfig: slidingsync.ListConfig{Ranges: []slidingsync.Range{{Start: 0, End: 9}}}})
		reqs, err := srv.WaitRequests(t.Context(), 3)
		require.NoError(t, err)
		synctest.Wait()
		assert.False(t, reqs[1].Answered, "the superseded long-poll was answered")
		require.NotNil(t, reqs[2].Parsed)
		assert.Contains(t, reqs[2].Parsed.Lists, "all")
		assert.Equal(t, "1", reqs[2].Parsed.Pos)

		cancel()
		require.ErrorIs(t, <-done, context.Canceled)
		assert.Zero(t, srv.InFlight())
		assert.Equal(t, 1, srv.MaxInFlight())
		assert.Zero(t, srv.Pending())
	})
}

func TestNewClient(t *testing.T) {
	srv := slidingsynctest.NewServer(slidingsynctest.Options{UserID: "@u:x.org", DeviceID: "DEV", AccessToken: "t", HomeserverURL: "https://hs.example.org"})
	cli := srv.NewClient()
	assert.Equal(t, id.UserID("@u:x.org"), cli.UserID)
	assert.Equal(t, id.DeviceID("DEV"), cli.DeviceID)
	assert.Equal(t, "t", cli.AccessToken)
	assert.Equal(t, "https://hs.example.org", cli.HomeserverURL.String())
	assert.Zero(t, cli.DefaultHTTPRetries)
	assert.Equal(t, slidingsync.ProtocolMSC4186, srv.Options().Protocol)

	def := slidingsynctest.NewServer(slidingsynctest.Options{}).NewClient()
	assert.Equal(t, id.UserID("@bot:example.org"), def.UserID)
	assert.Equal(t, id.DeviceID("BOTDEVICE"), def.DeviceID)
	assert.Equal(t, "token", def.AccessToken)
	assert.Equal(t, "https://slidingsynctest.invalid", def.HomeserverURL.String())
}

func TestNewServerRejectsUnknownProtocol(t *testing.T) {
	assert.Panics(t, func() { slidingsynctest.NewServer(slidingsynctest.Options{Protocol: "msc9999"}) })
	assert.Panics(t, func() { slidingsynctest.NewServer(slidingsynctest.Options{HomeserverURL: "not a url"}) })
}

// TestServeHTTPDirectly uses the handler without Transport, with a request already
// cancelled when it arrives: it is recorded, unanswered, and consumes nothing.
func TestServeHTTPDirectly(t *testing.T) {
	srv := slidingsynctest.NewServer(slidingsynctest.Options{})
	srv.Push(&slidingsync.Response{Pos: "A"})
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	req := httptest.NewRequestWithContext(ctx, http.MethodPost, srv.Options().Protocol.Path(), strings.NewReader("{}"))
	req.Header.Set("Authorization", "Bearer "+srv.Options().AccessToken)
	w := httptest.NewRecorder()
	srv.ServeHTTP(w, req)
	assert.Empty(t, w.Body.Bytes())
	assert.Equal(t, 1, srv.Pending())
	reqs := srv.Requests()
	require.Len(t, reqs, 1)
	assert.False(t, reqs[0].Answered)
	assert.Zero(t, srv.InFlight())

	req = httptest.NewRequest(http.MethodPost, srv.Options().Protocol.Path(), strings.NewReader("{}"))
	req.Header.Set("Authorization", "Bearer "+srv.Options().AccessToken)
	w = httptest.NewRecorder()
	srv.ServeHTTP(w, req)
	assert.Equal(t, http.StatusOK, w.Code)
	assert.JSONEq(t, `{"pos":"A"}`, w.Body.String())
}

// TestConnFollowsDiscoveredProxy checks that a Conn that discovers an MSC3575 proxy sends
// its requests there, in that dialect.
func TestConnFollowsDiscoveredProxy(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		srv := slidingsynctest.NewServer(slidingsynctest.Options{
			Protocol: slidingsync.ProtocolMSC3575,
			ProxyURL: "https://proxy.example.org",
		})
		srv.Push(nil)
		conn, err := slidingsync.New(srv.NewClient(), slidingsync.Config{})
		require.NoError(t, err)
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan error, 1)
		go func() { done <- conn.Run(ctx) }()

		reqs, err := srv.WaitRequests(t.Context(), 2)
		require.NoError(t, err)
		cancel()
		require.ErrorIs(t, <-done, context.Canceled)
		assert.Equal(t, slidingsync.ProtocolMSC3575, conn.Endpoint().Protocol)
		for _, rq := range reqs {
			assert.Equal(t, "proxy.example.org", rq.Host)
			assert.Equal(t, slidingsync.ProtocolMSC3575.Path(), rq.Path)
		}
		require.NotNil(t, reqs[0].Parsed)
		assert.Empty(t, reqs[0].Parsed.Pos)
		assert.NotEmpty(t, reqs[0].Parsed.TxnID)
		assert.Equal(t, "1", reqs[1].Parsed.Pos)
	})
}

func TestResponderAnswersWhenQueueIsEmpty(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		srv := slidingsynctest.NewServer(slidingsynctest.Options{})
		srv.SetResponder(func(req *slidingsync.Request) *slidingsync.Response {
			if req.Pos != "" {
				return nil // long-poll
			}
			return &slidingsync.Response{Lists: map[string]slidingsync.ListResponse{"all": {Count: slidingsync.Some(len(req.Lists))}}}
		})
		cli := srv.NewClient()
		post := func(pos string, timeout int) (int, string) {
			url := cli.HomeserverURL.String() + slidingsync.ProtocolMSC4186.Path() + "?timeout=" + strconv.Itoa(timeout)
			if pos != "" {
				url += "&pos=" + pos
			}
			req, err := http.NewRequest(http.MethodPost, url, strings.NewReader(
				`{"lists":{"a":{"ranges":[[0,1]],"required_state":[],"timeline_limit":0},"b":{"ranges":[[0,1]],"required_state":[],"timeline_limit":0}}}`))
			require.NoError(t, err)
			req.Header.Set("Authorization", "Bearer "+srv.Options().AccessToken)
			resp, err := cli.Client.Do(req)
			require.NoError(t, err)
			defer resp.Body.Close()
			body, err := io.ReadAll(resp.Body)
			require.NoError(t, err)
			return resp.StatusCode, string(body)
		}
		srv.Push(&slidingsync.Response{Pos: "7"})
		_, body := post("", 0)
		assert.JSONEq(t, `{"pos":"7"}`, body, "queued answers go first")
		_, body = post("", 0)
		assert.JSONEq(t, `{"pos":"8","lists":{"all":{"count":2}},"rooms":{},"extensions":{}}`, body)
		began := time.Now()
		_, body = post("8", 5000)
		// The long-poll's answer: the same pos, and the lists as last served.
		assert.JSONEq(t, `{"pos":"8","rooms":{},"extensions":{},"lists":{
			"a":{"count":0,"ops":[{"op":"SYNC","range":[0,1],"room_ids":[]}]},
			"b":{"count":0,"ops":[{"op":"SYNC","range":[0,1],"room_ids":[]}]}}}`, body, "nil falls back to the long-poll")
		assert.Equal(t, 5*time.Second, time.Since(began))
	})
}
