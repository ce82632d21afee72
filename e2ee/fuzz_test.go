package e2ee

import (
	"context"
	"encoding/json"
	"errors"
	"slices"
	"testing"

	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"

	"github.com/sliding-e2ee/sdk/slidingsync"
)

// FuzzMerge decodes an arbitrary e2ee section and merges it into an arbitrary prior state. It
// checks that nothing panics, that a decoding error wraps ErrInvalidResponse, that merging is
// idempotent on the state, that a present field always becomes known and an absent one leaves
// the state as it was, and that the state survives its checkpoint encoding.
func FuzzMerge(f *testing.F) {
	f.Add([]byte(`{"device_one_time_keys_count":{"signed_curve25519":0},"device_unused_fallback_key_types":[]}`), []byte(`{}`), true)
	f.Add([]byte(`{"device_lists":{"changed":["@a:x"],"left":["@b:x"]}}`), []byte(`{"active":true,"otk_counts_known":true,"otk_counts":{"signed_curve25519":5}}`), false)
	f.Add([]byte(`{"device_unused_fallback_key_types":null,"device_one_time_keys_count":null}`), []byte(`{"active":true,"fallback_key_types_known":true,"fallback_key_types":["signed_curve25519"]}`), false)
	f.Add([]byte(`{"device_one_time_keys_count":{"":1,"x":-3}}`), []byte(`null`), false)
	f.Add([]byte(`[]`), []byte(`{}`), false)
	f.Add([]byte(`{"device_one_time_keys_count":{"signed_curve25519":9223372036854775807,"a b":1},"device_lists":{"changed":["@:x","@a\u0000:x"],"left":[null]}}`), []byte(`{}`), false)
	ctx := zerolog.Nop().WithContext(context.Background())
	f.Fuzz(func(t *testing.T, section, prior []byte, initial bool) {
		var old State
		if json.Unmarshal(prior, &old) != nil {
			old = State{}
		}
		resp, err := decodeResponse(ctx, section)
		if err != nil {
			require.True(t, errors.Is(err, slidingsync.ErrInvalidResponse), "%v", err)
			return
		}
		info := initial
		before := old.clone()
		once, d1 := Merge(old, resp, info)
		require.True(t, before.equal(old), "Merge modified its input")
		twice, d2 := Merge(once, resp, info)
		require.True(t, once.equal(twice), "not idempotent: %+v then %+v", once, twice)
		require.Equal(t, d1.Changed, d2.Changed)
		require.Equal(t, d1.Left, d2.Left)
		require.Equal(t, d1.OTKCounts, d2.OTKCounts)
		require.Equal(t, d1.FallbackKeyTypes, d2.FallbackKeyTypes)
		require.True(t, once.Active)
		require.Equal(t, initial || !old.Active, d1.Gap)
		if resp != nil && resp.DeviceOneTimeKeysCount.HasValue() {
			require.True(t, once.OTKCountsKnown)
			require.LessOrEqual(t, len(once.OTKCounts), maxKeyAlgorithms)
			for alg, n := range once.OTKCounts {
				require.GreaterOrEqual(t, n, 0)
				require.LessOrEqual(t, n, maxOneTimeKeyCount)
				require.True(t, validAlgorithm(alg), "%q", alg)
			}
		} else {
			require.Equal(t, old.OTKCountsKnown, once.OTKCountsKnown)
			require.False(t, d1.OTKCounts.Set)
		}
		if resp != nil && resp.DeviceUnusedFallbackKeyTypes.HasValue() {
			require.True(t, once.FallbackKeyTypesKnown)
			require.True(t, d1.FallbackKeyTypes.Set)
			require.NotNil(t, d1.FallbackKeyTypes.Val, "present and empty must stay distinguishable")
			require.LessOrEqual(t, len(once.FallbackKeyTypes), maxKeyAlgorithms)
		} else {
			require.Equal(t, old.FallbackKeyTypesKnown, once.FallbackKeyTypesKnown)
			require.True(t, slices.Equal(old.FallbackKeyTypes, once.FallbackKeyTypes))
		}
		for _, u := range d1.Left {
			require.NotContains(t, d1.Changed, u)
			require.True(t, validUser(u), "%q", u)
		}
		for _, u := range d1.Changed {
			require.True(t, validUser(u), "%q", u)
		}
		raw, err := json.Marshal(once)
		require.NoError(t, err)
		var back State
		require.NoError(t, json.Unmarshal(raw, &back))
		require.True(t, normalize(once).equal(normalize(back)), "checkpoint round trip: %s", raw)
	})
}
