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
	a, err := e2ee.NewE2EE("@claim:x", "DEV", e2ee.Config{Consumer: c})
	require.NoError(t, err)
	_, err = e2ee.NewE2EE("@claim:x", "DEV", e2ee.Config{Consumer: c})
	require.ErrorIs(t, err, e2ee.ErrDeviceAlreadyClaimed)
	other, err := e2ee.NewE2EE("@claim:x", "DEV2", e2ee.Config{Consumer: c})
	require.NoError(t, err, "another device of the same user is independent")
	require.NoError(t, other.Close())

	td, err := e2ee.NewToDevice("@claim:x", "DEV", e2ee.ToDeviceConfig{Handler: (&recHandler{}).handle})
	require.NoError(t, err, "to_device is claimed on its own")
	_, err = e2ee.NewToDevice("@claim:x", "DEV", e2ee.ToDeviceConfig{Handler: (&recHandler{}).handle})
	require.ErrorIs(t, err, e2ee.ErrDeviceAlreadyClaimed)

	require.NoError(t, a.Close())
	require.NoError(t, a.Close(), "Close is idempotent")
	again, err := e2ee.NewE2EE("@claim:x", "DEV", e2ee.Config{Consumer: c})
	require.NoError(t, err, "Close releases the claim")
	require.NoError(t, again.Close())
	require.NoError(t, td.Close())

	_, err = e2ee.NewE2EE("@claim:x", "DEV", e2ee.Config{})
	require.Error(t, err, "a consumer is required")
	_, err = e2ee.NewToDevice("@claim:x", "DEV", e2ee.ToDeviceConfig{})
	require.Error(t, err, "a handler is required")
	_, err = e2ee.NewE2EE("", "DEV", e2ee.Config{Consumer: c})
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
		require.NoError(t, h.e2ee.Close())

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

// deltaConsumer is a DeltaConsumer that records the deltas HandleE2EE received and those the
// commits reported.
type deltaConsumer struct {
	handled   []*e2ee.Delta
	committed []*e2ee.Delta
	plain     int // E2EECommitted calls
}

func (c *deltaConsumer) HandleE2EE(_ context.Context, d *e2ee.Delta) error {
	c.handled = append(c.handled, d)
	return nil
}

func (c *deltaConsumer) E2EECommitted(context.Context, e2ee.State) { c.plain++ }

func (c *deltaConsumer) E2EEDeltaCommitted(_ context.Context, _ e2ee.State, d *e2ee.Delta) {
	c.committed = append(c.committed, d)
}

// A DeltaConsumer learns which delta each commit carried: the one its HandleE2EE received in
// that commit's transaction, nil for a commit without one, never one whose commit failed.
func TestDeltaConsumerGetsTheCommittedDelta(t *testing.T) {
	ctx := context.Background()
	c := &deltaConsumer{}
	ext, err := e2ee.NewE2EE("@delta:x", "DEV", e2ee.Config{Consumer: c})
	require.NoError(t, err)
	defer ext.Close()
	info := slidingsync.RequestInfo{Protocol: slidingsync.ProtocolMSC4186}
	require.NoError(t, ext.Restore(ctx, nil))

	require.NoError(t, ext.Process(ctx, info, []byte(`{"device_unused_fallback_key_types":["signed_curve25519"]}`)))
	require.NoError(t, ext.CommitTxn(ctx))
	ext.AfterCommit(ctx)
	require.Len(t, c.handled, 1)
	assert.Equal(t, []*e2ee.Delta{c.handled[0]}, c.committed)
	checkpoint, err := ext.Checkpoint(ctx)
	require.NoError(t, err)

	// A commit that fails after HandleE2EE: the connection restores the extension and
	// processes the next response, which carries nothing.
	info.Pos = "1"
	require.NoError(t, ext.Process(ctx, info, []byte(`{"device_unused_fallback_key_types":[]}`)))
	require.NoError(t, ext.CommitTxn(ctx))
	require.NoError(t, ext.Restore(ctx, checkpoint))
	require.NoError(t, ext.Process(ctx, info, nil))
	require.NoError(t, ext.CommitTxn(ctx))
	ext.AfterCommit(ctx)
	require.Len(t, c.handled, 2)
	require.Len(t, c.committed, 2)
	assert.Nil(t, c.committed[1], "the failed commit's delta is not reported")
	assert.Zero(t, c.plain, "E2EECommitted is not called for a DeltaConsumer")
}

// skippingConsumer is a deltaConsumer that says it has nothing to write for deltas that only
// repeat fallback key types.
type skippingConsumer struct{ deltaConsumer }

func (c *skippingConsumer) NeedsHandle(d *e2ee.Delta) bool {
	return d.Gap || len(d.Changed) > 0 || len(d.Left) > 0
}

// The extension leaves the commit's transaction alone when the response has no delta or its
// SkippingConsumer has nothing to write; a delta left out is not reported as committed.
func TestSkipTxn(t *testing.T) {
	ctx := context.Background()
	c := &skippingConsumer{}
	ext, err := e2ee.NewE2EE("@skip:x", "DEV", e2ee.Config{Consumer: c})
	require.NoError(t, err)
	defer ext.Close()
	info := slidingsync.RequestInfo{Protocol: slidingsync.ProtocolMSC4186, Pos: "1"}
	require.NoError(t, ext.Restore(ctx, nil))
	cycle := func(raw string) (skipped bool) {
		var body json.RawMessage
		if raw != "" {
			body = json.RawMessage(raw)
		}
		require.NoError(t, ext.Process(ctx, info, body))
		skipped = ext.SkipTxn()
		if !skipped {
			require.NoError(t, ext.CommitTxn(ctx))
		}
		ext.AfterCommit(ctx)
		return skipped
	}

	// The first response after a start is a gap (every tracked user outdated): written.
	assert.False(t, cycle(`{"device_one_time_keys_count":{"signed_curve25519":50}}`))
	c.handled, c.committed = nil, nil

	assert.True(t, cycle(""), "no e2ee section: nothing to write")
	assert.True(t, cycle(`{"device_unused_fallback_key_types":["signed_curve25519"]}`), "only fallback key types")
	assert.False(t, cycle(`{"device_lists":{"changed":["@u:x"]}}`), "a device-list change is written")
	require.Len(t, c.handled, 1)
	assert.Equal(t, []*e2ee.Delta{nil, nil, c.handled[0]}, c.committed, "only the handled delta is reported")

	// A consumer that cannot tell is always called.
	plain := &deltaConsumer{}
	ext2, err := e2ee.NewE2EE("@skip2:x", "DEV", e2ee.Config{Consumer: plain})
	require.NoError(t, err)
	defer ext2.Close()
	require.NoError(t, ext2.Restore(ctx, nil))
	require.NoError(t, ext2.Process(ctx, info, []byte(`{"device_unused_fallback_key_types":["signed_curve25519"]}`)))
	assert.False(t, ext2.SkipTxn())
}
