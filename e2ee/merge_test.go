package e2ee

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"maunium.net/go/mautrix/id"

	"github.com/sliding-e2ee/sdk/slidingsync"
)

const (
	sc = id.KeyAlgorithmSignedCurve25519
	c2 = id.KeyAlgorithmCurve25519
)

func decode(t testing.TB, raw string) *Response {
	t.Helper()
	if raw == "" {
		return nil
	}
	resp, err := decodeResponse(context.Background(), json.RawMessage(raw))
	require.NoError(t, err)
	return resp
}

func counts(kv ...any) slidingsync.Opt[map[id.KeyAlgorithm]int] {
	m := map[id.KeyAlgorithm]int{}
	for i := 0; i < len(kv); i += 2 {
		m[kv[i].(id.KeyAlgorithm)] = kv[i+1].(int)
	}
	return slidingsync.Some(m)
}

func fallback(algs ...id.KeyAlgorithm) slidingsync.Opt[[]id.KeyAlgorithm] {
	if algs == nil {
		algs = []id.KeyAlgorithm{}
	}
	return slidingsync.Some(algs)
}

var (
	active     = State{Active: true}
	knownState = State{
		Active:         true,
		OTKCountsKnown: true, OTKCounts: map[id.KeyAlgorithm]int{sc: 50, c2: 3},
		FallbackKeyTypesKnown: true, FallbackKeyTypes: []id.KeyAlgorithm{sc},
	}
)

func TestMerge(t *testing.T) {
	tests := []struct {
		name      string
		old       State
		resp      string // e2ee section; empty means absent
		initial   bool
		wantState State
		wantDelta Delta
	}{{
		name:      "section absent leaves everything unchanged",
		old:       knownState,
		wantState: knownState,
	}, {
		name:      "empty section leaves everything unchanged",
		old:       knownState,
		resp:      `{}`,
		wantState: knownState,
	}, {
		name:      "null fields mean no change",
		old:       knownState,
		resp:      `{"device_one_time_keys_count":null,"device_unused_fallback_key_types":null,"device_lists":null}`,
		wantState: knownState,
	}, {
		name: "present count map replaces the old one and unlisted algorithms count 0",
		old:  knownState,
		resp: `{"device_one_time_keys_count":{"signed_curve25519":7}}`,
		wantState: State{Active: true, OTKCountsKnown: true, OTKCounts: map[id.KeyAlgorithm]int{sc: 7},
			FallbackKeyTypesKnown: true, FallbackKeyTypes: []id.KeyAlgorithm{sc}},
		wantDelta: Delta{OTKCounts: counts(sc, 7)},
	}, {
		name: "empty count map is known and all zero",
		old:  knownState,
		resp: `{"device_one_time_keys_count":{}}`,
		wantState: State{Active: true, OTKCountsKnown: true, OTKCounts: map[id.KeyAlgorithm]int{},
			FallbackKeyTypesKnown: true, FallbackKeyTypes: []id.KeyAlgorithm{sc}},
		wantDelta: Delta{OTKCounts: counts()},
	}, {
		name: "fallback [] means used, not absent",
		old:  knownState,
		resp: `{"device_unused_fallback_key_types":[]}`,
		wantState: State{Active: true, OTKCountsKnown: true, OTKCounts: map[id.KeyAlgorithm]int{sc: 50, c2: 3},
			FallbackKeyTypesKnown: true, FallbackKeyTypes: []id.KeyAlgorithm{}},
		wantDelta: Delta{FallbackKeyTypes: fallback()},
	}, {
		name:      "first fallback types on a fresh state",
		old:       active,
		resp:      `{"device_unused_fallback_key_types":["signed_curve25519"]}`,
		wantState: State{Active: true, FallbackKeyTypesKnown: true, FallbackKeyTypes: []id.KeyAlgorithm{sc}},
		wantDelta: Delta{FallbackKeyTypes: fallback(sc)},
	}, {
		name:      "device lists are deltas, never stored",
		old:       knownState,
		resp:      `{"device_lists":{"changed":["@a:x","@b:x","@a:x"],"left":["@c:x","@c:x"]}}`,
		wantState: knownState,
		wantDelta: Delta{Changed: []id.UserID{"@a:x", "@b:x"}, Left: []id.UserID{"@c:x"}},
	}, {
		name:      "a user in changed and left is only changed",
		old:       knownState,
		resp:      `{"device_lists":{"changed":["@a:x"],"left":["@a:x","@b:x"]}}`,
		wantState: knownState,
		wantDelta: Delta{Changed: []id.UserID{"@a:x"}, Left: []id.UserID{"@b:x"}},
	}, {
		name:      "empty device lists carry nothing",
		old:       knownState,
		resp:      `{"device_lists":{"changed":[],"left":[]}}`,
		wantState: knownState,
	}, {
		name:      "request without pos is a gap",
		old:       knownState,
		initial:   true,
		wantState: knownState,
		wantDelta: Delta{Gap: true},
	}, {
		name:      "first response on a fresh connection is a gap",
		old:       State{},
		initial:   true,
		resp:      `{"device_one_time_keys_count":{"signed_curve25519":0},"device_unused_fallback_key_types":[]}`,
		wantState: State{Active: true, OTKCountsKnown: true, OTKCounts: map[id.KeyAlgorithm]int{sc: 0}, FallbackKeyTypesKnown: true, FallbackKeyTypes: []id.KeyAlgorithm{}},
		wantDelta: Delta{Gap: true, OTKCounts: counts(sc, 0), FallbackKeyTypes: fallback()},
	}, {
		name:      "e2ee switched on mid-connection is a gap",
		old:       State{},
		resp:      `{"device_lists":{"changed":["@a:x"],"left":[]}}`,
		wantState: active,
		wantDelta: Delta{Gap: true, Changed: []id.UserID{"@a:x"}},
	}, {
		name:      "invalid entries are dropped",
		old:       active,
		resp:      `{"device_one_time_keys_count":{"signed_curve25519":-4,"":3},"device_unused_fallback_key_types":["","signed_curve25519"],"device_lists":{"changed":["nobody","@a:x",""],"left":["#room:x"]}}`,
		wantState: State{Active: true, OTKCountsKnown: true, OTKCounts: map[id.KeyAlgorithm]int{}, FallbackKeyTypesKnown: true, FallbackKeyTypes: []id.KeyAlgorithm{sc}},
		wantDelta: Delta{OTKCounts: counts(), FallbackKeyTypes: fallback(sc), Changed: []id.UserID{"@a:x"}},
	}, {
		name:      "a negative count is dropped and its algorithm counts 0",
		old:       knownState,
		resp:      `{"device_one_time_keys_count":{"signed_curve25519":-2147483648,"curve25519":4}}`,
		wantState: State{Active: true, OTKCountsKnown: true, OTKCounts: map[id.KeyAlgorithm]int{c2: 4}, FallbackKeyTypesKnown: true, FallbackKeyTypes: []id.KeyAlgorithm{sc}},
		wantDelta: Delta{OTKCounts: counts(c2, 4)},
	}, {
		name:      "an absurd count is capped",
		old:       active,
		resp:      `{"device_one_time_keys_count":{"signed_curve25519":9223372036854775807,"curve25519":10001,"x":10000}}`,
		wantState: State{Active: true, OTKCountsKnown: true, OTKCounts: map[id.KeyAlgorithm]int{sc: maxOneTimeKeyCount, c2: maxOneTimeKeyCount, "x": 10000}},
		wantDelta: Delta{OTKCounts: counts(sc, maxOneTimeKeyCount, c2, maxOneTimeKeyCount, id.KeyAlgorithm("x"), 10000)},
	}, {
		name:      "malformed algorithm names are dropped, unknown well-formed ones kept",
		old:       active,
		resp:      `{"device_one_time_keys_count":{"signed_curve25519":5,"two words":1,"nul\u0000":1,"tab\t":1,"caf\u00e9":1,"` + strings.Repeat("a", maxKeyAlgorithmLength+1) + `":1,"org.example.future_v2":3},"device_unused_fallback_key_types":["bad name","org.example.future_v2","org.example.future_v2"]}`,
		wantState: State{Active: true, OTKCountsKnown: true, OTKCounts: map[id.KeyAlgorithm]int{sc: 5, "org.example.future_v2": 3}, FallbackKeyTypesKnown: true, FallbackKeyTypes: []id.KeyAlgorithm{"org.example.future_v2"}},
		wantDelta: Delta{OTKCounts: counts(sc, 5, id.KeyAlgorithm("org.example.future_v2"), 3), FallbackKeyTypes: fallback("org.example.future_v2")},
	}, {
		name:      "algorithms beyond the limit are dropped in byte order",
		old:       active,
		resp:      manyAlgorithms(maxKeyAlgorithms + 8),
		wantState: State{Active: true, OTKCountsKnown: true, OTKCounts: firstAlgorithms(maxKeyAlgorithms)},
		wantDelta: Delta{OTKCounts: slidingsync.Some(firstAlgorithms(maxKeyAlgorithms))},
	}, {
		name:      "invalid user IDs are dropped",
		old:       active,
		resp:      `{"device_lists":{"changed":["@a:x","@:x","@a:","a:x","@a b:x","@a\u0000:x","@a\n:x","@` + strings.Repeat("l", id.UserIDMaxLength) + `:x","@b:bad host"],"left":["@c:x",null,"!room:x"]}}`,
		wantState: active,
		wantDelta: Delta{Changed: []id.UserID{"@a:x"}, Left: []id.UserID{"@c:x"}},
	}, {
		name:      "only invalid user IDs carry nothing",
		old:       active,
		resp:      `{"device_lists":{"changed":["nobody","@:x"],"left":["` + strings.Repeat("@", 1000) + `"]}}`,
		wantState: active,
	}}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			oldCopy := tt.old.clone()
			resp := decode(t, tt.resp)
			st, d := Merge(tt.old, resp, tt.initial)
			assert.True(t, tt.wantState.equal(st), "state: want %+v, got %+v", tt.wantState, st)
			assert.Equal(t, tt.wantDelta, d)
			assert.Equal(t, tt.wantDelta.Empty(), d.Empty())
			assert.True(t, oldCopy.equal(tt.old), "Merge modified its input")
			// Idempotent on the state.
			again, _ := Merge(st, resp, tt.initial)
			assert.True(t, st.equal(again), "merging twice differs: %+v vs %+v", st, again)
			// The state survives its checkpoint encoding.
			raw, err := json.Marshal(st)
			require.NoError(t, err)
			var back State
			require.NoError(t, json.Unmarshal(raw, &back))
			assert.True(t, st.equal(normalize(back)), "checkpoint round trip: %s", raw)
		})
	}
}

// normalize restores what omitempty leaves out of a checkpoint.
func normalize(s State) State {
	if s.OTKCountsKnown && s.OTKCounts == nil {
		s.OTKCounts = map[id.KeyAlgorithm]int{}
	}
	if s.FallbackKeyTypesKnown && s.FallbackKeyTypes == nil {
		s.FallbackKeyTypes = []id.KeyAlgorithm{}
	}
	return s
}

func TestMergeDoesNotAliasResponse(t *testing.T) {
	resp := decode(t, `{"device_one_time_keys_count":{"signed_curve25519":5},"device_unused_fallback_key_types":["signed_curve25519"]}`)
	st, d := Merge(State{}, resp, false)
	resp.DeviceOneTimeKeysCount.Val[sc] = 99
	resp.DeviceUnusedFallbackKeyTypes.Val[0] = "x"
	d.OTKCounts.Val[sc] = 77
	assert.Equal(t, 5, st.OTKCounts[sc])
	assert.Equal(t, []id.KeyAlgorithm{sc}, st.FallbackKeyTypes)
}

func TestStateHelpers(t *testing.T) {
	var fresh State
	n, known := fresh.OTKCount(sc)
	assert.Zero(t, n)
	assert.False(t, known)
	assert.False(t, fresh.NeedsFallbackKey(sc), "unknown fallback types must not trigger uploads")

	n, known = knownState.OTKCount(sc)
	assert.Equal(t, 50, n)
	assert.True(t, known)
	n, _ = knownState.OTKCount("other")
	assert.Zero(t, n, "an unlisted algorithm counts 0")
	assert.False(t, knownState.NeedsFallbackKey(sc))
	used := knownState.clone()
	used.FallbackKeyTypes = []id.KeyAlgorithm{}
	assert.True(t, used.NeedsFallbackKey(sc))

	d := Delta{FallbackKeyTypes: fallback()}
	assert.True(t, d.FallbackKeyUsed(sc))
	assert.False(t, (&Delta{}).FallbackKeyUsed(sc), "absent is not used")
}

func TestDecodeResponseErrors(t *testing.T) {
	for name, raw := range map[string]string{
		"not an object":         `[1]`,
		"section a string":      `"e2ee"`,
		"count not a number":    `{"device_one_time_keys_count":{"signed_curve25519":"5"}}`,
		"count fractional":      `{"device_one_time_keys_count":{"signed_curve25519":1.5}}`,
		"count beyond int64":    `{"device_one_time_keys_count":{"signed_curve25519":1e30}}`,
		"counts an array":       `{"device_one_time_keys_count":[5]}`,
		"fallback object":       `{"device_unused_fallback_key_types":{}}`,
		"fallback numbers":      `{"device_unused_fallback_key_types":[1]}`,
		"changed string":        `{"device_lists":{"changed":"@a:x"}}`,
		"left numbers":          `{"device_lists":{"left":[1,2]}}`,
		"device lists an array": `{"device_lists":["@a:x"]}`,
		"truncated":             `{"device_lists":`,
		"user ID an object":     `{"device_lists":{"changed":[{"user_id":"@a:x"}]}}`,
		"trailing garbage":      `{"device_lists":{}} x`,
	} {
		t.Run(name, func(t *testing.T) {
			_, err := decodeResponse(context.Background(), json.RawMessage(raw))
			require.Error(t, err)
			assert.True(t, errors.Is(err, slidingsync.ErrInvalidResponse))
		})
	}
	resp, err := decodeResponse(context.Background(), nil)
	assert.NoError(t, err)
	assert.Nil(t, resp)
}

// manyAlgorithms returns an e2ee section counting n well-formed algorithms alg00, alg01, ...
func manyAlgorithms(n int) string {
	parts := make([]string, n)
	for i := range n {
		parts[i] = fmt.Sprintf(`"alg%02d":%d`, n-1-i, n-1-i)
	}
	return `{"device_one_time_keys_count":{` + strings.Join(parts, ",") + `}}`
}

// firstAlgorithms is the count map manyAlgorithms keeps: the first n in byte order.
func firstAlgorithms(n int) map[id.KeyAlgorithm]int {
	m := make(map[id.KeyAlgorithm]int, n)
	for i := range n {
		m[id.KeyAlgorithm(fmt.Sprintf("alg%02d", i))] = i
	}
	return m
}

// equal reports whether two states hold the same knowledge.
func (s State) equal(o State) bool {
	return s.Active == o.Active &&
		s.OTKCountsKnown == o.OTKCountsKnown && maps.Equal(s.OTKCounts, o.OTKCounts) &&
		s.FallbackKeyTypesKnown == o.FallbackKeyTypesKnown && slices.Equal(s.FallbackKeyTypes, o.FallbackKeyTypes)
}
