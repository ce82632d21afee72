package e2ee

import (
	"maps"
	"slices"
	"strconv"

	"maunium.net/go/mautrix/id"

	"github.com/sliding-e2ee/sdk/slidingsync"
)

// State is what the e2ee extension knows after the last committed response. It is the
// extension's checkpoint, committed in the same transaction as pos. It holds the server's last
// word on the device's keys; what the consumer must still do about device lists is recorded by
// the consumer itself, in the same transaction (see Consumer).
type State struct {
	// Active is true once a response was committed on this connection with the extension
	// enabled. A connection with a pos whose state is not active has just switched e2ee on, so
	// device-list changes before its pos were never delivered: its next response is a gap.
	Active bool `json:"active,omitempty"`
	// OTKCountsKnown tells whether any response has carried one-time key counts.
	OTKCountsKnown bool `json:"otk_counts_known,omitempty"`
	// OTKCounts is the last count map received; an algorithm it does not list counts 0. It
	// may be stale: servers compute it up to 30 s before they send it.
	OTKCounts map[id.KeyAlgorithm]int `json:"otk_counts,omitempty"`
	// FallbackKeyTypesKnown tells whether any response has carried the unused fallback key
	// types. Servers without fallback key support never send them: then it stays false and no
	// fallback key should be uploaded.
	FallbackKeyTypesKnown bool `json:"fallback_key_types_known,omitempty"`
	// FallbackKeyTypes is the last list of algorithms with an unused fallback key.
	FallbackKeyTypes []id.KeyAlgorithm `json:"fallback_key_types,omitempty"`
}

// OTKCount returns the last known one-time key count of an algorithm and whether any count is
// known. An algorithm missing from a known map counts 0.
func (s State) OTKCount(alg id.KeyAlgorithm) (count int, known bool) {
	return s.OTKCounts[alg], s.OTKCountsKnown
}

// NeedsFallbackKey reports whether the server said it holds no unused fallback key of the
// algorithm: the key was used, or none was ever uploaded. It is false when the server never
// sent fallback key types, so clients do not churn keys on servers without fallback support.
// It stays true until a response lists the algorithm again, so a consumer that acts on it
// after every commit must remember an upload it has already made.
func (s State) NeedsFallbackKey(alg id.KeyAlgorithm) bool {
	return s.FallbackKeyTypesKnown && !slices.Contains(s.FallbackKeyTypes, alg)
}

func (s State) clone() State {
	s.OTKCounts = maps.Clone(s.OTKCounts)
	s.FallbackKeyTypes = slices.Clone(s.FallbackKeyTypes)
	return s
}

// Delta is what one response tells the consumer. Each field is set only when the response
// carried it, so "absent" is never confused with "empty".
type Delta struct {
	// Gap is true when device-list changes may have been missed: the request carried no pos
	// (Synapse then sends no device_lists at all) or e2ee was switched on mid-connection. The
	// consumer must treat every tracked user's device list as outdated.
	Gap bool
	// OTKCounts is set when the response carried one-time key counts; the map is complete (an
	// algorithm it does not list counts 0).
	OTKCounts slidingsync.Opt[map[id.KeyAlgorithm]int]
	// FallbackKeyTypes is set when the response carried the unused fallback key types. Set
	// and empty means the fallback key was used (or none exists): upload a new one.
	FallbackKeyTypes slidingsync.Opt[[]id.KeyAlgorithm]
	// Changed lists users whose device lists must be re-fetched, without duplicates.
	Changed []id.UserID
	// Left lists users who no longer share a room with the device and can be untracked,
	// without duplicates. A user the response lists in both changed and left is only in
	// Changed: re-fetching is always safe, untracking a user who shares a room is not.
	Left []id.UserID
}

// Empty reports whether the delta tells the consumer nothing.
func (d *Delta) Empty() bool {
	return !d.Gap && !d.OTKCounts.Set && !d.FallbackKeyTypes.Set && len(d.Changed) == 0 && len(d.Left) == 0
}

// FallbackKeyUsed reports whether the response said that the device has no unused fallback
// key of the algorithm.
func (d *Delta) FallbackKeyUsed(alg id.KeyAlgorithm) bool {
	return d.FallbackKeyTypes.Set && !slices.Contains(d.FallbackKeyTypes.Val, alg)
}

// Merge applies one response's e2ee section (nil when the server left it out) to the state of
// the previous commit and returns the new state and what changed. initial is true when the
// request carried no pos: the first request of a connection or the first after
// M_UNKNOWN_POS. It is pure: old and resp are not modified and the results share no memory
// with them.
//
// Rules (MSC3884 as every known server implements it): a section or field that is absent or
// null leaves the state unchanged; a present count map replaces the old one; present fallback
// key types replace the old ones, [] included; device_lists are deltas passed through to the
// consumer, never stored. Invalid entries are dropped and absurd counts capped, as the
// extension does when it decodes a section: a malformed algorithm, a negative count or a
// malformed user ID is dropped, a count above 10 000 is capped, algorithms beyond 32 are
// dropped.
//
// Merge is idempotent on the state: merging the same response twice gives the state of
// merging it once, and the second delta repeats the first one's device-list changes, which
// consumers apply idempotently.
func Merge(old State, resp *Response, initial bool) (State, Delta) {
	st := old.clone()
	d := Delta{Gap: initial || !old.Active}
	st.Active = true
	if resp == nil {
		return st, d
	}
	var rep report
	if resp.DeviceOneTimeKeysCount.HasValue() {
		counts := cleanCounts(resp.DeviceOneTimeKeysCount.Val, &rep)
		st.OTKCountsKnown, st.OTKCounts = true, counts
		d.OTKCounts = slidingsync.Some(maps.Clone(counts))
	}
	if resp.DeviceUnusedFallbackKeyTypes.HasValue() {
		types := cleanTypes(resp.DeviceUnusedFallbackKeyTypes.Val, &rep)
		st.FallbackKeyTypesKnown, st.FallbackKeyTypes = true, types
		d.FallbackKeyTypes = slidingsync.Some(slices.Clone(types))
	}
	if resp.DeviceLists.HasValue() {
		seen := make(map[id.UserID]struct{}, len(resp.DeviceLists.Val.Changed)+len(resp.DeviceLists.Val.Left))
		d.Changed = uniqueUsers(resp.DeviceLists.Val.Changed, seen, &rep)
		d.Left = uniqueUsers(resp.DeviceLists.Val.Left, seen, &rep)
	}
	return st, d
}

// Limits on what a response may carry; entries beyond them are dropped or capped.
const (
	// maxOneTimeKeyCount caps a one-time key count. No client keeps more than a few hundred
	// keys on the server, so a larger count is a server bug; capped, it still means "enough".
	maxOneTimeKeyCount = 10000
	// maxKeyAlgorithms is how many algorithms a count map or fallback key type list may
	// name; the rest, in byte order, are dropped, so a hostile map cannot bloat the checkpoint.
	maxKeyAlgorithms = 32
	// maxKeyAlgorithmLength is the longest algorithm name kept, in bytes.
	maxKeyAlgorithmLength = 128
)

// validAlgorithm reports whether alg is a usable algorithm name: 1 to maxKeyAlgorithmLength
// printable ASCII characters without spaces. Unknown well-formed names are kept: consumers look
// up only the algorithms they know.
func validAlgorithm(alg id.KeyAlgorithm) bool {
	if alg == "" || len(alg) > maxKeyAlgorithmLength {
		return false
	}
	for i := 0; i < len(alg); i++ {
		if alg[i] <= ' ' || alg[i] > '~' {
			return false
		}
	}
	return true
}

// validUser reports whether u is a user ID a device list can name: a relaxed Matrix user ID
// (mautrix's rules, 255 bytes at most) with a non-empty localpart and no control characters
// or spaces, which have no business in logs or key queries.
func validUser(u id.UserID) bool {
	local, _, err := u.ParseAndValidateRelaxed()
	if err != nil || local == "" {
		return false
	}
	for i := 0; i < len(u); i++ {
		if u[i] <= ' ' || u[i] == 0x7f {
			return false
		}
	}
	return true
}

// report counts what the validation dropped or capped in one response, so that it is logged
// in one warning, not one per entry.
type report struct {
	badAlgorithms, extraAlgorithms, negativeCounts, cappedCounts, badUsers int
	example                                                                string // the first invalid value, shortened
}

func (r *report) note(n *int, v string) {
	*n++
	if r.example == "" {
		const maxExample = 64
		if len(v) > maxExample {
			v = v[:maxExample] + "…"
		}
		r.example = strconv.Quote(v)
	}
}

func (r *report) empty() bool {
	return r.badAlgorithms+r.extraAlgorithms+r.negativeCounts+r.cappedCounts+r.badUsers == 0
}

// cleanCounts returns the usable entries of a count map: malformed algorithms and negative
// counts are dropped (the algorithm then counts 0, as an unlisted one does), counts above
// maxOneTimeKeyCount are capped, and at most maxKeyAlgorithms algorithms are kept.
func cleanCounts(in map[id.KeyAlgorithm]int, rep *report) map[id.KeyAlgorithm]int {
	algs := slices.Sorted(maps.Keys(in))
	out := make(map[id.KeyAlgorithm]int, min(len(algs), maxKeyAlgorithms))
	for _, alg := range algs {
		n := in[alg]
		switch {
		case !validAlgorithm(alg):
			rep.note(&rep.badAlgorithms, string(alg))
		case n < 0:
			rep.note(&rep.negativeCounts, string(alg)+"="+strconv.Itoa(n))
		case len(out) >= maxKeyAlgorithms:
			rep.note(&rep.extraAlgorithms, string(alg))
		case n > maxOneTimeKeyCount:
			rep.note(&rep.cappedCounts, string(alg)+"="+strconv.Itoa(n))
			out[alg] = maxOneTimeKeyCount
		default:
			out[alg] = n
		}
	}
	return out
}

// cleanTypes returns the usable fallback key types, without duplicates, in their first order:
// malformed algorithms are dropped and at most maxKeyAlgorithms are kept. It never returns
// nil, as a present empty list means "used".
func cleanTypes(in []id.KeyAlgorithm, rep *report) []id.KeyAlgorithm {
	out := make([]id.KeyAlgorithm, 0, min(len(in), maxKeyAlgorithms))
	for _, alg := range in {
		switch {
		case !validAlgorithm(alg):
			rep.note(&rep.badAlgorithms, string(alg))
		case slices.Contains(out, alg):
		case len(out) >= maxKeyAlgorithms:
			rep.note(&rep.extraAlgorithms, string(alg))
		default:
			out = append(out, alg)
		}
	}
	return out
}

// uniqueUsers returns the valid users of in that are not in seen, without duplicates, in
// their first order, and adds them to seen. It returns nil when none is left.
func uniqueUsers(in []id.UserID, seen map[id.UserID]struct{}, rep *report) []id.UserID {
	var out []id.UserID
	for _, u := range in {
		if _, dup := seen[u]; dup {
			continue
		}
		seen[u] = struct{}{}
		if !validUser(u) {
			rep.note(&rep.badUsers, string(u))
			continue
		}
		out = append(out, u)
	}
	return out
}
