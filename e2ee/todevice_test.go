package e2ee_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"maunium.net/go/mautrix/event"

	"github.com/sliding-e2ee/sdk/e2ee"
	"github.com/sliding-e2ee/sdk/slidingsync"
	"github.com/sliding-e2ee/sdk/slidingsync/slidingsynctest"
)

func toDeviceBody(pos, nextBatch string, n int) string {
	evts := make([]string, n)
	for i := range evts {
		evts[i] = fmt.Sprintf(`{"sender":"@bob:x","type":"org.example.ping","content":{"n":%d}}`, i)
	}
	nb := ""
	if nextBatch != "" {
		nb = `"next_batch":"` + nextBatch + `",`
	}
	return `{"pos":"` + pos + `","extensions":{"to_device":{` + nb + `"events":[` + strings.Join(evts, ",") + `]}}}`
}

func timeoutOf(t *testing.T, rr slidingsynctest.RecordedRequest) int64 {
	t.Helper()
	require.NotNil(t, rr.Parsed.Timeout)
	return *rr.Parsed.Timeout
}

func TestToDeviceLimitClamp(t *testing.T) {
	for in, want := range map[int]int{0: 100, -5: 1, 1: 1, 50: 50, 100: 100, 1000: 100} {
		exts, release, err := e2ee.New("@clamp:x", "DEV", e2ee.Config{ToDevice: (&recHandler{}).handle, ToDeviceLimit: in})
		require.NoError(t, err)
		body, err := exts[0].Request(context.Background(), slidingsync.RequestInfo{})
		require.NoError(t, err)
		raw, err := json.Marshal(body)
		require.NoError(t, err)
		var req struct{ Limit int }
		require.NoError(t, json.Unmarshal(raw, &req))
		assert.Equal(t, want, req.Limit, "limit %d", in)
		release()
	}
}

// The proxy's capture 11 and 12: a batch is handled, its next_batch is committed and sent as
// since; the first request has no since.
func TestToDeviceSinceAdvancesWithCommit(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, harnessOpts{proto: slidingsync.ProtocolMSC3575, noE2EE: true})
		h.srv.PushJSON(http.StatusOK, proxyFixture(t, "01-initial-no-pos"))
		h.srv.PushJSON(http.StatusOK, proxyFixture(t, "11-after-to-device"))
		h.srv.PushJSON(http.StatusOK, proxyFixture(t, "12-ack-to-device-since"))
		h.run()
		reqs := h.waitRequests(4)
		synctest.Wait()
		h.stop()
		assert.Equal(t, map[string]any{"enabled": true, "limit": float64(100)}, ext(t, reqs[0], "to_device"))
		assert.Equal(t, map[string]any{"enabled": true, "limit": float64(100), "since": "0"}, ext(t, reqs[1], "to_device"))
		assert.Equal(t, map[string]any{"enabled": true, "limit": float64(100), "since": "7"}, ext(t, reqs[2], "to_device"))
		assert.Equal(t, "7", ext(t, reqs[3], "to_device")["since"])
		batches := h.handler.snapshot()
		require.Len(t, batches, 1)
		require.Len(t, batches[0], 1)
		evt := batches[0][0]
		assert.Equal(t, event.Type{Type: "org.example.capture.ping", Class: event.ToDeviceEventType}, evt.Type)
		assert.Equal(t, "@bob7ff91e03:localhost", evt.Sender.String())
		var cp struct{ Since string }
		h.checkpoint("to_device", &cp)
		assert.Equal(t, "7", cp.Since)
	})
}

// A full batch asks for the next one at once (timeout 0); a partial one lets the request
// long-poll again.
func TestToDeviceFullBatchDrains(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, harnessOpts{proto: slidingsync.ProtocolMSC4186, noE2EE: true, limit: 2})
		h.srv.PushJSON(http.StatusOK, toDeviceBody("1", "10", 0))
		h.srv.PushJSON(http.StatusOK, toDeviceBody("2", "12", 2))
		h.srv.PushJSON(http.StatusOK, toDeviceBody("3", "14", 2))
		h.srv.PushJSON(http.StatusOK, toDeviceBody("4", "15", 1))
		h.run()
		reqs := h.waitRequests(5)
		synctest.Wait()
		h.stop()
		wantTimeouts := []int64{0, 30000, 0, 0, 30000}
		wantSince := []any{nil, "10", "12", "14", "15"}
		for i, rr := range reqs {
			assert.Equal(t, wantTimeouts[i], timeoutOf(t, rr), "request %d timeout", i)
			assert.Equal(t, wantSince[i], ext(t, rr, "to_device")["since"], "request %d since", i)
			assert.Equal(t, float64(2), ext(t, rr, "to_device")["limit"])
		}
		assert.Len(t, h.handler.snapshot(), 3)
	})
}

// A handler error aborts the cycle: since does not move and the batch is delivered again.
func TestToDeviceHandlerFailureRedelivers(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, harnessOpts{proto: slidingsync.ProtocolMSC4186, noE2EE: true})
		h.handler.fail = 1
		h.srv.PushJSON(http.StatusOK, toDeviceBody("1", "5", 0))
		h.srv.PushJSON(http.StatusOK, toDeviceBody("2", "7", 1))
		h.srv.PushJSON(http.StatusOK, toDeviceBody("3", "7", 1))
		h.run()
		reqs := h.waitRequests(4)
		synctest.Wait()
		h.stop()
		assert.Equal(t, "5", ext(t, reqs[1], "to_device")["since"])
		assert.Equal(t, "5", ext(t, reqs[2], "to_device")["since"], "the failed batch was not acknowledged")
		assert.Equal(t, "1", reqs[2].Parsed.Pos)
		assert.Equal(t, "7", ext(t, reqs[3], "to_device")["since"])
		assert.Len(t, h.handler.snapshot(), 1)
	})
}

// since is independent of pos: it survives M_UNKNOWN_POS.
func TestToDeviceSinceSurvivesUnknownPos(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, harnessOpts{proto: slidingsync.ProtocolMSC4186, noE2EE: true})
		h.srv.PushJSON(http.StatusOK, toDeviceBody("1", "9", 1))
		h.srv.PushError(slidingsync.MUnknownPos.WithMessage("Unknown position"))
		h.srv.PushJSON(http.StatusOK, toDeviceBody("2", "9", 0))
		h.run()
		reqs := h.waitRequests(4)
		synctest.Wait()
		h.stop()
		assert.Equal(t, "1", reqs[1].Parsed.Pos)
		assert.Equal(t, "", reqs[2].Parsed.Pos)
		assert.Equal(t, "9", ext(t, reqs[2], "to_device")["since"], "since kept across the reset")
		assert.Equal(t, "9", ext(t, reqs[3], "to_device")["since"])
	})
}

// A token that stops advancing (Synapse with a since from the future, a buggy server) is
// logged once and does not make the client skip the long-poll.
func TestToDeviceStalledToken(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, harnessOpts{proto: slidingsync.ProtocolMSC4186, noE2EE: true, limit: 1})
		h.srv.PushJSON(http.StatusOK, toDeviceBody("1", "5", 1))
		h.srv.PushJSON(http.StatusOK, toDeviceBody("2", "5", 1)) // full batch, token did not move
		h.srv.PushJSON(http.StatusOK, toDeviceBody("3", "5", 1))
		h.srv.PushJSON(http.StatusOK, toDeviceBody("4", "", 1)) // next_batch missing
		h.srv.PushJSON(http.StatusOK, toDeviceBody("5", "6", 0))
		h.srv.PushJSON(http.StatusOK, toDeviceBody("6", "6", 1))
		h.run()
		reqs := h.waitRequests(7)
		synctest.Wait()
		h.stop()
		wantTimeouts := []int64{0, 0, 30000, 30000, 30000, 30000, 30000}
		wantSince := []any{nil, "5", "5", "5", "5", "6", "6"}
		for i, rr := range reqs {
			assert.Equal(t, wantTimeouts[i], timeoutOf(t, rr), "request %d timeout", i)
			assert.Equal(t, wantSince[i], ext(t, rr, "to_device")["since"], "request %d since", i)
		}
		// A stalled token makes the loop back off (1 s doubling, jitter in [d/2, d]) instead
		// of polling again at once.
		gaps := []struct{ lo, hi time.Duration }{{500 * time.Millisecond, time.Second}, {time.Second, 2 * time.Second}, {2 * time.Second, 4 * time.Second}, {0, 0}, {500 * time.Millisecond, time.Second}}
		for i, g := range gaps {
			gap := reqs[i+2].Received.Sub(reqs[i+1].Received)
			assert.GreaterOrEqual(t, gap, g.lo, "gap before request %d", i+2)
			assert.LessOrEqual(t, gap, g.hi, "gap before request %d", i+2)
		}
		assert.Equal(t, 2, h.logs.Count("does not advance"), "logged once per stall, not per response")
		assert.Equal(t, 1, h.logs.Count("advances again"))
	})
}

// On v4 both extensions use their MSC-prefixed keys.
func TestWireKeysV4(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, harnessOpts{proto: slidingsync.ProtocolV4})
		h.srv.PushJSON(http.StatusOK, `{"pos":"1","extensions":{"org.matrix.msc4538.to_device":{"next_batch":"3","events":[]},"org.matrix.msc4543.e2ee":{"device_lists":{"changed":["@v4:x"],"left":[]}}}}`)
		h.run()
		reqs := h.waitRequests(2)
		synctest.Wait()
		h.stop()
		assert.Equal(t, map[string]any{"enabled": true}, ext(t, reqs[0], "org.matrix.msc4543.e2ee"))
		assert.Equal(t, map[string]any{"enabled": true, "limit": float64(100), "since": "3"}, ext(t, reqs[1], "org.matrix.msc4538.to_device"))
		assert.Len(t, reqs[1].Parsed.Extensions, 2)
		deltas, _ := h.consumer.snapshot()
		require.Len(t, deltas, 1)
		assert.Equal(t, &e2ee.Delta{Gap: true, Changed: users("@v4:x")}, deltas[0])
	})
}

func TestToDeviceInvalidSectionIsRetried(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, harnessOpts{proto: slidingsync.ProtocolMSC4186, noE2EE: true})
		h.srv.PushJSON(http.StatusOK, toDeviceBody("1", "2", 0))
		h.srv.PushJSON(http.StatusOK, `{"pos":"2","extensions":{"to_device":{"next_batch":"3","events":{}}}}`)
		h.srv.PushJSON(http.StatusOK, `{"pos":"3","extensions":{"to_device":{"next_batch":"3","events":[{"type":"a.b","sender":"@s:x","content":{}},{"bad":`+"1"+`},{"type":5}]}}}`)
		h.run()
		reqs := h.waitRequests(4)
		synctest.Wait()
		h.stop()
		assert.Equal(t, "2", ext(t, reqs[2], "to_device")["since"], "the invalid section was not committed")
		assert.Equal(t, "3", ext(t, reqs[3], "to_device")["since"])
		batches := h.handler.snapshot()
		require.Len(t, batches, 1)
		assert.Len(t, batches[0], 1, "undecodable events are dropped, the rest handled")
	})
}
