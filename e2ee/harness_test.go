package e2ee_test

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/sliding-e2ee/sdk/e2ee"
	"github.com/sliding-e2ee/sdk/internal/testlog"
	"github.com/sliding-e2ee/sdk/slidingsync"
	"github.com/sliding-e2ee/sdk/slidingsync/slidingsynctest"
)

// recConsumer records, per commit, the delta the consumer was handed inside the transaction
// (nil when none) and the committed state.
type recConsumer struct {
	mu      sync.Mutex
	deltas  []*e2ee.Delta
	states  []e2ee.State
	handled int // HandleE2EE calls, failed commits included
	// fail makes the next HandleE2EE calls fail.
	fail int
}

func (c *recConsumer) HandleE2EE(_ context.Context, st e2ee.State, d *e2ee.Delta) slidingsync.Step {
	var pending *e2ee.Delta
	step := slidingsync.Step{After: func(context.Context) {
		c.mu.Lock()
		defer c.mu.Unlock()
		c.deltas = append(c.deltas, pending)
		c.states = append(c.states, st)
	}}
	if !d.Empty() {
		step.Commit = func(context.Context) error {
			c.mu.Lock()
			defer c.mu.Unlock()
			c.handled++
			if c.fail > 0 {
				c.fail--
				return errTest
			}
			cp := *d
			pending = &cp
			return nil
		}
	}
	return step
}

func (c *recConsumer) snapshot() ([]*e2ee.Delta, []e2ee.State) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]*e2ee.Delta(nil), c.deltas...), append([]e2ee.State(nil), c.states...)
}

type testError string

func (e testError) Error() string { return string(e) }

const errTest = testError("test failure")

// recHandler records to-device batches.
type recHandler struct {
	mu      sync.Mutex
	batches [][]*event.Event
	fail    int
}

func (h *recHandler) handle(_ context.Context, evts []*event.Event) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.fail > 0 {
		h.fail--
		return errTest
	}
	h.batches = append(h.batches, evts)
	return nil
}

func (h *recHandler) snapshot() [][]*event.Event {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([][]*event.Event(nil), h.batches...)
}

type harness struct {
	t        *testing.T
	srv      *slidingsynctest.Server
	conn     *slidingsync.Conn
	consumer *recConsumer
	handler  *recHandler
	store    slidingsync.Store
	release  func() // releases the extensions' claims
	logs     *testlog.Buffer
	cancel   context.CancelFunc
	done     chan error
}

type harnessOpts struct {
	proto    slidingsync.Protocol
	store    slidingsync.Store
	limit    int
	noE2EE   bool
	noToDev  bool
	deviceID id.DeviceID
}

// newHarness builds a Conn with both extensions against a fresh fake server in the current
// synctest bubble. Queue answers, then call run.
func newHarness(t *testing.T, o harnessOpts) *harness {
	t.Helper()
	srv := slidingsynctest.NewServer(slidingsynctest.Options{Protocol: o.proto, DeviceID: o.deviceID})
	o.deviceID = srv.Options().DeviceID
	h := &harness{t: t, srv: srv, consumer: &recConsumer{}, handler: &recHandler{}, logs: &testlog.Buffer{}, done: make(chan error, 1)}
	cfg := e2ee.Config{ToDeviceLimit: o.limit}
	if !o.noE2EE {
		cfg.Consumer = h.consumer
	}
	if !o.noToDev {
		cfg.ToDevice = h.handler.handle
	}
	exts, release, err := e2ee.New(srv.Options().UserID, o.deviceID, cfg)
	require.NoError(t, err)
	t.Cleanup(release)
	h.release = release
	h.store = o.store
	if h.store == nil {
		h.store = slidingsync.NewMemoryStore()
	}
	conn, err := slidingsync.New(srv.NewClient(), slidingsync.Config{Protocol: o.proto, Extensions: exts, Store: h.store})
	require.NoError(t, err)
	h.conn = conn
	return h
}

// checkpoint decodes the committed checkpoint of an extension into v.
func (h *harness) checkpoint(name string, v any) {
	h.t.Helper()
	cp, err := h.store.Load(context.Background(), h.conn.Key())
	require.NoError(h.t, err)
	require.NoError(h.t, json.Unmarshal(cp.Extensions[name], v))
}

// e2eeState returns the committed state of the e2ee extension.
func (h *harness) e2eeState() e2ee.State {
	var st e2ee.State
	h.checkpoint("e2ee", &st)
	return st
}

func (h *harness) run() {
	ctx, cancel := context.WithCancel(context.Background())
	ctx = zerolog.New(h.logs).WithContext(ctx)
	h.cancel = cancel
	go func() { h.done <- h.conn.Run(ctx) }()
}

// waitRequests waits until n requests arrived and the client is idle, and returns them.
func (h *harness) waitRequests(n int) []slidingsynctest.RecordedRequest {
	h.t.Helper()
	reqs, err := h.srv.WaitRequests(context.Background(), n)
	require.NoError(h.t, err)
	return reqs
}

func (h *harness) stop() {
	h.t.Helper()
	h.cancel()
	require.ErrorIs(h.t, <-h.done, context.Canceled)
}

// ext returns the parsed body of an extension in a recorded request.
func ext(t *testing.T, rr slidingsynctest.RecordedRequest, key string) map[string]any {
	t.Helper()
	require.NoError(t, rr.ParseErr)
	raw, ok := rr.Parsed.Extensions[key]
	require.True(t, ok, "request has no %q extension: %s", key, rr.Body)
	var body map[string]any
	require.NoError(t, json.Unmarshal(raw, &body))
	return body
}

// proxyFixtures holds the proxy's captured responses, checked in by the core package.
const proxyFixtures = "../slidingsync/testdata/msc3575-proxy"

// proxyFixture returns a captured proxy response body.
func proxyFixture(t *testing.T, name string) string {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(proxyFixtures, name+".json"))
	require.NoError(t, err)
	return string(data)
}
