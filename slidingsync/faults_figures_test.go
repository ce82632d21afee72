package slidingsync_test

import (
	"context"
	"errors"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"syscall"
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

// faultFunc answers a sync request during a fault. It returns nil and no error to let the
// healthy server answer instead.
type faultFunc func(r *http.Request, pos string) (*http.Response, error)

// faultTransport sits between the client and a fake server. It records when every sync
// request arrives and, while a fault is set, answers with it. The first sync request always
// reaches the server, so that every fault starts on a connection with a committed pos.
type faultTransport struct {
	next   http.RoundTripper
	onSpin func() // called once when the request count passes spinCap

	mu      sync.Mutex
	fault   faultFunc
	arrived []time.Time
	spun    bool
}

// spinCap is far above any backoff-bounded count over the test's fake minutes; passing it
// means the loop sends requests without waiting.
const spinCap = 5000

func (ft *faultTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	if r.URL.Path != slidingsync.ProtocolMSC4186.Path() {
		return ft.next.RoundTrip(r)
	}
	ft.mu.Lock()
	ft.arrived = append(ft.arrived, time.Now())
	first := len(ft.arrived) == 1
	fault := ft.fault
	spin := len(ft.arrived) > spinCap && !ft.spun
	if spin {
		ft.spun = true
	}
	ft.mu.Unlock()
	if spin {
		ft.onSpin()
	}
	if fault != nil && !first {
		if r.Body != nil {
			_, _ = io.Copy(io.Discard, r.Body)
			_ = r.Body.Close()
		}
		resp, err := fault(r, r.URL.Query().Get("pos"))
		if resp != nil || err != nil {
			if resp != nil {
				resp.Request = r
			}
			return resp, err
		}
	}
	return ft.next.RoundTrip(r)
}

func (ft *faultTransport) setFault(f faultFunc) {
	ft.mu.Lock()
	defer ft.mu.Unlock()
	ft.fault = f
}

// countBetween returns how many sync requests arrived in [from, to).
func (ft *faultTransport) countBetween(from, to time.Time) int {
	ft.mu.Lock()
	defer ft.mu.Unlock()
	n := 0
	for _, at := range ft.arrived {
		if !at.Before(from) && at.Before(to) {
			n++
		}
	}
	return n
}

func jsonResponse(status int, body string, header http.Header) *http.Response {
	h := http.Header{"Content-Type": {"application/json"}}
	for k, v := range header {
		h[k] = v
	}
	return &http.Response{
		Status:        strconv.Itoa(status) + " " + http.StatusText(status),
		StatusCode:    status,
		Proto:         "HTTP/1.1",
		ProtoMajor:    1,
		ProtoMinor:    1,
		Header:        h,
		Body:          io.NopCloser(strings.NewReader(body)),
		ContentLength: int64(len(body)),
	}
}

// cutBody returns part of a body and then fails, as a connection closed mid-body does.
type cutBody struct{ r io.Reader }

func (b *cutBody) Read(p []byte) (int, error) {
	n, err := b.r.Read(p)
	if errors.Is(err, io.EOF) {
		return n, io.ErrUnexpectedEOF
	}
	return n, err
}

func (b *cutBody) Close() error { return nil }

// slowBody returns its first bytes at once and then nothing until the request's context ends
// or an hour has passed, as a stalled server does.
type slowBody struct {
	ctx  context.Context
	sent bool
}

func (b *slowBody) Read(p []byte) (int, error) {
	if !b.sent {
		b.sent = true
		return copy(p, `{"pos":"slow",`), nil
	}
	t := time.NewTimer(time.Hour)
	defer t.Stop()
	select {
	case <-b.ctx.Done():
		return 0, b.ctx.Err()
	case <-t.C:
		return 0, io.ErrUnexpectedEOF
	}
}

func (b *slowBody) Close() error { return nil }

// TestFaultFigures runs ten fake minutes of each server fault against Conn.Run, reports the
// requests per minute the loop sent, checks them against a bound derived from the documented
// backoff, then lets the server recover and checks that the connection converges: a committed
// pos, the room sent after recovery, nothing from a broken answer. Run with -v for the figures.
func TestFaultFigures(t *testing.T) {
	const (
		faultFor = 10 * time.Minute
		// At the backoff cap (DefaultMaxBackoff, jitter in [cap/2, cap]) a failing request
		// waits at least 15 s: at most 4 a minute, 5 allowing for a window edge.
		backoffPerMin = 5.0
		// The longest the loop can be waiting (a backoff at the cap) or stuck in a request
		// (poll timeout plus margin) when the server recovers, plus the response itself.
		backoffRecovery = zeroMaxBackoff + zeroPollTimeout + zeroTimeoutMargin + time.Second
	)
	matrixErr := func(status int, errcode string, extra string, header http.Header) faultFunc {
		return func(*http.Request, string) (*http.Response, error) {
			return jsonResponse(status, `{"errcode":"`+errcode+`","error":"fault"`+extra+`}`, header), nil
		}
	}
	tests := []struct {
		name  string
		fault faultFunc
		// maxPerMin bounds the average requests per minute after the first minute.
		maxPerMin float64
		// recoverWithin bounds the time from recovery to convergence.
		recoverWithin time.Duration
	}{{
		name:          "502 storm",
		fault:         matrixErr(http.StatusBadGateway, "M_UNKNOWN", "", nil),
		maxPerMin:     backoffPerMin,
		recoverWithin: backoffRecovery,
	}, {
		name: "503 from a gateway with an HTML body",
		fault: func(*http.Request, string) (*http.Response, error) {
			resp := jsonResponse(http.StatusServiceUnavailable, "<html>Service Unavailable</html>", nil)
			resp.Header.Set("Content-Type", "text/html")
			return resp, nil
		},
		maxPerMin:     backoffPerMin,
		recoverWithin: backoffRecovery,
	}, {
		name:          "429 with retry_after_ms 2000",
		fault:         matrixErr(http.StatusTooManyRequests, "M_LIMIT_EXCEEDED", `,"retry_after_ms":2000`, nil),
		maxPerMin:     30,
		recoverWithin: 2*time.Second + time.Second,
	}, {
		name:          "429 with a Retry-After header of 5 s",
		fault:         matrixErr(http.StatusTooManyRequests, "M_LIMIT_EXCEEDED", "", http.Header{"Retry-After": {"5"}}),
		maxPerMin:     12,
		recoverWithin: 5*time.Second + time.Second,
	}, {
		name:          "429 without a retry time",
		fault:         matrixErr(http.StatusTooManyRequests, "M_LIMIT_EXCEEDED", "", nil),
		maxPerMin:     backoffPerMin,
		recoverWithin: backoffRecovery,
	}, {
		// The wait is capped at 10 minutes, so a server cannot park the client for days.
		name:          "429 with retry_after_ms of 11 days",
		fault:         matrixErr(http.StatusTooManyRequests, "M_LIMIT_EXCEEDED", `,"retry_after_ms":1000000000`, nil),
		maxPerMin:     0.2,
		recoverWithin: 10*time.Minute + time.Second,
	}, {
		name: "connection reset",
		fault: func(*http.Request, string) (*http.Response, error) {
			return nil, &net.OpError{Op: "read", Net: "tcp", Err: syscall.ECONNRESET}
		},
		maxPerMin:     backoffPerMin,
		recoverWithin: backoffRecovery,
	}, {
		name: "body cut off mid-way",
		fault: func(*http.Request, string) (*http.Response, error) {
			resp := jsonResponse(http.StatusOK, "", nil)
			resp.ContentLength = 4096
			resp.Body = &cutBody{r: strings.NewReader(`{"pos":"cut","rooms":{"!cut:x":{"initial":true,"name":"cut`)}
			return resp, nil
		},
		maxPerMin:     backoffPerMin,
		recoverWithin: backoffRecovery,
	}, {
		name: "body slower than the HTTP timeout",
		fault: func(r *http.Request, _ string) (*http.Response, error) {
			resp := jsonResponse(http.StatusOK, "", nil)
			resp.ContentLength = -1
			resp.Body = &slowBody{ctx: r.Context()}
			return resp, nil
		},
		// Each attempt lasts poll timeout plus margin (45 s) before its backoff.
		maxPerMin:     60 / (zeroPollTimeout + zeroTimeoutMargin).Seconds(),
		recoverWithin: backoffRecovery,
	}, {
		name: "undecodable 200",
		fault: func(*http.Request, string) (*http.Response, error) {
			return jsonResponse(http.StatusOK, `{"pos":"bad","rooms":`, nil), nil
		},
		maxPerMin:     backoffPerMin,
		recoverWithin: backoffRecovery,
	}, {
		name:          "M_UNKNOWN_POS for every request",
		fault:         matrixErr(http.StatusBadRequest, "M_UNKNOWN_POS", "", nil),
		maxPerMin:     backoffPerMin,
		recoverWithin: backoffRecovery,
	}, {
		// A server that answers a request without pos but has forgotten the pos by the next
		// request (a restarting or load-balanced server without shared connection state).
		name: "M_UNKNOWN_POS for every pos the server gave",
		fault: func(_ *http.Request, pos string) (*http.Response, error) {
			if pos == "" {
				return jsonResponse(http.StatusOK, `{"pos":"forgotten"}`, nil), nil
			}
			return jsonResponse(http.StatusBadRequest, `{"errcode":"M_UNKNOWN_POS","error":"Unknown position"}`, nil), nil
		},
		maxPerMin:     2 * backoffPerMin, // a reset costs two requests
		recoverWithin: backoffRecovery,
	}, {
		name: "pos never advances",
		fault: func(*http.Request, string) (*http.Response, error) {
			return jsonResponse(http.StatusOK, `{"pos":"p1"}`, nil), nil
		},
		maxPerMin:     backoffPerMin,
		recoverWithin: backoffRecovery,
	}}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var perMin float64
			var spun bool
			synctest.Test(t, func(t *testing.T) {
				srv := slidingsynctest.NewServer(slidingsynctest.Options{})
				cli := srv.NewClient()
				ft := &faultTransport{next: slidingsynctest.HandlerTransport(srv), fault: tt.fault}
				cli.Client = &http.Client{Transport: ft}
				store := slidingsync.NewMemoryStore()
				h := startWith(t, srv, cli, slidingsync.ProtocolMSC4186, slidingsync.Config{Store: store})
				ft.onSpin = h.cancel
				srv.Push(roomResp("p1", "!a:x"))
				start := time.Now()
				h.run()

				time.Sleep(faultFor)
				ft.mu.Lock()
				spun = ft.spun
				ft.mu.Unlock()
				total := ft.countBetween(start, start.Add(faultFor))
				afterFirst := ft.countBetween(start.Add(time.Minute), start.Add(faultFor))
				perMin = float64(afterFirst) / (faultFor - time.Minute).Minutes()
				if spun {
					t.Logf("%s: more than %d requests without time passing: the loop spins", tt.name, spinCap)
					require.ErrorIs(t, h.stop(t), context.Canceled)
					return
				}
				t.Logf("%s: %d requests in %v, %.2f/min after the first minute (bound %.2f/min)",
					tt.name, total, faultFor, perMin, tt.maxPerMin)

				ft.setFault(nil)
				recovered := time.Now()
				srv.Push(roomResp("", "!recovered:x"))
				var cp *slidingsync.Checkpoint
				for {
					var err error
					cp, err = store.Load(context.Background(), h.conn.Key())
					require.NoError(t, err)
					if _, ok := cp.Rooms["!recovered:x"]; ok || time.Since(recovered) > tt.recoverWithin {
						break
					}
					time.Sleep(100 * time.Millisecond)
				}
				took := time.Since(recovered)
				synctest.Wait()
				require.ErrorIs(t, h.stop(t), context.Canceled)
				t.Logf("%s: converged %v after the server recovered (bound %v)", tt.name, took, tt.recoverWithin)

				require.Contains(t, cp.Rooms, id.RoomID("!recovered:x"), "converged within %v", tt.recoverWithin)
				assert.NotEmpty(t, cp.Pos)
				assert.Equal(t, h.conn.Pos(), cp.Pos, "the current pos is the committed one")
				assert.Contains(t, cp.Rooms, id.RoomID("!a:x"), "room state survives the fault")
				assert.NotContains(t, cp.Rooms, id.RoomID("!cut:x"), "nothing of a broken answer is applied")
				assert.Len(t, cp.Rooms, 2)
			})
			assert.False(t, spun, "the loop must wait between requests")
			assert.LessOrEqual(t, perMin, tt.maxPerMin, "requests per minute after the first minute")
		})
	}
}

// TestFaultRatesOverRealSockets measures, over real loopback sockets and the real clock,
// how many requests the loop sends while connections are reset, bodies are cut off or
// trickle in past the HTTP timeout, with the backoff scaled down to milliseconds so that the
// test takes a few seconds. The bound is the one the backoff allows; then the server recovers
// and the connection must converge. Run with -v for the figures.
func TestFaultRatesOverRealSockets(t *testing.T) {
	if testing.Short() {
		t.Skip("real-time fault measurement")
	}
	const (
		faultFor   = 1500 * time.Millisecond
		minBackoff = 10 * time.Millisecond
		maxBackoff = 80 * time.Millisecond
		margin     = 150 * time.Millisecond
	)
	tests := []struct {
		name    string
		handler http.HandlerFunc
		// perAttempt is the least time one failed attempt takes besides its backoff.
		perAttempt time.Duration
	}{{
		name: "connection reset",
		handler: func(w http.ResponseWriter, _ *http.Request) {
			if conn, _, err := w.(http.Hijacker).Hijack(); err == nil {
				_ = conn.(*net.TCPConn).SetLinger(0) // an RST, not a FIN
				_ = conn.Close()
			}
		},
	}, {
		name: "body cut off mid-way",
		handler: func(w http.ResponseWriter, _ *http.Request) {
			w.Header().Set("Content-Length", "4096")
			w.WriteHeader(http.StatusOK)
			_, _ = w.Write([]byte(`{"pos":"cut","rooms":{"!cut:x":`))
			w.(http.Flusher).Flush()
			if conn, _, err := w.(http.Hijacker).Hijack(); err == nil {
				_ = conn.Close()
			}
		},
	}, {
		name: "body slower than the HTTP timeout",
		handler: func(w http.ResponseWriter, r *http.Request) {
			w.WriteHeader(http.StatusOK)
			_, _ = w.Write([]byte(`{"pos":"slow",`))
			w.(http.Flusher).Flush()
			select {
			case <-r.Context().Done():
			case <-time.After(10 * time.Second):
			}
		},
		perAttempt: margin, // the first request does not long-poll, so only the margin
	}}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv := slidingsynctest.NewServer(slidingsynctest.Options{})
			var mu sync.Mutex
			faulty := true
			var arrived []time.Time
			hs := newLoopbackServer(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if r.URL.Path != slidingsync.ProtocolMSC4186.Path() {
					srv.ServeHTTP(w, r)
					return
				}
				mu.Lock()
				arrived = append(arrived, time.Now())
				f := faulty
				mu.Unlock()
				if f {
					tt.handler(w, r)
					return
				}
				srv.ServeHTTP(w, r)
			}))

			cli, err := mautrix.NewClient(hs.URL, srv.Options().UserID, srv.Options().AccessToken)
			require.NoError(t, err)
			cli.DeviceID = srv.Options().DeviceID
			store := slidingsync.NewMemoryStore()
			conn, err := slidingsync.New(cli, slidingsync.Config{
				Protocol:      slidingsync.ProtocolMSC4186,
				Store:         store,
				MinBackoff:    minBackoff,
				MaxBackoff:    maxBackoff,
				TimeoutMargin: margin,
				NoPollTimeout: margin,
				PollTimeout:   200 * time.Millisecond,
			})
			require.NoError(t, err)
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			done := make(chan error, 1)
			start := time.Now()
			go func() { done <- conn.Run(ctx) }()
			time.Sleep(faultFor)
			mu.Lock()
			faulty = false
			n := len(arrived)
			elapsed := time.Since(start)
			mu.Unlock()
			recovered := time.Now()
			srv.Push(roomResp("", "!recovered:x"))
			for ctx.Err() == nil {
				if _, ok := conn.Room("!recovered:x"); ok {
					break
				}
				time.Sleep(5 * time.Millisecond)
			}
			took := time.Since(recovered)
			cancel()
			require.ErrorIs(t, <-done, context.Canceled)

			// Past the first few attempts every one waits at least maxBackoff/2.
			ramp := 4
			bound := ramp + int(elapsed/(maxBackoff/2+tt.perAttempt)) + 1
			t.Logf("%s: %d requests in %v over real sockets (bound %d with backoff %v..%v); converged %v after recovery",
				tt.name, n, elapsed.Round(time.Millisecond), bound, minBackoff, maxBackoff, took.Round(time.Millisecond))
			assert.LessOrEqual(t, n, bound)
			assert.GreaterOrEqual(t, n, 2, "the loop kept retrying")
			cp, err := store.Load(context.Background(), conn.Key())
			require.NoError(t, err)
			assert.Contains(t, cp.Rooms, id.RoomID("!recovered:x"), "converged")
			assert.NotContains(t, cp.Rooms, id.RoomID("!cut:x"), "nothing of a broken answer is applied")
			assert.Equal(t, conn.Pos(), cp.Pos)
		})
	}
}

// newLoopbackServer starts an HTTP server on 127.0.0.1 whose own error log is silenced (the
// faults are deliberate), closed when the test ends.
func newLoopbackServer(t *testing.T, h http.Handler) *httptest.Server {
	t.Helper()
	hs := httptest.NewUnstartedServer(h)
	hs.Config.ErrorLog = newDiscardLog()
	hs.Start()
	t.Cleanup(hs.Close)
	return hs
}

func newDiscardLog() *log.Logger { return log.New(io.Discard, "", 0) }
