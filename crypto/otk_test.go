package crypto

import (
	"context"
	"encoding/json"
	"errors"
	"testing"
	"testing/synctest"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/crypto/signatures"
	"maunium.net/go/mautrix/id"

	"github.com/sliding-e2ee/sdk/e2ee"
	"github.com/sliding-e2ee/sdk/slidingsync"
)

type uploadBody struct {
	DeviceKeys   json.RawMessage            `json:"device_keys"`
	OneTimeKeys  map[string]json.RawMessage `json:"one_time_keys"`
	FallbackKeys map[string]json.RawMessage `json:"fallback_keys"`
}

func decodeUpload(t *testing.T, raw json.RawMessage) uploadBody {
	t.Helper()
	var b uploadBody
	require.NoError(t, json.Unmarshal(raw, &b))
	return b
}

// verifySigned checks that a signed key object carries a valid signature of the bot device.
func (e *env) verifySigned(raw json.RawMessage) {
	e.t.Helper()
	ok, err := signatures.VerifySignatureJSON(raw, testUser, testDevice.String(), e.olm.OwnIdentity().SigningKey)
	require.NoError(e.t, err)
	assert.True(e.t, ok, "signature of %s", raw)
}

func counts(n int) e2ee.State {
	return e2ee.State{Active: true, OTKCountsKnown: true, OTKCounts: map[id.KeyAlgorithm]int{id.KeyAlgorithmSignedCurve25519: n}}
}

func TestNewDeviceUploadsSignedKeysWithoutCounts(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, Config{})
	e.m.committed(e2ee.State{Active: true}, nil)
	require.NoError(t, e.m.shareKeys(ctx))
	uploads, _ := e.hs.snapshot()
	require.Equal(t, 1, len(uploads))
	b := decodeUpload(t, uploads[0])
	require.NotEmpty(t, b.DeviceKeys)
	e.verifySigned(b.DeviceKeys)
	assert.Len(t, b.OneTimeKeys, 50)
	for _, k := range b.OneTimeKeys {
		e.verifySigned(k)
	}

	// Responses without counts never cause an upload.
	for range 3 {
		e.m.committed(e2ee.State{Active: true}, nil)
		require.NoError(t, e.m.shareKeys(ctx))
	}
	uploads, _ = e.hs.snapshot()
	assert.Equal(t, 1, len(uploads))
}

func TestEmptyCountsTopUpOnce(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, Config{})
	// The server reports 50 keys although it holds none: only the device keys go up.
	e.m.committed(counts(50), nil)
	require.NoError(t, e.m.shareKeys(ctx))
	uploads, _ := e.hs.snapshot()
	require.Equal(t, 1, len(uploads))
	assert.Empty(t, decodeUpload(t, uploads[0]).OneTimeKeys)

	// {} means every algorithm counts 0, reported five times (stale repetitions).
	for range 5 {
		e.m.committed(e2ee.State{Active: true, OTKCountsKnown: true, OTKCounts: map[id.KeyAlgorithm]int{}}, nil)
		require.NoError(t, e.m.shareKeys(ctx))
	}
	uploads, _ = e.hs.snapshot()
	require.Equal(t, 2, len(uploads))
	b := decodeUpload(t, uploads[1])
	assert.Empty(t, b.DeviceKeys)
	assert.Len(t, b.OneTimeKeys, 50)
	for _, k := range b.OneTimeKeys {
		e.verifySigned(k)
	}
	held, _, _ := e.hs.srv.KeyCounts(testUser, testDevice)
	assert.Equal(t, 50, held, "the server never holds more keys than the account keeps half of")

	// A count at the threshold uploads nothing.
	e.m.committed(counts(50), nil)
	require.NoError(t, e.m.shareKeys(ctx))
	uploads, _ = e.hs.snapshot()
	assert.Equal(t, 2, len(uploads))
}

// An upload that the server stored but whose answer was lost (a timeout) is retried with the
// very same keys, for a new device and for a top-up: the server never gets a key ID twice with
// different keys, nor more keys than the account keeps.
func TestRetriedUploadSendsIdenticalKeys(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, Config{DisableFallbackKeys: true})
	otkSet := func(raw json.RawMessage) map[string]string {
		out := map[string]string{}
		for k, v := range decodeUpload(t, raw).OneTimeKeys {
			out[k] = string(v)
		}
		return out
	}

	e.hs.failUploads = 1
	e.m.committed(counts(0), nil)
	require.Error(t, e.m.shareKeys(ctx))
	require.NoError(t, e.m.shareKeys(ctx))
	uploads, _ := e.hs.snapshot()
	require.Len(t, uploads, 2)
	assert.Len(t, otkSet(uploads[0]), 50)
	assert.Equal(t, otkSet(uploads[0]), otkSet(uploads[1]), "the retry of the first upload")

	// 40 keys are claimed; the top-up times out after the server stored it.
	for range 40 {
		_, err := e.cli.ClaimKeys(ctx, &mautrix.ReqClaimKeys{OneTimeKeys: mautrix.OneTimeKeysRequest{testUser: {testDevice: id.KeyAlgorithmSignedCurve25519}}})
		require.NoError(t, err)
	}
	e.hs.mu.Lock()
	e.hs.failUploads = 1
	e.hs.mu.Unlock()
	e.m.committed(counts(10), nil)
	require.Error(t, e.m.shareKeys(ctx))
	require.NoError(t, e.m.shareKeys(ctx))
	// Later reports of the old count change nothing.
	e.m.committed(counts(10), nil)
	require.NoError(t, e.m.shareKeys(ctx))
	uploads, _ = e.hs.snapshot()
	require.Len(t, uploads, 4)
	assert.Len(t, otkSet(uploads[2]), 40)
	assert.Equal(t, otkSet(uploads[2]), otkSet(uploads[3]), "the retry of the top-up")
	for _, k := range decodeUpload(t, uploads[3]).OneTimeKeys {
		e.verifySigned(k)
	}
	assert.Zero(t, e.hs.srv.UploadRejections(), "no key ID came again with another key")
	held, _, _ := e.hs.srv.KeyCounts(testUser, testDevice)
	assert.Equal(t, 50, held)
}

// Run uploads the keys of a new device and queries outdated users, retrying a failed query
// with backoff, and returns after its work stopped.
func TestRunRetriesWithBackoff(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ctx, cancel := context.WithCancelCause(context.Background())
		e := newEnv(t, Config{MinRetryDelay: time.Second, MaxRetryDelay: 4 * time.Second})
		e.track(alice)
		require.NoError(t, e.m.record(ctx, &e2ee.Delta{Changed: []id.UserID{alice}}))
		e.hs.failQueries = 3

		done := make(chan error, 1)
		go func() { done <- e.m.Run(ctx) }()
		e.m.committed(e2ee.State{Active: true}, nil)
		synctest.Wait()
		start := time.Now()
		_, queries := e.hs.snapshot()
		assert.Len(t, queries, 1)

		time.Sleep(time.Second) // fake time: first retry
		synctest.Wait()
		_, queries = e.hs.snapshot()
		assert.Len(t, queries, 2)
		time.Sleep(2 * time.Second)
		synctest.Wait()
		_, queries = e.hs.snapshot()
		assert.Len(t, queries, 3)
		time.Sleep(4 * time.Second)
		synctest.Wait()
		_, queries = e.hs.snapshot()
		assert.Len(t, queries, 4)
		assert.Equal(t, 7*time.Second, time.Since(start))
		assert.Empty(t, e.outdated())

		require.ErrorIs(t, e.m.Run(ctx), slidingsync.ErrAlreadyRunning)
		errStop := errors.New("stop")
		cancel(errStop)
		require.ErrorIs(t, <-done, errStop)
		uploads, _ := e.hs.snapshot()
		require.Equal(t, 2, len(uploads), "device and one-time keys, then the fallback key")
		assert.NotEmpty(t, decodeUpload(t, uploads[1]).FallbackKeys)
		require.NoError(t, e.db.Close())
	})
}

// KeysUploaded is closed by the first upload of a new device, and at once for a device whose
// keys are already on the server.
func TestKeysUploaded(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, Config{DisableFallbackKeys: true})
	select {
	case <-e.m.KeysUploaded():
		t.Fatal("closed before any upload")
	default:
	}
	require.NoError(t, e.m.shareKeys(ctx))
	select {
	case <-e.m.KeysUploaded():
	default:
		t.Fatal("still open after the upload")
	}
	again, err := New(e.cli, e.olm, Config{DisableFallbackKeys: true})
	require.NoError(t, err)
	select {
	case <-again.KeysUploaded():
	default:
		t.Fatal("a Machine for a device set up earlier waits for nothing")
	}
}

// respond hands the Machine one committed response: the e2ee state st, and a delta that
// carries st's counts when carried is set.
func (e *env) respond(st e2ee.State, carried bool) {
	e.t.Helper()
	ctx := context.Background()
	d := &e2ee.Delta{}
	if carried {
		d.OTKCounts = slidingsync.Some(st.OTKCounts)
	}
	step := e.m.HandleE2EE(ctx, st, d)
	if step.Commit != nil {
		require.NoError(e.t, step.Commit(ctx))
	}
	step.After(ctx)
}

func (e *env) countChecks() int {
	e.hs.mu.Lock()
	defer e.hs.mu.Unlock()
	return e.hs.countChecks
}

// The MSC3575 proxy over Dendrite sends counts only when they change and never a count of 0
// (Dendrite leaves the map out once no key is left), so after every key was claimed the
// responses keep coming without counts. Run asks the server once the last count is
// Config.KeyCountCheck old, tops up from the answer, and asks again one period later only.
func TestCountCheckTopsUpKeysThatRanOutUnreportedLikeProxyOverDendrite(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		e := newEnv(t, Config{DisableFallbackKeys: true})
		done := make(chan error, 1)
		go func() { done <- e.m.Run(ctx) }()
		synctest.Wait() // the first upload of the device
		e.respond(counts(50), true)
		synctest.Wait()
		e.claimAll()

		// Idle long-polls without counts, 30 s apart: the last count (50) is trusted for a
		// minute after it came.
		e.respond(counts(50), false)
		synctest.Wait()
		time.Sleep(30 * time.Second)
		e.respond(counts(50), false)
		synctest.Wait()
		held, _, _ := e.hs.srv.KeyCounts(testUser, testDevice)
		assert.Zero(t, held, "no check before the last count is a minute old")
		assert.Zero(t, e.countChecks())

		time.Sleep(30 * time.Second)
		synctest.Wait()
		assert.Equal(t, 1, e.countChecks(), "one empty /keys/upload once the count is a minute old")
		held, _, _ = e.hs.srv.KeyCounts(testUser, testDevice)
		assert.Equal(t, 50, held, "topped up from the server's answer")
		uploads, _ := e.hs.snapshot()
		require.Len(t, uploads, 2)
		assert.Len(t, decodeUpload(t, uploads[1]).OneTimeKeys, 50)

		// Still no counts: the next check comes a minute after this one, not at once.
		e.respond(counts(50), false)
		synctest.Wait()
		time.Sleep(59 * time.Second)
		synctest.Wait()
		assert.Equal(t, 1, e.countChecks())
		time.Sleep(time.Second)
		synctest.Wait()
		assert.Equal(t, 2, e.countChecks())
		uploads, _ = e.hs.snapshot()
		assert.Len(t, uploads, 2, "the server holds 50: nothing to upload")

		// No responses (a connection that is down): no more checks.
		time.Sleep(10 * time.Minute)
		synctest.Wait()
		assert.Equal(t, 2, e.countChecks())
		cancel()
		require.ErrorIs(t, <-done, context.Canceled)
	})
}

// Synapse sends the counts in every response, so they are never checked; nor are they with
// the check turned off.
func TestCountCheckNeverRunsWhenCountsComeInEveryResponseLikeSynapse(t *testing.T) {
	for name, tc := range map[string]struct {
		cfg     Config
		carried bool
	}{
		"counts in every response": {Config{DisableFallbackKeys: true}, true},
		"check turned off":         {Config{DisableFallbackKeys: true, KeyCountCheck: -1}, false},
	} {
		t.Run(name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				ctx, cancel := context.WithCancel(context.Background())
				e := newEnv(t, tc.cfg)
				done := make(chan error, 1)
				go func() { done <- e.m.Run(ctx) }()
				synctest.Wait() // the first upload of the device
				for range 20 {
					e.respond(counts(50), tc.carried)
					time.Sleep(30 * time.Second)
					synctest.Wait()
				}
				assert.Zero(t, e.countChecks())
				uploads, _ := e.hs.snapshot()
				assert.Len(t, uploads, 1, "the device's first upload only")
				cancel()
				require.ErrorIs(t, <-done, context.Canceled)
			})
		})
	}
}
