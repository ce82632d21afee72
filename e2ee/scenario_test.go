package e2ee_test

import (
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"testing/synctest"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"maunium.net/go/mautrix/id"

	"github.com/sliding-e2ee/sdk/e2ee"
	"github.com/sliding-e2ee/sdk/slidingsync"
)

const sc = id.KeyAlgorithmSignedCurve25519

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

func users(u ...id.UserID) []id.UserID { return u }

// step is one answer of a scenario and what the consumer must receive for it.
type step struct {
	name string
	// unknownPos answers 400 M_UNKNOWN_POS instead of body.
	unknownPos bool
	// body is the whole response, pos included.
	body string
	// want is the delta handed to the consumer in this response's commit; nil means none.
	want *e2ee.Delta
	// noPos says the request this step answers carried no pos.
	noPos bool
}

type scenarioResult struct {
	final e2ee.State
}

// runScenario serves the steps in order to a Conn carrying the e2ee extension and checks,
// per response, what the consumer received and what each request carried.
func runScenario(t *testing.T, proto slidingsync.Protocol, e2eeKey string, steps []step) scenarioResult {
	var res scenarioResult
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, harnessOpts{proto: proto, noToDev: true})
		for _, s := range steps {
			if s.unknownPos {
				h.srv.PushError(slidingsync.MUnknownPos.WithMessage("Unknown position"))
			} else {
				h.srv.PushJSON(http.StatusOK, s.body)
			}
		}
		h.run()
		reqs := h.waitRequests(len(steps) + 1)
		synctest.Wait()
		h.stop()

		deltas, states := h.consumer.snapshot()
		i := 0
		for n, s := range steps {
			rr := reqs[n]
			assert.Equal(t, map[string]any{"enabled": true}, ext(t, rr, e2eeKey), "step %d (%s): request body", n, s.name)
			assert.Len(t, rr.Parsed.Extensions, 1, "step %d (%s): extension keys", n, s.name)
			assert.Equal(t, s.noPos, rr.Parsed.Pos == "", "step %d (%s): request pos %q", n, s.name, rr.Parsed.Pos)
			if s.unknownPos {
				continue
			}
			require.Less(t, i, len(deltas), "step %d (%s): no commit", n, s.name)
			assert.Equal(t, s.want, deltas[i], "step %d (%s): delta", n, s.name)
			i++
		}
		assert.Len(t, deltas, i, "commits")
		require.NotEmpty(t, states)
		res.final = states[len(states)-1]
		final, err := json.Marshal(res.final)
		require.NoError(t, err)
		committed, err := json.Marshal(h.e2eeState())
		require.NoError(t, err)
		assert.JSONEq(t, string(committed), string(final), "the consumer saw the committed state")
	})
	return res
}

// Synapse's own test scenarios (tests/rest/client/sliding_sync/test_extension_e2ee.py) as
// responses: counts and fallback types on every response, signed_curve25519: 0 when empty,
// device_lists on every incremental response and none on a request without pos.
func TestScenarioSynapse(t *testing.T) {
	const u3, u4 = id.UserID("@user3:test"), id.UserID("@user4:test")
	steps := []step{{
		name:  "no data initial sync",
		noPos: true,
		body:  `{"pos":"s1","lists":{},"rooms":{},"extensions":{"e2ee":{"device_one_time_keys_count":{"signed_curve25519":0},"device_unused_fallback_key_types":[]}}}`,
		want:  &e2ee.Delta{Gap: true, OTKCounts: counts(sc, 0), FallbackKeyTypes: fallback()},
	}, {
		name: "no data incremental sync",
		body: `{"pos":"s2","lists":{},"rooms":{},"extensions":{"e2ee":{"device_lists":{"changed":[],"left":[]},"device_one_time_keys_count":{"signed_curve25519":0},"device_unused_fallback_key_types":[]}}}`,
		want: &e2ee.Delta{OTKCounts: counts(sc, 0), FallbackKeyTypes: fallback()},
	}, {
		name: "wait for new data: user3 renamed a device",
		body: `{"pos":"s3","lists":{},"rooms":{},"extensions":{"e2ee":{"device_lists":{"changed":["@user3:test"],"left":[]},"device_one_time_keys_count":{"signed_curve25519":0},"device_unused_fallback_key_types":[]}}}`,
		want: &e2ee.Delta{Changed: users(u3), OTKCounts: counts(sc, 0), FallbackKeyTypes: fallback()},
	}, {
		name: "timeout with otks",
		body: `{"pos":"s4","lists":{},"rooms":{},"extensions":{"e2ee":{"device_lists":{"changed":[],"left":[]},"device_one_time_keys_count":{"alg1":1,"alg2":1,"signed_curve25519":0},"device_unused_fallback_key_types":[]}}}`,
		want: &e2ee.Delta{OTKCounts: counts(id.KeyAlgorithm("alg1"), 1, id.KeyAlgorithm("alg2"), 1, sc, 0), FallbackKeyTypes: fallback()},
	}, {
		name: "timeout with fallback keys",
		body: `{"pos":"s5","lists":{},"rooms":{},"extensions":{"e2ee":{"device_lists":{"changed":[],"left":[]},"device_one_time_keys_count":{"alg1":1,"alg2":1,"signed_curve25519":0},"device_unused_fallback_key_types":["alg1"]}}}`,
		want: &e2ee.Delta{OTKCounts: counts(id.KeyAlgorithm("alg1"), 1, id.KeyAlgorithm("alg2"), 1, sc, 0), FallbackKeyTypes: fallback("alg1")},
	}, {
		name: "device lists: user3 changed, user4 left",
		body: `{"pos":"s6","lists":{},"rooms":{},"extensions":{"e2ee":{"device_lists":{"changed":["@user3:test"],"left":["@user4:test"]},"device_one_time_keys_count":{"signed_curve25519":0},"device_unused_fallback_key_types":[]}}}`,
		want: &e2ee.Delta{Changed: users(u3), Left: users(u4), OTKCounts: counts(sc, 0), FallbackKeyTypes: fallback()},
	}, {
		name:       "connection expired",
		unknownPos: true,
	}, {
		name:  "after M_UNKNOWN_POS: no device_lists, so a gap",
		noPos: true,
		body:  `{"pos":"s7","lists":{},"rooms":{},"extensions":{"e2ee":{"device_one_time_keys_count":{"alg1":1,"alg2":2,"signed_curve25519":0},"device_unused_fallback_key_types":["alg1"]}}}`,
		want:  &e2ee.Delta{Gap: true, OTKCounts: counts(id.KeyAlgorithm("alg1"), 1, id.KeyAlgorithm("alg2"), 2, sc, 0), FallbackKeyTypes: fallback("alg1")},
	}, {
		name: "incremental after the reset",
		body: `{"pos":"s8","lists":{},"rooms":{},"extensions":{"e2ee":{"device_lists":{"changed":[],"left":[]},"device_one_time_keys_count":{"signed_curve25519":0},"device_unused_fallback_key_types":[]}}}`,
		want: &e2ee.Delta{OTKCounts: counts(sc, 0), FallbackKeyTypes: fallback()},
	}}
	for _, proto := range []slidingsync.Protocol{slidingsync.ProtocolMSC4186, slidingsync.ProtocolV4} {
		t.Run(proto.String(), func(t *testing.T) {
			key := "e2ee"
			if proto == slidingsync.ProtocolV4 {
				key = "org.matrix.msc4543.e2ee"
				steps := append([]step(nil), steps...)
				for i := range steps {
					steps[i].body = strings.ReplaceAll(steps[i].body, `"e2ee":`, `"org.matrix.msc4543.e2ee":`)
				}
				res := runScenario(t, proto, key, steps)
				assert.True(t, res.final.NeedsFallbackKey(sc))
				return
			}
			res := runScenario(t, proto, key, steps)
			n, known := res.final.OTKCount(sc)
			assert.Equal(t, 0, n)
			assert.True(t, known)
			assert.True(t, res.final.NeedsFallbackKey(sc), "Synapse says [] : a fallback key must be uploaded")
		})
	}
}

// The proxy, replayed from its captured responses (Dendrite behind it, which ignores fallback
// keys): counts only on change, no e2ee section when nothing changed, the last device-list
// delta repeated on a new connection's first response.
func TestScenarioProxyCaptured(t *testing.T) {
	const alice, bob = id.UserID("@alice7ff91e03:localhost"), id.UserID("@bob7ff91e03:localhost")
	steps := []step{
		{name: "01 initial, no e2ee section", noPos: true, body: proxyFixture(t, "01-initial-no-pos"), want: &e2ee.Delta{Gap: true}},
		{name: "03 after claim 1", body: proxyFixture(t, "03-after-claim-1"), want: &e2ee.Delta{OTKCounts: counts(sc, 2)}},
		{name: "05 after claim 3: count 0 never reported", body: proxyFixture(t, "05-after-claim-3")},
		{name: "06 room created", body: proxyFixture(t, "06-after-create-room-invite"), want: &e2ee.Delta{Changed: users(alice)}},
		{name: "07 bob joined", body: proxyFixture(t, "07-after-bob-join"), want: &e2ee.Delta{Changed: users(bob)}},
		{name: "10 bob uploaded keys", body: proxyFixture(t, "10-after-bob-device-keys"), want: &e2ee.Delta{Changed: users(bob)}},
		{name: "14 bob left", body: proxyFixture(t, "14-after-bob-leave-b"), want: &e2ee.Delta{Left: users(bob)}},
		{name: "connection expired", unknownPos: true},
		{name: "18 fresh connection: stale count, last delta repeated", noPos: true, body: proxyFixture(t, "18-conn-enc-initial-extensions-only"),
			want: &e2ee.Delta{Gap: true, OTKCounts: counts(sc, 1), Left: users(bob)}},
	}
	res := runScenario(t, slidingsync.ProtocolMSC3575, "e2ee", steps)
	n, known := res.final.OTKCount(sc)
	assert.Equal(t, 1, n)
	assert.True(t, known)
	assert.False(t, res.final.FallbackKeyTypesKnown)
	assert.False(t, res.final.NeedsFallbackKey(sc), "no fallback support behind this proxy: never churn")
}

// The proxy's fallback key test (tests-e2e TestEncryptionFallbackKey): counts and fallback
// types only when they change, fallback as an explicit [] once the key is used.
func TestScenarioProxyFallback(t *testing.T) {
	body := func(pos, e2eeSection string) string {
		return `{"pos":"` + pos + `","lists":{},"rooms":{},"extensions":{"e2ee":` + e2eeSection + `}}`
	}
	steps := []step{
		{name: "initial", noPos: true, body: body("1", `{"device_one_time_keys_count":{"signed_curve25519":3},"device_unused_fallback_key_types":["signed_curve25519"]}`),
			want: &e2ee.Delta{Gap: true, OTKCounts: counts(sc, 3), FallbackKeyTypes: fallback(sc)}},
		{name: "claim 1", body: body("2", `{"device_one_time_keys_count":{"signed_curve25519":2}}`), want: &e2ee.Delta{OTKCounts: counts(sc, 2)}},
		{name: "claim 2", body: body("3", `{"device_one_time_keys_count":{"signed_curve25519":1}}`), want: &e2ee.Delta{OTKCounts: counts(sc, 1)}},
		{name: "claim 3", body: body("4", `{"device_one_time_keys_count":{"signed_curve25519":0}}`), want: &e2ee.Delta{OTKCounts: counts(sc, 0)}},
		{name: "claim 4 uses the fallback key", body: body("5", `{"device_unused_fallback_key_types":[]}`), want: &e2ee.Delta{FallbackKeyTypes: fallback()}},
		{name: "nothing changed", body: `{"pos":"6","lists":{},"rooms":{}}`},
		{name: "fallback uploaded again", body: body("7", `{"device_unused_fallback_key_types":["signed_curve25519"]}`), want: &e2ee.Delta{FallbackKeyTypes: fallback(sc)}},
		{name: "claim uses it again", body: body("8", `{"device_unused_fallback_key_types":[]}`), want: &e2ee.Delta{FallbackKeyTypes: fallback()}},
		{name: "nothing changed again", body: `{"pos":"9","lists":{},"rooms":{}}`},
	}
	res := runScenario(t, slidingsync.ProtocolMSC3575, "e2ee", steps)
	n, known := res.final.OTKCount(sc)
	assert.Equal(t, 0, n, "the count from claim 3 is kept while the fallback changes")
	assert.True(t, known)
	assert.True(t, res.final.NeedsFallbackKey(sc), "the used fallback stays pending across responses without the field")
}

// continuwuity and Dendrite-backed servers: counts always, device lists from pos, never the
// fallback field.
func TestScenarioNoFallbackSupport(t *testing.T) {
	body := func(pos, e2eeSection string) string {
		return `{"pos":"` + pos + `","lists":{},"rooms":{},"extensions":{"e2ee":` + e2eeSection + `}}`
	}
	steps := []step{
		{name: "initial", noPos: true, body: body("a", `{"device_one_time_keys_count":{"signed_curve25519":50}}`),
			want: &e2ee.Delta{Gap: true, OTKCounts: counts(sc, 50)}},
		{name: "carol changed", body: body("b", `{"device_one_time_keys_count":{"signed_curve25519":49},"device_lists":{"changed":["@carol:c"],"left":[]}}`),
			want: &e2ee.Delta{OTKCounts: counts(sc, 49), Changed: users("@carol:c")}},
		{name: "dave left", body: body("c", `{"device_one_time_keys_count":{"signed_curve25519":49},"device_lists":{"changed":[],"left":["@dave:c"]}}`),
			want: &e2ee.Delta{OTKCounts: counts(sc, 49), Left: users("@dave:c")}},
		{name: "section left out", body: `{"pos":"d"}`},
	}
	res := runScenario(t, slidingsync.ProtocolMSC4186, "e2ee", steps)
	assert.False(t, res.final.FallbackKeyTypesKnown)
	assert.False(t, res.final.NeedsFallbackKey(sc), "a server that never sends the field must not make the client churn fallback keys")
}
