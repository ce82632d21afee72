package dendritetest_test

import (
	"context"
	"encoding/json"
	"net/http"
	"path/filepath"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"maunium.net/go/mautrix"
	mcrypto "maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/sliding-e2ee/sdk/internal/dendritetest"
	"github.com/sliding-e2ee/sdk/slidingsync/sqlstore/dbopen"
)

// rawSync is one v2 /sync: the decoded response and its top-level keys as sent.
type rawSync struct {
	resp mautrix.RespSync
	keys map[string]json.RawMessage
}

// syncUntil syncs from since (with a 1 s long-poll) until cond holds for a response, and
// returns that response. Dendrite applies writes to its sync stream asynchronously, so what a
// request just did may take a moment to show.
func syncUntil(t *testing.T, ctx context.Context, cli *mautrix.Client, since string, what string, cond func(rawSync) bool) rawSync {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		s := syncV2(t, ctx, cli, since, 1000)
		if cond(s) {
			return s
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: no sync of %s showed %s within 20 s", cli.UserID, what, what)
		}
		if since != "" {
			since = s.resp.NextBatch
		}
	}
}

func syncV2(t *testing.T, ctx context.Context, cli *mautrix.Client, since string, timeoutMS int) rawSync {
	t.Helper()
	query := map[string]string{"timeout": strconv.Itoa(timeoutMS)}
	if since != "" {
		query["since"] = since
	}
	body, err := cli.MakeFullRequest(ctx, mautrix.FullRequest{
		Method: http.MethodGet,
		URL:    cli.BuildURLWithQuery(mautrix.ClientURLPath{"v3", "sync"}, query),
	})
	require.NoError(t, err)
	var out rawSync
	require.NoError(t, json.Unmarshal(body, &out.resp))
	require.NoError(t, json.Unmarshal(body, &out.keys))
	return out
}

func TestEncryptedRoomKeysAndSync(t *testing.T) {
	start := time.Now()
	srv := dendritetest.Start(t)
	t.Logf("dendrite started in %s at %s", time.Since(start).Round(time.Millisecond), srv.URL)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	alice := srv.Register(t, "alice")
	bob := srv.Register(t, "bob")
	require.Equal(t, id.UserID("@alice:localhost"), alice.UserID)
	require.NotEmpty(t, alice.DeviceID)
	require.NotEmpty(t, alice.AccessToken)

	room, err := alice.CreateRoom(ctx, &mautrix.ReqCreateRoom{
		Preset: "private_chat",
		Invite: []id.UserID{bob.UserID},
		InitialState: []*event.Event{{
			Type:    event.StateEncryption,
			Content: event.Content{Parsed: &event.EncryptionEventContent{Algorithm: id.AlgorithmMegolmV1}},
		}},
	})
	require.NoError(t, err)
	_, err = bob.JoinRoomByID(ctx, room.RoomID)
	require.NoError(t, err)

	bobInitial := syncUntil(t, ctx, bob, "", "the room", func(s rawSync) bool {
		return s.resp.Rooms.Join[room.RoomID] != nil
	})
	enc := false
	for _, ev := range bobInitial.resp.Rooms.Join[room.RoomID].State.Events {
		enc = enc || ev.Type == event.StateEncryption
	}
	for _, ev := range bobInitial.resp.Rooms.Join[room.RoomID].Timeline.Events {
		enc = enc || ev.Type == event.StateEncryption
	}
	assert.True(t, enc, "bob's initial sync carries m.room.encryption")
	aliceInitial := syncV2(t, ctx, alice, "", 0)

	// Alice's device keys and one-time keys, uploaded by mautrix's OlmMachine (goolm) on a
	// SQLite crypto store.
	db, err := dbopen.Open(filepath.Join(t.TempDir(), "alice-crypto.db"), dbopen.Config{})
	require.NoError(t, err)
	t.Cleanup(func() { _ = db.Close() })
	store := mcrypto.NewSQLCryptoStore(db, nil, alice.UserID.String(), alice.DeviceID, []byte("pickle key"))
	require.NoError(t, store.DB.Upgrade(ctx))
	log := zerolog.Nop()
	mach := mcrypto.NewOlmMachine(alice, &log, store, mautrix.NewMemoryStateStore().(mcrypto.StateStore))
	require.NoError(t, mach.Load(ctx))
	require.NoError(t, mach.ShareKeys(ctx, 0)) // 0 known keys: mautrix uploads 50 OTKs

	// A fallback key, which Dendrite v0.13.8 does not implement: it accepts the upload and
	// never reports device_unused_fallback_key_types.
	_, err = alice.MakeRequest(ctx, http.MethodPost, alice.BuildClientURL("v3", "keys", "upload"), map[string]any{
		"fallback_keys": map[string]any{
			"signed_curve25519:AAAAFB": map[string]any{"key": "fallbackfallbackfallbackfallbackfallbackfal", "fallback": true},
		},
	}, nil)
	require.NoError(t, err)

	aliceAfterUpload := syncUntil(t, ctx, alice, aliceInitial.resp.NextBatch, "an OTK count", func(s rawSync) bool {
		return s.resp.DeviceOTKCount.SignedCurve25519 > 0
	})
	uploaded := aliceAfterUpload.resp.DeviceOTKCount.SignedCurve25519
	assert.Equal(t, 50, uploaded, "the fallback key is not counted as an OTK")
	assert.Contains(t, aliceAfterUpload.resp.DeviceLists.Changed, alice.UserID, "a user's own key upload is in her device_lists.changed")

	keys, err := bob.QueryKeys(ctx, &mautrix.ReqQueryKeys{DeviceKeys: mautrix.DeviceKeysRequest{alice.UserID: {}}})
	require.NoError(t, err)
	require.Contains(t, keys.DeviceKeys[alice.UserID], alice.DeviceID, "bob sees alice's device")
	assert.Equal(t, alice.DeviceID, keys.DeviceKeys[alice.UserID][alice.DeviceID].DeviceID)

	claim, err := bob.ClaimKeys(ctx, &mautrix.ReqClaimKeys{OneTimeKeys: mautrix.OneTimeKeysRequest{
		alice.UserID: {alice.DeviceID: id.KeyAlgorithmSignedCurve25519},
	}})
	require.NoError(t, err)
	require.Len(t, claim.OneTimeKeys[alice.UserID][alice.DeviceID], 1, "bob claimed one of alice's OTKs")

	bobAfter := syncUntil(t, ctx, bob, bobInitial.resp.NextBatch, "alice's device list change", func(s rawSync) bool {
		return slices.Contains(s.resp.DeviceLists.Changed, alice.UserID)
	})
	aliceAfterClaim := syncUntil(t, ctx, alice, aliceAfterUpload.resp.NextBatch, "one OTK fewer", func(s rawSync) bool {
		return s.resp.DeviceOTKCount.SignedCurve25519 == uploaded-1
	})

	// Claiming the other 49 exhausts the OTKs: the count then disappears from /sync instead
	// of saying 0, and a further claim gets nothing (the uploaded fallback key is not served).
	claimOne := func() int {
		res, err := bob.ClaimKeys(ctx, &mautrix.ReqClaimKeys{OneTimeKeys: mautrix.OneTimeKeysRequest{
			alice.UserID: {alice.DeviceID: id.KeyAlgorithmSignedCurve25519},
		}})
		require.NoError(t, err)
		return len(res.OneTimeKeys[alice.UserID][alice.DeviceID])
	}
	for i := 1; i < uploaded; i++ {
		require.Equal(t, 1, claimOne(), "claim %d", i+1)
	}
	assert.Zero(t, claimOne(), "nothing left to claim, no fallback key served")
	aliceExhausted := syncUntil(t, ctx, alice, aliceAfterClaim.resp.NextBatch, "no OTK count", func(s rawSync) bool {
		_, has := s.keys["device_one_time_keys_count"]
		return !has
	})

	// The recorded facts (see the package documentation).
	for _, c := range []struct {
		name     string
		s        rawSync
		hasCount bool // device_one_time_keys_count is sent only while the device has OTKs
	}{
		{"bob initial (no keys)", bobInitial, false},
		{"alice initial (no keys)", aliceInitial, false},
		{"alice after upload", aliceAfterUpload, true},
		{"bob after alice's upload (no keys)", bobAfter, false},
		{"alice after claim", aliceAfterClaim, true},
		{"alice with all OTKs claimed", aliceExhausted, false},
	} {
		_, hasCount := c.s.keys["device_one_time_keys_count"]
		_, hasFallback := c.s.keys["device_unused_fallback_key_types"]
		t.Logf("%s: device_one_time_keys_count=%s device_unused_fallback_key_types present=%v device_lists=%s",
			c.name, c.s.keys["device_one_time_keys_count"], hasFallback, c.s.keys["device_lists"])
		assert.Equal(t, c.hasCount, hasCount, "%s: device_one_time_keys_count present", c.name)
		assert.False(t, hasFallback, "%s: Dendrite never sends device_unused_fallback_key_types", c.name)
	}
	t.Logf("test body took %s", time.Since(start).Round(time.Millisecond))
}
