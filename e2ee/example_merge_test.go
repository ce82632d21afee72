package e2ee_test

import (
	"encoding/json"
	"fmt"

	"maunium.net/go/mautrix/id"

	"github.com/sliding-e2ee/sdk/e2ee"
)

// Merge keeps "absent" and "empty" apart: a response without the fallback key types says
// nothing about them, an empty list says the fallback key was used.
func ExampleMerge() {
	var st e2ee.State
	for i, raw := range []string{
		`{"device_one_time_keys_count": {"signed_curve25519": 50}, "device_unused_fallback_key_types": ["signed_curve25519"]}`,
		`{"device_lists": {"changed": ["@alice:example.org"]}}`,
		`{"device_one_time_keys_count": {}, "device_unused_fallback_key_types": []}`,
	} {
		var resp e2ee.Response
		if err := json.Unmarshal([]byte(raw), &resp); err != nil {
			fmt.Println(err)
			return
		}
		var d e2ee.Delta
		st, d = e2ee.Merge(st, &resp, i == 0)
		fmt.Printf("response %d: gap=%v changed=%v counts sent=%v fallback types sent=%v needs fallback key=%v\n",
			i+1, d.Gap, d.Changed, d.OTKCounts.Set, d.FallbackKeyTypes.Set, st.NeedsFallbackKey(id.KeyAlgorithmSignedCurve25519))
	}
	// Output:
	// response 1: gap=true changed=[] counts sent=true fallback types sent=true needs fallback key=false
	// response 2: gap=false changed=[@alice:example.org] counts sent=false fallback types sent=false needs fallback key=false
	// response 3: gap=false changed=[] counts sent=true fallback types sent=true needs fallback key=true
}
