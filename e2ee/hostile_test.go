package e2ee_test

import (
	"context"
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

// hostileSection is an e2ee section in which almost everything is invalid: thousands of
// malformed user IDs, negative, absurd and malformed counts, and one valid user.
func hostileSection() string {
	var b strings.Builder
	b.WriteString(`{"device_one_time_keys_count":{"signed_curve25519":-50,"curve25519":99999999,"bad alg":1},`)
	b.WriteString(`"device_unused_fallback_key_types":["","signed_curve25519"],"device_lists":{"changed":["@ok:x"`)
	for range 5000 {
		b.WriteString(`,"not-a-user-` + strings.Repeat("x", 40) + `"`)
	}
	b.WriteString(`],"left":["@` + strings.Repeat("y", 300) + `:x"]}}`)
	return b.String()
}

// Invalid entries are dropped or capped with one warning per response, however many there
// are, and only the valid remainder reaches the consumer: no flood of device-list work, no
// negative or absurd count.
func TestHostileSectionIsCleanedWithOneWarning(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHarness(t, harnessOpts{proto: slidingsync.ProtocolMSC4186, noToDev: true})
		section := hostileSection()
		h.srv.PushJSON(http.StatusOK, `{"pos":"1","extensions":{"e2ee":`+section+`}}`)
		h.srv.PushJSON(http.StatusOK, `{"pos":"2","extensions":{"e2ee":`+section+`}}`)
		h.srv.PushJSON(http.StatusOK, `{"pos":"3","extensions":{"e2ee":{"device_lists":{"changed":["nobody"],"left":[]}}}}`)
		h.run()
		h.waitRequests(4)
		synctest.Wait()
		h.stop()

		assert.Equal(t, 3, h.logs.Count("Ignored invalid entries in the e2ee extension response"), "one warning per response")
		var longest, full int
		for _, line := range strings.Split(h.logs.String(), "\n") {
			if strings.Contains(line, "Ignored invalid entries") {
				longest = max(longest, len(line))
				var fields map[string]any
				require.NoError(t, json.Unmarshal([]byte(line), &fields))
				if fields["invalid_user_ids"] == float64(5001) {
					full++
					assert.EqualValues(t, 1, fields["negative_counts"])
					assert.EqualValues(t, 1, fields["capped_counts"])
					assert.EqualValues(t, 2, fields["malformed_algorithms"])
				}
			}
		}
		assert.Equal(t, 2, full, "both hostile responses are summarised")
		assert.Less(t, longest, 1024, "the warning summarises, it does not list every entry")

		deltas, states := h.consumer.snapshot()
		require.Len(t, deltas, 3)
		require.NotNil(t, deltas[0])
		assert.Equal(t, []id.UserID{"@ok:x"}, deltas[0].Changed)
		assert.Empty(t, deltas[0].Left)
		assert.Equal(t, map[id.KeyAlgorithm]int{id.KeyAlgorithmCurve25519: 10000}, deltas[0].OTKCounts.Val)
		assert.Equal(t, []id.KeyAlgorithm{id.KeyAlgorithmSignedCurve25519}, deltas[0].FallbackKeyTypes.Val)
		assert.Nil(t, deltas[2], "a response with only invalid entries asks the consumer for nothing")
		for _, st := range states {
			for alg, n := range st.OTKCounts {
				assert.True(t, n >= 0 && n <= 10000, "%s=%d", alg, n)
			}
		}
		assert.Equal(t, "3", h.conn.Pos(), "invalid entries do not stop the connection")
	})
}

// A section of the wrong JSON shape is an error that leaves the committed state as it was.
func TestWrongShapeLeavesCommittedState(t *testing.T) {
	ctx := context.Background()
	exts, release, err := e2ee.New("@bot:x", "SHAPE", e2ee.Config{Consumer: &recConsumer{}})
	require.NoError(t, err)
	defer release()
	ext := exts[0]
	committed := e2ee.State{Active: true, OTKCountsKnown: true, OTKCounts: map[id.KeyAlgorithm]int{id.KeyAlgorithmSignedCurve25519: 7}}
	raw, err := json.Marshal(committed)
	require.NoError(t, err)
	info := slidingsync.RequestInfo{Protocol: slidingsync.ProtocolMSC4186, Pos: "1", Checkpoint: raw}
	for name, section := range map[string]string{
		"count a string":      `{"device_one_time_keys_count":{"signed_curve25519":"0"}}`,
		"fallback an object":  `{"device_unused_fallback_key_types":{"signed_curve25519":true}}`,
		"changed a number":    `{"device_lists":{"changed":1}}`,
		"section an array":    `[]`,
		"count out of range":  `{"device_one_time_keys_count":{"signed_curve25519":-1e300}}`,
		"cut off mid-section": `{"device_one_time_keys_count":{"signed_curve25519":`,
	} {
		t.Run(name, func(t *testing.T) {
			_, err := ext.Process(ctx, info, json.RawMessage(section))
			require.ErrorIs(t, err, slidingsync.ErrInvalidResponse)
			assert.Contains(t, err.Error(), "e2ee extension", "the error says where")
			// The next response, without a section, merges from the committed state as it was.
			step, err := ext.Process(ctx, info, nil)
			require.NoError(t, err)
			var st e2ee.State
			require.NoError(t, json.Unmarshal(step.Checkpoint, &st))
			assert.Equal(t, committed, st, "committed state untouched")
			assert.JSONEq(t, string(raw), string(step.Checkpoint), "nothing was staged")
		})
	}
}
