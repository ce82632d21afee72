package e2ee_test

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/sliding-e2ee/sdk/e2ee"
	"github.com/sliding-e2ee/sdk/slidingsync"
	"github.com/sliding-e2ee/sdk/slidingsync/slidingsynctest"
)

// recConsumer records, per commit, the delta the consumer was handed inside the transaction
// (nil when none) and the committed state.
type recConsumer struct {
	mu      sync.Mutex
	pending *e2ee.Delta
	deltas  []*e2ee.Delta
	states  []e2ee.State
	handled int // HandleE2EE calls, failed commits included
	// fail makes the next HandleE2EE calls fail.
	fail int
}

func (c *recConsumer) HandleE2EE(_ context.Context, d *e2ee.Delta) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.handled++
	if c.fail > 0 {
		c.fail--
		return errTest
	}
	cp := *d
	c.pending = &cp
	return nil
}

func (c *recConsumer) E2EECommitted(_ context.Context, st e2ee.State) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.deltas = append(c.deltas, c.pending)
	c.states = append(c.states, st)
	c.pending = nil
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

// syncBuffer is a log sink written by Run's goroutine and read after it returned.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) count(msg string) int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return strings.Count(b.buf.String(), msg)
}

type harness struct {
	t        *testing.T
	srv      *slidingsynctest.Server
	conn     *slidingsync.Conn
	consumer *recConsumer
	handler  *recHandler
	e2ee     *e2ee.E2EE
	toDevice *e2ee.ToDevice
	logs     *syncBuffer
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
	if o.deviceID == "" {
		o.deviceID = slidingsynctest.DefaultDeviceID
	}
	srv := slidingsynctest.NewServer(slidingsynctest.Options{Protocol: o.proto, DeviceID: o.deviceID})
	h := &harness{t: t, srv: srv, consumer: &recConsumer{}, handler: &recHandler{}, logs: &syncBuffer{}, done: make(chan error, 1)}
	var exts []slidingsync.Extension
	if !o.noE2EE {
		ext, err := e2ee.NewE2EE(srv.Options().UserID, o.deviceID, e2ee.Config{Consumer: h.consumer})
		require.NoError(t, err)
		t.Cleanup(func() { _ = ext.Close() })
		h.e2ee = ext
		exts = append(exts, ext)
	}
	if !o.noToDev {
		td, err := e2ee.NewToDevice(srv.Options().UserID, o.deviceID, e2ee.ToDeviceConfig{Handler: h.handler.handle, Limit: o.limit})
		require.NoError(t, err)
		t.Cleanup(func() { _ = td.Close() })
		h.toDevice = td
		exts = append(exts, td)
	}
	conn, err := slidingsync.New(srv.NewClient(), slidingsync.Config{Protocol: o.proto, Extensions: exts, Store: o.store})
	require.NoError(t, err)
	h.conn = conn
	return h
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
