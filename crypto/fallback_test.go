package crypto

import (
	"context"
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	goolmaccount "maunium.net/go/mautrix/crypto/goolm/account"
	"maunium.net/go/mautrix/id"

	"github.com/sliding-e2ee/sdk/e2ee"
	"github.com/sliding-e2ee/sdk/slidingsync"
	"github.com/sliding-e2ee/sdk/slidingsync/slidingsynctest"
)

func fallbackTypes(types ...id.KeyAlgorithm) *e2ee.Delta {
	if types == nil {
		types = []id.KeyAlgorithm{}
	}
	return &e2ee.Delta{FallbackKeyTypes: slidingsync.Some(types)}
}

// fallbackUploads returns the fallback_keys of every upload that carried one.
func (e *env) fallbackUploads() []map[string]json.RawMessage {
	uploads, _ := e.hs.snapshot()
	var out []map[string]json.RawMessage
	for _, u := range uploads {
		if b := decodeUpload(e.t, u); len(b.FallbackKeys) > 0 {
			out = append(out, b.FallbackKeys)
		}
	}
	return out
}

// setUp runs the first setup of the device: device keys, one-time keys, a fallback key.
func (e *env) setUp(ctx context.Context) {
	e.t.Helper()
	require.NoError(e.t, e.m.shareKeys(ctx))
	_, err := e.m.fallbackWork(ctx)
	require.NoError(e.t, err)
	require.Len(e.t, e.fallbackUploads(), 1)
}

func TestFallbackKeyIsSignedAndUploadedOnFirstSetup(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, Config{})
	e.setUp(ctx)
	fk := e.fallbackUploads()[0]
	require.Len(t, fk, 1)
	for keyID, raw := range fk {
		assert.True(t, strings.HasPrefix(keyID, "signed_curve25519:"), keyID)
		var key struct {
			Key      id.Curve25519 `json:"key"`
			Fallback bool          `json:"fallback"`
		}
		require.NoError(t, json.Unmarshal(raw, &key))
		assert.True(t, key.Fallback)
		assert.Equal(t, e.m.goolm.FallbackKey()[strings.TrimPrefix(keyID, "signed_curve25519:")], key.Key)
		e.verifySigned(raw)
	}
}

// Servers that never send the fallback key types (Dendrite, continuwuity) get the key of the
// first setup and never another one.
func TestNoFallbackChurnWithoutTheField(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, Config{})
	e.setUp(ctx)
	for range 5 {
		require.NoError(t, e.m.record(ctx, &e2ee.Delta{Changed: []id.UserID{alice}}))
		e.m.committed(e2ee.State{Active: true}, nil)
		_, _, err := e.m.work(ctx)
		require.NoError(t, err)
	}
	assert.Len(t, e.fallbackUploads(), 1)
}

// [] reported on five responses in a row (the server's reports lag behind the upload) rotates
// the key once.
func TestUsedFallbackKeyRotatesOnce(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ctx := context.Background()
		e := newEnv(t, Config{FallbackKeyRotation: 10 * time.Minute})
		defer e.db.Close()
		e.setUp(ctx)
		first := e.fallbackUploads()[0]
		time.Sleep(time.Hour)
		for range 5 {
			require.NoError(t, e.m.record(ctx, fallbackTypes()))
			_, _, err := e.m.work(ctx)
			require.NoError(t, err)
		}
		fks := e.fallbackUploads()
		require.Len(t, fks, 2)
		assert.NotEqual(t, first, fks[1])
		for _, raw := range fks[1] {
			e.verifySigned(raw)
		}

		// The server lists the key as unused again: nothing is pending any more.
		require.NoError(t, e.m.record(ctx, fallbackTypes(id.KeyAlgorithmSignedCurve25519)))
		row, err := e.m.loadFallback(ctx)
		require.NoError(t, err)
		assert.False(t, row.pending)
		assert.True(t, row.uploaded)
	})
}

// Right after an upload, stale reports of [] do not rotate the key: the rotation waits for
// FallbackKeyRotation, and a report that lists the key again cancels it.
func TestStaleUsedReportDoesNotRotate(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, Config{})
	e.setUp(ctx)
	for range 5 {
		require.NoError(t, e.m.record(ctx, fallbackTypes()))
		_, _, err := e.m.work(ctx)
		require.NoError(t, err)
	}
	require.NoError(t, e.m.record(ctx, fallbackTypes(id.KeyAlgorithmSignedCurve25519)))
	next, err := e.m.fallbackWork(ctx)
	require.NoError(t, err)
	assert.True(t, next.IsZero())
	assert.Len(t, e.fallbackUploads(), 1)
}

// The pending flag is written with the commit's transaction.
func TestFallbackPendingRollsBackWithTheCommit(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, Config{})
	e.setUp(ctx)
	err := e.db.DoTxn(ctx, nil, func(ctx context.Context) error {
		require.NoError(t, e.m.record(ctx, fallbackTypes()))
		return assert.AnError
	})
	require.ErrorIs(t, err, assert.AnError)
	row, err := e.m.loadFallback(ctx)
	require.NoError(t, err)
	assert.False(t, row.pending)
}

// A failed upload keeps the rotated key and uploads it on the next try, without rotating
// again.
func TestFailedFallbackUploadIsRetriedWithTheSameKey(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, Config{})
	require.NoError(t, e.m.shareKeys(ctx))
	e.cli.Client.Transport = slidingsynctest.HandlerTransport(failing{})
	_, err := e.m.fallbackWork(ctx)
	require.Error(t, err)
	key := e.m.goolm.FallbackKey()
	e.cli.Client.Transport = slidingsynctest.HandlerTransport(e.hs)
	_, err = e.m.fallbackWork(ctx)
	require.NoError(t, err)
	assert.Equal(t, key, e.m.goolm.FallbackKey())
	require.Len(t, e.fallbackUploads(), 1)
}

// A pre-key message made with the previous fallback key decrypts during the grace period,
// and no longer after it.
func TestPreviousFallbackKeyKeptForGrace(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ctx := context.Background()
		e := newEnv(t, Config{FallbackKeyRotation: 10 * time.Minute, FallbackKeyGrace: time.Hour})
		defer e.db.Close()
		e.setUp(ctx)
		oldKey := onlyKey(t, e.m.goolm.FallbackKey())

		// The key is used; a rotation within FallbackKeyRotation of the last one waits.
		require.NoError(t, e.m.record(ctx, fallbackTypes()))
		next, err := e.m.fallbackWork(ctx)
		require.NoError(t, err)
		assert.Len(t, e.fallbackUploads(), 1)
		time.Sleep(time.Until(next))
		next, err = e.m.fallbackWork(ctx)
		require.NoError(t, err)
		require.Len(t, e.fallbackUploads(), 2)
		assert.NotEqual(t, oldKey, onlyKey(t, e.m.goolm.FallbackKey()))

		assert.NoError(t, e.preKeyTo(oldKey), "the previous key decrypts during the grace period")
		time.Sleep(time.Until(next))
		_, err = e.m.fallbackWork(ctx)
		require.NoError(t, err)
		assert.Error(t, e.preKeyTo(oldKey), "the previous key is forgotten after the grace period")
		assert.NoError(t, e.preKeyTo(onlyKey(t, e.m.goolm.FallbackKey())))

		// The account was saved: a reload keeps the current key only.
		acc, err := e.store.GetAccount(ctx)
		require.NoError(t, err)
		reloaded := acc.Internal.(*goolmaccount.Account)
		assert.Equal(t, e.m.goolm.FallbackKey(), reloaded.FallbackKey())
		assert.Equal(t, uint8(1), reloaded.NumFallbackKeys)
	})
}

func onlyKey(t *testing.T, keys map[string]id.Curve25519) id.Curve25519 {
	t.Helper()
	require.Len(t, keys, 1)
	for _, k := range keys {
		return k
	}
	return ""
}

// preKeyTo makes a pre-key message from a new sender with the bot's key key and tries to
// open an inbound session with it on the bot's account.
func (e *env) preKeyTo(key id.Curve25519) error {
	e.t.Helper()
	sender, err := goolmaccount.NewAccount()
	require.NoError(e.t, err)
	_, ourIdentity, err := e.m.goolm.IdentityKeys()
	require.NoError(e.t, err)
	sess, err := sender.NewOutboundSession(ourIdentity, key)
	require.NoError(e.t, err)
	_, msg, err := sess.Encrypt([]byte("hello"))
	require.NoError(e.t, err)
	_, err = e.m.goolm.NewInboundSession(string(msg))
	return err
}

type failing struct{}

func (failing) ServeHTTP(w http.ResponseWriter, _ *http.Request) {
	w.WriteHeader(http.StatusInternalServerError)
	writeJSON(w, map[string]string{"errcode": "M_UNKNOWN", "error": "down"})
}
