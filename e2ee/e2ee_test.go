package e2ee_test

import (
	"context"
	"encoding/json"
	"net/http"
	"testing"
	"testing/synctest"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"maunium.net/go/mautrix/id"

	"github.com/sliding-e2ee/sdk/e2ee"
	"github.com/sliding-e2ee/sdk/slidingsync"
)

func TestDeviceClaim(t *testing.T) {
	c := &recConsumer{}
	keys := e2ee.Config{Consumer: c}
	toDev := e2ee.Config{ToDevice: (&recHandler{}).handle}
	exts, release, err := e2ee.New("@claim:x", "DEV", keys)
	require.NoError(t, err)
	require.Len(t, exts, 1)
	_, _, err = e2ee.New("@claim:x", "DEV", keys)
	require.ErrorIs(t, err, e2ee.ErrDeviceAlreadyClaimed)
	_, releaseOther, err := e2ee.New("@claim:x", "DEV2", keys)
	require.NoError(t, err, "another device of the same user is independent")
	releaseOther()

	_, releaseTD, err := e2ee.New("@claim:x", "DEV", toDev)
	require.NoError(t, err, "to_device is claimed on its own")
	_, _, err = e2ee.New("@claim:x", "DEV", toDev)
	require.ErrorIs(t, err, e2ee.ErrDeviceAlreadyClaimed)
	_, _, err = e2ee.New("@claim:x", "DEV3", e2ee.Config{Consumer: c, ToDevice: toDev.ToDevice})
	require.NoError(t, err, "both for a third device")
	_, _, err = e2ee.New("@claim:x", "DEV3", toDev)
	require.ErrorIs(t, err, e2ee.ErrDeviceAlreadyClaimed)
	_, _, err = e2ee.New("@claim:x", "DEV3", e2ee.Config{Consumer: c, ToDevice: toDev.ToDevice})
	require.ErrorIs(t, err, e2ee.ErrDeviceAlreadyClaimed, "a failed claim releases nothing it did not take")

	release()
	release() // idempotent
	_, again, err := e2ee.New("@claim:x", "DEV", keys)
	require.NoError(t, err, "release releases the claim")
	again()
	releaseTD()

	_, _, err = e2ee.New("@claim:x", "DEV", e2ee.Config{})
	require.Error(t, err, "a consumer or a handler is required")
	_, _, err = e2ee.New("", "DEV", keys)
	require.Error(t, err)
}

// A failed commit (the consumer's transaction hook fails) commits nothing: the same pos is
// requested again and the re-sent change is delivered again, then committed once.
func TestCommitFailureRedelivers(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, harnessOpts{proto: slidingsync.ProtocolMSC4186, noToDev: true})
		h.consumer.fail = 1
		h.srv.PushJSON(http.StatusOK, `{"pos":"1","extensions":{"e2ee":{"device_one_time_keys_count":{"signed_curve25519":10}}}}`)
		h.srv.PushJSON(http.StatusOK, `{"pos":"2","extensions":{"e2ee":{"device_lists":{"changed":["@x:y"],"left":[]},"device_one_time_keys_count":{"signed_curve25519":9}}}}`)
		// Synapse recomputes the changes from the same pos.
		h.srv.PushJSON(http.StatusOK, `{"pos":"3","extensions":{"e2ee":{"device_lists":{"changed":["@x:y"],"left":[]},"device_one_time_keys_count":{"signed_curve25519":9}}}}`)
		h.run()
		// The first commit fails; request 2 repeats "no pos".
		reqs := h.waitRequests(4)
		synctest.Wait()
		h.stop()
		assert.Equal(t, "", reqs[0].Parsed.Pos)
		assert.Equal(t, "", reqs[1].Parsed.Pos, "nothing was committed, so the request is repeated")
		assert.Equal(t, "2", reqs[2].Parsed.Pos)
		assert.Equal(t, "3", reqs[3].Parsed.Pos)
		deltas, states := h.consumer.snapshot()
		require.Len(t, deltas, 2)
		assert.Equal(t, &e2ee.Delta{Gap: true, OTKCounts: counts(sc, 9), Changed: users("@x:y")}, deltas[0],
			"the retried initial request is a gap again and carries the change")
		assert.Equal(t, &e2ee.Delta{OTKCounts: counts(sc, 9), Changed: users("@x:y")}, deltas[1])
		assert.Equal(t, 3, h.consumer.handled)
		n, _ := states[1].OTKCount(sc)
		assert.Equal(t, 9, n)
	})
}

// Switching e2ee on for a connection that already has a pos is a gap, once.
func TestEnabledMidConnectionIsGap(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		store := slidingsync.NewMemoryStore()
		key := slidingsync.ConnKey{UserID: "@bot:example.org", DeviceID: "BOTDEVICE"}
		require.NoError(t, store.Commit(context.Background(), key, &slidingsync.Update{Pos: "p5"}))
		h := newHarness(t, harnessOpts{proto: slidingsync.ProtocolMSC4186, noToDev: true, store: store})
		// p5 came from an earlier run of the same server: Synapse takes it back.
		h.srv.IssuePos("", "p5")
		h.srv.PushJSON(http.StatusOK, `{"pos":"p6","extensions":{"e2ee":{"device_lists":{"changed":[],"left":[]}}}}`)
		h.srv.PushJSON(http.StatusOK, `{"pos":"p7","extensions":{"e2ee":{"device_lists":{"changed":[],"left":[]}}}}`)
		h.run()
		reqs := h.waitRequests(3)
		synctest.Wait()
		h.stop()
		assert.Equal(t, "p5", reqs[0].Parsed.Pos)
		deltas, _ := h.consumer.snapshot()
		require.Len(t, deltas, 2)
		assert.Equal(t, &e2ee.Delta{Gap: true}, deltas[0])
		assert.Nil(t, deltas[1])
	})
}

// A restart restores the committed state: no gap when resuming from pos, and the pending
// fallback upload is reported by the first commit.
func TestRestartRestoresState(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		store := slidingsync.NewMemoryStore()
		h := newHarness(t, harnessOpts{proto: slidingsync.ProtocolMSC3575, noToDev: true, store: store})
		h.srv.PushJSON(http.StatusOK, `{"pos":"1","extensions":{"e2ee":{"device_one_time_keys_count":{"signed_curve25519":3},"device_unused_fallback_key_types":[]}}}`)
		h.run()
		h.waitRequests(2)
		synctest.Wait()
		h.stop()
		h.release()

		h2 := newHarness(t, harnessOpts{proto: slidingsync.ProtocolMSC3575, noToDev: true, store: store})
		h2.srv.PushJSON(http.StatusOK, `{"pos":"2"}`)
		h2.run()
		reqs := h2.waitRequests(2)
		synctest.Wait()
		h2.stop()
		assert.Equal(t, "1", reqs[0].Parsed.Pos)
		deltas, states := h2.consumer.snapshot()
		require.Len(t, deltas, 1)
		assert.Nil(t, deltas[0], "resuming from pos is no gap")
		assert.True(t, states[0].NeedsFallbackKey(sc), "the pending fallback upload survives the restart")
		n, known := states[0].OTKCount(sc)
		assert.Equal(t, 3, n)
		assert.True(t, known)
	})
}

// A response whose e2ee section has the wrong shape is not applied: nothing is committed and
// the request is retried.
func TestInvalidSectionIsRetried(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, harnessOpts{proto: slidingsync.ProtocolMSC4186, noToDev: true})
		h.srv.PushJSON(http.StatusOK, `{"pos":"1","extensions":{"e2ee":{"device_one_time_keys_count":{"signed_curve25519":5}}}}`)
		h.srv.PushJSON(http.StatusOK, `{"pos":"2","extensions":{"e2ee":{"device_one_time_keys_count":{"signed_curve25519":"many"}}}}`)
		h.srv.PushJSON(http.StatusOK, `{"pos":"3","extensions":{"e2ee":{"device_lists":{"changed":["@u:x"],"left":[]}}}}`)
		h.run()
		reqs := h.waitRequests(4)
		synctest.Wait()
		h.stop()
		assert.Equal(t, "1", reqs[1].Parsed.Pos)
		assert.Equal(t, "1", reqs[2].Parsed.Pos, "the invalid response was not committed")
		deltas, states := h.consumer.snapshot()
		require.Len(t, deltas, 2)
		assert.Equal(t, &e2ee.Delta{Changed: users("@u:x")}, deltas[1])
		n, _ := states[1].OTKCount(sc)
		assert.Equal(t, 5, n, "the invalid count never reached the state")
		assert.Equal(t, id.UserID("@u:x"), deltas[1].Changed[0])
	})
}

// stepConsumer records what HandleE2EE was asked and writes (Step.Commit) only what needs the
// transaction: device-list news.
type stepConsumer struct {
	handled   []*e2ee.Delta // deltas HandleE2EE was called with
	written   []*e2ee.Delta // deltas whose Step.Commit ran
	committed []*e2ee.Delta // deltas whose Step.After ran, nil for an After without a write
}

func (c *stepConsumer) HandleE2EE(_ context.Context, _ e2ee.State, d *e2ee.Delta) slidingsync.Step {
	c.handled = append(c.handled, d)
	var wrote *e2ee.Delta
	step := slidingsync.Step{After: func(context.Context) { c.committed = append(c.committed, wrote) }}
	if d.Gap || len(d.Changed) > 0 || len(d.Left) > 0 {
		step.Commit = func(context.Context) error {
			c.written = append(c.written, d)
			wrote = d
			return nil
		}
	}
	return step
}

// process runs one response through the e2ee extension as a Conn does, with the checkpoint
// committed last, and returns the Step; commit runs its Commit and After.
func process(t *testing.T, ext slidingsync.Extension, info slidingsync.RequestInfo, raw string) slidingsync.Step {
	t.Helper()
	var body json.RawMessage
	if raw != "" {
		body = json.RawMessage(raw)
	}
	step, err := ext.Process(context.Background(), info, body)
	require.NoError(t, err)
	require.NotNil(t, step.Checkpoint, "the state is always the checkpoint")
	return step
}

func commit(t *testing.T, step slidingsync.Step) {
	t.Helper()
	if step.Commit != nil {
		require.NoError(t, step.Commit(context.Background()))
	}
	step.After(context.Background())
}

// The Step of a response carries the merged state as its checkpoint and the consumer's work;
// the next response merges from the checkpoint the connection committed, so a Step whose
// commit failed (dropped by the connection) leaves nothing behind and is never reported.
func TestStepCarriesStateAndConsumerWork(t *testing.T) {
	c := &stepConsumer{}
	exts, release, err := e2ee.New("@delta:x", "DEV", e2ee.Config{Consumer: c})
	require.NoError(t, err)
	defer release()
	ext := exts[0]
	info := slidingsync.RequestInfo{Protocol: slidingsync.ProtocolMSC4186}

	first := process(t, ext, info, `{"device_unused_fallback_key_types":["signed_curve25519"]}`)
	commit(t, first)
	require.Len(t, c.handled, 1)
	assert.True(t, c.handled[0].Gap, "a request without pos is a gap")
	assert.Equal(t, []*e2ee.Delta{c.handled[0]}, c.committed)

	// A commit that fails after the consumer wrote: the connection drops the Step and the next
	// response is merged from the checkpoint of the first.
	info.Pos, info.Checkpoint = "1", first.Checkpoint
	failed := process(t, ext, info, `{"device_lists":{"changed":["@u:x"]},"device_unused_fallback_key_types":[]}`)
	require.NoError(t, failed.Commit(context.Background()))
	next := process(t, ext, info, "")
	assert.Nil(t, next.Commit, "nothing to write for an empty section")
	commit(t, next)
	require.Len(t, c.committed, 2)
	assert.Nil(t, c.committed[1], "the failed commit's delta is not reported")
	var st e2ee.State
	require.NoError(t, json.Unmarshal(next.Checkpoint, &st))
	assert.False(t, st.NeedsFallbackKey(sc), "the failed response's fallback report is not in the state")
	assert.JSONEq(t, string(first.Checkpoint), string(next.Checkpoint))
}

// A consumer with nothing to write leaves the commit's transaction alone (no Step.Commit), so
// a response that only repeats what is known commits nothing but pos; news is written.
func TestConsumerWithNothingToWriteLeavesTheTransactionAlone(t *testing.T) {
	c := &stepConsumer{}
	exts, release, err := e2ee.New("@skip:x", "DEV", e2ee.Config{Consumer: c})
	require.NoError(t, err)
	defer release()
	ext := exts[0]
	info := slidingsync.RequestInfo{Protocol: slidingsync.ProtocolMSC4186}
	cycle := func(raw string) (written bool) {
		step := process(t, ext, info, raw)
		commit(t, step)
		info.Pos, info.Checkpoint = "1", step.Checkpoint
		return step.Commit != nil
	}

	// The first response after a start is a gap (every tracked user outdated): written.
	assert.True(t, cycle(`{"device_one_time_keys_count":{"signed_curve25519":50}}`))
	c.handled, c.written, c.committed = nil, nil, nil

	assert.False(t, cycle(""), "no e2ee section: nothing to write")
	assert.False(t, cycle(`{"device_unused_fallback_key_types":["signed_curve25519"]}`), "only fallback key types")
	assert.True(t, cycle(`{"device_lists":{"changed":["@u:x"]}}`), "a device-list change is written")
	require.Len(t, c.written, 1)
	assert.Equal(t, []*e2ee.Delta{nil, nil, c.written[0]}, c.committed, "only the written delta is reported")
	require.Len(t, c.handled, 3, "the consumer is asked about every response")
}
