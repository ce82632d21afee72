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
