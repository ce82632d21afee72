package e2ee

import (
	"context"
	"encoding/json"
	"fmt"

	"github.com/rs/zerolog"
	"maunium.net/go/mautrix/id"

	"github.com/sliding-e2ee/sdk/slidingsync"
)

// Wire keys of the e2ee extension. The checkpoint is always stored under e2eeName.
const (
	// e2eeName is the extension's name and its wire key on the MSC3575 and MSC4186 dialects.
	e2eeName = "e2ee"
	// e2eeKeyV4 is the extension's wire key on the stable v4 dialect (MSC4543, which
	// supersedes MSC3884, until it is stable).
	e2eeKeyV4 = "org.matrix.msc4543.e2ee"
)

// Response is the e2ee section of a sliding sync response (MSC3884, MSC4543). Every field keeps
// apart absent (Set false), an explicit null and a value: an absent or null field means "no
// change", never "empty".
type Response struct {
	// DeviceOneTimeKeysCount maps an algorithm to how many one-time keys of it the server
	// holds for the device. A present map replaces the old one: an algorithm it does not list
	// counts 0.
	DeviceOneTimeKeysCount slidingsync.Opt[map[id.KeyAlgorithm]int] `json:"device_one_time_keys_count,omitzero"`
	// DeviceLists holds the users whose device lists changed, or who no longer share a room,
	// since the request's pos. They are deltas.
	DeviceLists slidingsync.Opt[DeviceLists] `json:"device_lists,omitzero"`
	// DeviceUnusedFallbackKeyTypes lists the algorithms with an unused fallback key. Present
	// and empty means the fallback key was used (or none was ever uploaded), which differs from
	// absent.
	DeviceUnusedFallbackKeyTypes slidingsync.Opt[[]id.KeyAlgorithm] `json:"device_unused_fallback_key_types,omitzero"`
}

// DeviceLists is the device_lists field of the e2ee extension.
type DeviceLists struct {
	// Changed lists users whose device lists changed, or with whom the device newly shares a
	// room. It may be a superset.
	Changed []id.UserID `json:"changed"`
	// Left lists users with whom the device no longer shares any room.
	Left []id.UserID `json:"left"`
}

// e2eeRequest is the request body; it is sent in full on every request, as servers of the
// MSC4186 family keep no stickiness.
type e2eeRequest struct {
	Enabled bool `json:"enabled"`
}

// decodeResponse decodes the e2ee section of a response. raw nil (the section is absent)
// returns nil and no error. A body of the wrong JSON shape returns an error wrapping
// slidingsync.ErrInvalidResponse, so the connection retries without committing anything.
// Entries that are well-formed JSON but invalid are dropped or capped as [Merge] describes,
// with one warning per response, not one per entry, logged to the zerolog logger of ctx.
func decodeResponse(ctx context.Context, raw json.RawMessage) (*Response, error) {
	if raw == nil {
		return nil, nil
	}
	var resp Response
	if err := json.Unmarshal(raw, &resp); err != nil {
		return nil, fmt.Errorf("%w: e2ee extension: %w", slidingsync.ErrInvalidResponse, err)
	}
	if rep := sanitize(&resp); !rep.empty() {
		zerolog.Ctx(ctx).Warn().
			Int("malformed_algorithms", rep.badAlgorithms).
			Int("extra_algorithms", rep.extraAlgorithms).
			Int("negative_counts", rep.negativeCounts).
			Int("capped_counts", rep.cappedCounts).
			Int("invalid_user_ids", rep.badUsers).
			Str("example", rep.example).
			Msg("Ignored invalid entries in the e2ee extension response")
	}
	return &resp, nil
}

// sanitize applies Merge's validation to the decoded section in place and reports what it
// dropped or capped.
func sanitize(resp *Response) (rep report) {
	if resp.DeviceOneTimeKeysCount.HasValue() {
		resp.DeviceOneTimeKeysCount.Val = cleanCounts(resp.DeviceOneTimeKeysCount.Val, &rep)
	}
	if resp.DeviceUnusedFallbackKeyTypes.HasValue() {
		resp.DeviceUnusedFallbackKeyTypes.Val = cleanTypes(resp.DeviceUnusedFallbackKeyTypes.Val, &rep)
	}
	if resp.DeviceLists.HasValue() {
		dl := &resp.DeviceLists.Val
		dl.Changed = validUsers(dl.Changed, &rep)
		dl.Left = validUsers(dl.Left, &rep)
	}
	return rep
}

func validUsers(users []id.UserID, rep *report) []id.UserID {
	out := users[:0:0]
	for _, u := range users {
		if !validUser(u) {
			rep.note(&rep.badUsers, string(u))
			continue
		}
		out = append(out, u)
	}
	return out
}
