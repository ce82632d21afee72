package slidingsynctest_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"maunium.net/go/mautrix/id"

	"github.com/sliding-e2ee/sdk/slidingsync"
	"github.com/sliding-e2ee/sdk/slidingsync/slidingsynctest"
)

// A list body Synapse's request model accepts.
const okList = `{"ranges":[[0,9]],"required_state":[],"timeline_limit":1}`

// ssync sends a sync request with the given pos and timeout ("" for none) and body.
func ssync(ctx context.Context, srv *slidingsynctest.Server, pos, timeout, body string) reply {
	q := url.Values{}
	if pos != "" {
		q.Set("pos", pos)
	}
	if timeout != "" {
		q.Set("timeout", timeout)
	}
	return send(ctx, srv, http.MethodPost, srv.Options().Protocol.Path(), q, body)
}

// decoded returns the JSON object of an answer.
func decoded(t *testing.T, r reply) map[string]any {
	t.Helper()
	require.NoError(t, r.err)
	var m map[string]any
	require.NoError(t, json.Unmarshal(r.body, &m), "body: %s", r.body)
	return m
}

func e2eeOf(t *testing.T, r reply) map[string]any {
	t.Helper()
	exts, ok := decoded(t, r)["extensions"].(map[string]any)
	require.True(t, ok, "no extensions in %s", r.body)
	sec, _ := exts["e2ee"].(map[string]any)
	return sec
}

const e2eeOn = `{"lists":{},"extensions":{"e2ee":{"enabled":true}}}`

// TestSynapseIsTheDefaultOnMSC4186 checks which personality each dialect gets, and that the
// Synapse one refuses other dialects.
func TestSynapseIsTheDefaultOnMSC4186(t *testing.T) {
	for proto, want := range map[slidingsync.Protocol]slidingsynctest.Personality{
		slidingsync.ProtocolAuto:    slidingsynctest.PersonalitySynapse,
		slidingsync.ProtocolMSC4186: slidingsynctest.PersonalitySynapse,
		slidingsync.ProtocolMSC3575: slidingsynctest.PersonalityPolite,
		slidingsync.ProtocolV4:      slidingsynctest.PersonalityPolite,
	} {
		assert.Equal(t, want, slidingsynctest.NewServer(slidingsynctest.Options{Protocol: proto}).Options().Personality, proto)
	}
	for _, proto := range []slidingsync.Protocol{slidingsync.ProtocolMSC3575, slidingsync.ProtocolV4} {
		assert.Panics(t, func() {
			slidingsynctest.NewServer(slidingsynctest.Options{Protocol: proto, Personality: slidingsynctest.PersonalitySynapse})
		}, proto)
	}
	assert.Panics(t, func() { slidingsynctest.NewServer(slidingsynctest.Options{Personality: "dendrite"}) })
}

// TestSynapseIdleLongPollKeepsPos: a long-poll that runs out answers with exactly the pos
// the request sent, rooms and extensions present and nothing else, after the full timeout.
func TestSynapseIdleLongPollKeepsPos(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		srv := slidingsynctest.NewServer(slidingsynctest.Options{})
		srv.Push(nil)
		first := posOf(t, ssync(t.Context(), srv, "", "", `{}`))
		require.Equal(t, "1", first)

		start := time.Now()
		r := ssync(t.Context(), srv, first, "30000", `{}`)
		assert.Equal(t, 30*time.Second, time.Since(start))
		assert.JSONEq(t, `{"pos":"1","rooms":{},"extensions":{}}`, string(r.body))

		// Again: a pos kept once is kept every time nothing happens.
		r = ssync(t.Context(), srv, first, "30000", `{}`)
		assert.Equal(t, "1", posOf(t, r))

		reqs := srv.Requests()
		require.Len(t, reqs, 3)
		assert.Equal(t, "1", reqs[1].AnswerPos)
		assert.Equal(t, 30*time.Second, reqs[1].AnsweredAt.Sub(reqs[1].Received))
		assert.Equal(t, reqs[1].AnsweredAt, reqs[2].Received, "the gap between an answer and the next request")
	})
}

// TestSynapseTimeoutZeroKeepsPos: a timeout=0 request with nothing queued keeps its pos; only
// a request without pos gets a fresh one.
func TestSynapseTimeoutZeroKeepsPos(t *testing.T) {
	srv := slidingsynctest.NewServer(slidingsynctest.Options{})
	ctx := context.Background()
	fresh := posOf(t, ssync(ctx, srv, "", "0", `{}`))
	assert.Equal(t, "1", fresh)
	assert.Equal(t, fresh, posOf(t, ssync(ctx, srv, fresh, "0", `{}`)))
	assert.Equal(t, fresh, posOf(t, ssync(ctx, srv, fresh, "", `{}`)), "no timeout means 0")
	assert.Equal(t, "2", posOf(t, ssync(ctx, srv, "", "0", `{}`)), "a request without pos starts a new connection")
}

// TestSynapsePushedAnswersGetFreshPos: a pushed response is news, so it gets a fresh pos, and
// PushIdle, with or without a response, keeps the request's.
func TestSynapsePushedAnswersGetFreshPos(t *testing.T) {
	srv := slidingsynctest.NewServer(slidingsynctest.Options{})
	ctx := context.Background()
	srv.Push(nil)
	srv.Push(&slidingsync.Response{})
	srv.PushIdle(&slidingsync.Response{Pos: "ignored", Extensions: map[string]json.RawMessage{"x": json.RawMessage(`{}`)}})
	srv.PushIdle(nil)
	srv.PushIdle(nil)
	assert.Equal(t, "1", posOf(t, ssync(ctx, srv, "", "", `{}`)))
	assert.Equal(t, "2", posOf(t, ssync(ctx, srv, "1", "", `{}`)))
	r := ssync(ctx, srv, "2", "", `{}`)
	assert.JSONEq(t, `{"pos":"2","extensions":{"x":{}}}`, string(r.body), "PushIdle(resp): served as pushed, with the request's pos")
	r = ssync(ctx, srv, "2", "", e2eeOn)
	assert.Equal(t, "2", posOf(t, r))
	assert.NotNil(t, e2eeOf(t, r), "PushIdle(nil) is the computed idle answer")
	assert.Equal(t, "3", posOf(t, ssync(ctx, srv, "", "", `{}`)), "PushIdle without a request pos: a fresh one")
}

// TestSynapseForeignPosIsInvalidStreamToken: a pos this server never issued (another
// server's) gets 400 M_UNKNOWN "Invalid stream token", not M_UNKNOWN_POS, and consumes
// nothing.
func TestSynapseForeignPosIsInvalidStreamToken(t *testing.T) {
	srv := slidingsynctest.NewServer(slidingsynctest.Options{})
	ctx := context.Background()
	srv.Push(&slidingsync.Response{Pos: "A"})
	for range 2 {
		r := ssync(ctx, srv, "12", "", `{}`)
		assert.Equal(t, http.StatusBadRequest, r.status)
		assert.JSONEq(t, `{"errcode":"M_UNKNOWN","error":"Invalid stream token"}`, string(r.body))
	}
	assert.Equal(t, 1, srv.Pending())
	assert.Equal(t, "A", posOf(t, ssync(ctx, srv, "", "", `{}`)))
	// A pos of an earlier run of this server, once issued.
	srv.IssuePos("", "12")
	assert.Equal(t, "12", posOf(t, ssync(ctx, srv, "12", "0", `{}`)))
}

// TestSynapseExpiredPosIsUnknownPos: after ExpirePositions every pos issued before gets 400
// M_UNKNOWN_POS, every time and whatever is queued, until the client starts without pos.
func TestSynapseExpiredPosIsUnknownPos(t *testing.T) {
	srv := slidingsynctest.NewServer(slidingsynctest.Options{})
	ctx := context.Background()
	old := posOf(t, ssync(ctx, srv, "", "0", `{}`))
	srv.IssuePos("", "stored")
	srv.ExpirePositions()
	srv.Push(&slidingsync.Response{Pos: "A"})
	for _, pos := range []string{old, old, "stored"} {
		r := ssync(ctx, srv, pos, "0", `{}`)
		assert.Equal(t, http.StatusBadRequest, r.status, pos)
		assert.Equal(t, "M_UNKNOWN_POS", errcodeOf(t, r), pos)
	}
	assert.Equal(t, 1, srv.Pending())
	assert.Equal(t, "A", posOf(t, ssync(ctx, srv, "", "0", `{}`)))
	assert.Equal(t, "A", posOf(t, ssync(ctx, srv, "A", "0", `{}`)), "positions issued after the expiry are valid")
}

// TestSynapsePosIsPerConnection: a pos served on one conn_id is unknown on another.
func TestSynapsePosIsPerConnection(t *testing.T) {
	srv := slidingsynctest.NewServer(slidingsynctest.Options{})
	ctx := context.Background()
	pos := posOf(t, ssync(ctx, srv, "", "0", `{"conn_id":"a"}`))
	assert.Equal(t, pos, posOf(t, ssync(ctx, srv, pos, "0", `{"conn_id":"a"}`)))
	r := ssync(ctx, srv, pos, "0", `{"conn_id":"b"}`)
	assert.Equal(t, http.StatusBadRequest, r.status)
	assert.Equal(t, "M_UNKNOWN_POS", errcodeOf(t, r))
	r = ssync(ctx, srv, pos, "0", `{}`)
	assert.Equal(t, "M_UNKNOWN_POS", errcodeOf(t, r), "no conn_id is a connection of its own")
}

// TestSynapseRequestModel holds requests to Synapse's request model: its limits and required
// fields, and the error codes it picks. A refused request consumes nothing.
func TestSynapseRequestModel(t *testing.T) {
	name64, name65 := strings.Repeat("n", 64), strings.Repeat("n", 65)
	lists := func(n int) string {
		parts := make([]string, n)
		for i := range parts {
			parts[i] = fmt.Sprintf(`"l%d":%s`, i, okList)
		}
		return `{"lists":{` + strings.Join(parts, ",") + `}}`
	}
	for _, tc := range []struct {
		name, body, errcode string
	}{
		{"list name of 64 characters", `{"lists":{"` + name64 + `":` + okList + `}}`, ""},
		{"list name over 64 characters", `{"lists":{"` + name65 + `":` + okList + `}}`, "M_BAD_JSON"},
		{"100 lists", lists(100), ""},
		{"over 100 lists", lists(101), "M_BAD_JSON"},
		{"timeline_limit 1000", `{"lists":{"a":{"required_state":[],"timeline_limit":1000}}}`, ""},
		{"timeline_limit over 1000", `{"lists":{"a":{"required_state":[],"timeline_limit":1001}}}`, "M_BAD_JSON"},
		{"subscription timeline_limit over 1000", `{"room_subscriptions":{"!r:x":{"required_state":[],"timeline_limit":1001}}}`, "M_BAD_JSON"},
		{"list without required_state", `{"lists":{"a":{"ranges":[[0,1]],"timeline_limit":1}}}`, "M_MISSING_PARAM"},
		{"list without timeline_limit", `{"lists":{"a":{"ranges":[[0,1]],"required_state":[]}}}`, "M_MISSING_PARAM"},
		{"list with neither", `{"lists":{"a":{"ranges":[[0,1]]}}}`, "M_BAD_JSON"},
		{"subscription without timeline_limit", `{"room_subscriptions":{"!r:x":{"required_state":[]}}}`, "M_MISSING_PARAM"},
		{"subscription without required_state", `{"room_subscriptions":{"!r:x":{"timeline_limit":1}}}`, "M_MISSING_PARAM"},
		{"unknown fields are ignored", `{"lists":{"a":{"required_state":[],"timeline_limit":0,"whatever":1}},"x":true}`, ""},
		{"not JSON", `{"lists":`, "M_NOT_JSON"},
		{"not an object", `[1]`, "M_BAD_JSON"},
		{"wrong shape", `{"lists":5}`, "M_BAD_JSON"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := slidingsynctest.NewServer(slidingsynctest.Options{})
			srv.Push(&slidingsync.Response{Pos: "A"})
			r := ssync(context.Background(), srv, "", "", tc.body)
			if tc.errcode == "" {
				assert.Equal(t, "A", posOf(t, r))
				return
			}
			assert.Equal(t, http.StatusBadRequest, r.status, "body: %s", r.body)
			assert.Equal(t, tc.errcode, errcodeOf(t, r))
			assert.Equal(t, 1, srv.Pending())
		})
	}
}

// TestSynapseUnimplementedFiltersFail: filters.spaces and filters.room_name_like are accepted
// by Synapse's model and fail when the list is computed: 500 M_UNKNOWN, every time.
func TestSynapseUnimplementedFiltersFail(t *testing.T) {
	for _, filters := range []string{`{"spaces":["!s:x"]}`, `{"spaces":[]}`, `{"room_name_like":"ops"}`, `{"is_dm":true,"room_name_like":""}`} {
		t.Run(filters, func(t *testing.T) {
			srv := slidingsynctest.NewServer(slidingsynctest.Options{})
			srv.Push(nil)
			body := `{"lists":{"a":{"ranges":[[0,9]],"required_state":[],"timeline_limit":1,"filters":` + filters + `}}}`
			for range 3 {
				r := ssync(context.Background(), srv, "", "", body)
				assert.Equal(t, http.StatusInternalServerError, r.status)
				assert.Equal(t, "M_UNKNOWN", errcodeOf(t, r))
			}
			assert.Equal(t, 1, srv.Pending())
		})
	}
	srv := slidingsynctest.NewServer(slidingsynctest.Options{})
	r := ssync(context.Background(), srv, "", "", `{"lists":{"a":{"required_state":[],"timeline_limit":1,"filters":{"is_dm":false,"spaces":null}}}}`)
	assert.Equal(t, http.StatusOK, r.status, "other filters, and a null one, are fine")
}

// learnRooms serves a response that tells the client (and the server) the list "all":
// count rooms, the first len(ids) of them in activity order.
func learnRooms(t *testing.T, srv *slidingsynctest.Server, count int, ids ...id.RoomID) string {
	t.Helper()
	srv.Push(&slidingsync.Response{Lists: map[string]slidingsync.ListResponse{"all": {
		Count: slidingsync.Some(count),
		Ops:   []slidingsync.ListOp{{Op: slidingsync.ListOpSync, Range: &slidingsync.Range{Start: 0, End: len(ids) - 1}, RoomIDs: ids}},
	}}})
	return posOf(t, ssync(context.Background(), srv, "", "", `{}`))
}

// TestSynapseListsEchoRanges holds computed answers to Synapse's lists: the requested ranges
// echoed in SYNC ops, the rooms as last served, a full single range unsorted, and a list
// without ranges reduced to its count.
func TestSynapseListsEchoRanges(t *testing.T) {
	srv := slidingsynctest.NewServer(slidingsynctest.Options{})
	ctx := context.Background()
	pos := learnRooms(t, srv, 4, "!d:x", "!b:x", "!c:x", "!a:x")
	list := func(ranges string) string {
		body := `{"required_state":[],"timeline_limit":1}`
		if ranges != "" {
			body = `{"ranges":` + ranges + `,"required_state":[],"timeline_limit":1}`
		}
		return `{"lists":{"all":` + body + `}}`
	}
	for _, tc := range []struct {
		name, ranges, want string
	}{
		{"a range inside the list, sorted", `[[1,2]]`, `{"count":4,"ops":[{"op":"SYNC","range":[1,2],"room_ids":["!b:x","!c:x"]}]}`},
		{"two ranges, echoed as asked", `[[0,0],[2,50]]`, `{"count":4,"ops":[{"op":"SYNC","range":[0,0],"room_ids":["!d:x"]},{"op":"SYNC","range":[2,50],"room_ids":["!c:x","!a:x"]}]}`},
		{"one range covering the list is not sorted", `[[0,99]]`, `{"count":4,"ops":[{"op":"SYNC","range":[0,99],"room_ids":["!a:x","!b:x","!c:x","!d:x"]}]}`},
		{"exactly the list is not sorted either", `[[0,3]]`, `{"count":4,"ops":[{"op":"SYNC","range":[0,3],"room_ids":["!a:x","!b:x","!c:x","!d:x"]}]}`},
		{"one short of the list is sorted", `[[0,2]]`, `{"count":4,"ops":[{"op":"SYNC","range":[0,2],"room_ids":["!d:x","!b:x","!c:x"]}]}`},
		{"a range past the end", `[[7,9]]`, `{"count":4,"ops":[{"op":"SYNC","range":[7,9],"room_ids":[]}]}`},
		{"no ranges: the count only", ``, `{"count":4}`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := decoded(t, ssync(ctx, srv, pos, "0", list(tc.ranges)))
			assert.Equal(t, pos, m["pos"])
			assert.Equal(t, map[string]any{}, m["rooms"])
			got, err := json.Marshal(m["lists"].(map[string]any)["all"])
			require.NoError(t, err)
			assert.JSONEq(t, tc.want, string(got))
		})
	}
	m := decoded(t, ssync(ctx, srv, pos, "0", `{}`))
	assert.NotContains(t, m, "lists", "no lists requested, none sent")
	m = decoded(t, ssync(ctx, srv, pos, "0", `{"lists":{"other":{"ranges":[[0,1]],"required_state":[],"timeline_limit":1}}}`))
	got, _ := json.Marshal(m["lists"])
	assert.JSONEq(t, `{"other":{"count":0,"ops":[{"op":"SYNC","range":[0,1],"room_ids":[]}]}}`, string(got), "a list never served is empty")
}

// TestSynapseListResponse checks the helper Responders use against the same rules.
func TestSynapseListResponse(t *testing.T) {
	rooms := []id.RoomID{"!z:x", "!y:x", "!x:x"}
	cfg := func(ranges ...slidingsync.Range) slidingsync.ListConfig {
		return slidingsync.ListConfig{Ranges: ranges}
	}
	lr := slidingsynctest.SynapseListResponse(cfg(slidingsync.Range{Start: 0, End: 1}), rooms)
	assert.Equal(t, slidingsync.Some(3), lr.Count)
	require.Len(t, lr.Ops, 1)
	assert.Equal(t, []id.RoomID{"!z:x", "!y:x"}, lr.Ops[0].RoomIDs)
	lr = slidingsynctest.SynapseListResponse(cfg(slidingsync.Range{Start: 0, End: 20}), rooms)
	assert.Equal(t, &slidingsync.Range{Start: 0, End: 20}, lr.Ops[0].Range, "the range as requested")
	assert.Equal(t, []id.RoomID{"!x:x", "!y:x", "!z:x"}, lr.Ops[0].RoomIDs, "not sorted by activity")
	lr = slidingsynctest.SynapseListResponse(cfg(slidingsync.Range{Start: 0, End: 0}, slidingsync.Range{Start: 1, End: 20}), rooms)
	require.Len(t, lr.Ops, 2)
	assert.Equal(t, []id.RoomID{"!y:x", "!x:x"}, lr.Ops[1].RoomIDs, "two ranges are sorted")
	lr = slidingsynctest.SynapseListResponse(cfg(), rooms)
	assert.Empty(t, lr.Ops)
	assert.Equal(t, slidingsync.Some(3), lr.Count)
}

// TestSynapseResponderAnswerShape: a Responder's answer is sent as Synapse's encoder would:
// no null name or avatar, is_dm only when true, no ops on a list without ranges, rooms and
// extensions always present, lists absent when empty.
func TestSynapseResponderAnswerShape(t *testing.T) {
	srv := slidingsynctest.NewServer(slidingsynctest.Options{})
	srv.SetResponder(func(req *slidingsync.Request) *slidingsync.Response {
		ops := []slidingsync.ListOp{{Op: slidingsync.ListOpSync, Range: &slidingsync.Range{Start: 0, End: 1}, RoomIDs: []id.RoomID{"!a:x"}}}
		return &slidingsync.Response{
			Lists: map[string]slidingsync.ListResponse{"ranged": {Count: slidingsync.Some(1), Ops: ops}, "unranged": {Count: slidingsync.Some(1), Ops: ops}},
			Rooms: map[id.RoomID]*slidingsync.RoomResponse{
				"!a:x": {Name: slidingsync.Null[string](), Avatar: slidingsync.Null[id.ContentURIString](), IsDM: slidingsync.Some(false)},
				"!b:x": {Name: slidingsync.Some("B"), IsDM: slidingsync.Some(true)},
			},
		}
	})
	r := ssync(context.Background(), srv, "", "", `{"lists":{"ranged":`+okList+`,"unranged":{"required_state":[],"timeline_limit":1}}}`)
	assert.JSONEq(t, `{"pos":"1","extensions":{},
		"lists":{"ranged":{"count":1,"ops":[{"op":"SYNC","range":[0,1],"room_ids":["!a:x"]}]},"unranged":{"count":1}},
		"rooms":{"!a:x":{},"!b:x":{"name":"B","is_dm":true}}}`, string(r.body))

	srv.SetResponder(func(req *slidingsync.Request) *slidingsync.Response { return &slidingsync.Response{Pos: req.Pos} })
	r = ssync(context.Background(), srv, "1", "", `{}`)
	assert.JSONEq(t, `{"pos":"1","rooms":{},"extensions":{}}`, string(r.body), "a Responder with nothing new keeps the pos")
}

// TestSynapsePushedAnswersServedAsScripted: the shape rules do not touch pushed answers, so a
// script can serve what other servers send; the request checks still come first.
func TestSynapsePushedAnswersServedAsScripted(t *testing.T) {
	srv := slidingsynctest.NewServer(slidingsynctest.Options{})
	srv.Push(&slidingsync.Response{Rooms: map[id.RoomID]*slidingsync.RoomResponse{"!a:x": {Name: slidingsync.Null[string](), IsDM: slidingsync.Some(false)}}})
	r := ssync(context.Background(), srv, "", "", `{"lists":{"a":{"ranges":[[0,1]]}}}`)
	assert.Equal(t, http.StatusBadRequest, r.status, "checked before the script")
	r = ssync(context.Background(), srv, "", "", `{}`)
	assert.JSONEq(t, `{"pos":"1","rooms":{"!a:x":{"name":null,"is_dm":false}}}`, string(r.body))
}

// TestSynapseE2EESection holds the e2ee section of computed answers to Synapse's: counts
// (signed_curve25519 included, 0 when none) and fallback key types in every answer,
// device_lists only on answers to a request with pos, no section unless the request enabled
// it, and the values last set or served.
func TestSynapseE2EESection(t *testing.T) {
	srv := slidingsynctest.NewServer(slidingsynctest.Options{})
	ctx := context.Background()

	r := ssync(ctx, srv, "", "0", e2eeOn)
	pos := posOf(t, r)
	assert.Equal(t, map[string]any{
		"device_one_time_keys_count":       map[string]any{"signed_curve25519": float64(0)},
		"device_unused_fallback_key_types": []any{},
	}, e2eeOf(t, r), "a device without keys; no device_lists without pos")

	r = ssync(ctx, srv, pos, "0", e2eeOn)
	assert.Equal(t, map[string]any{"changed": []any{}, "left": []any{}}, e2eeOf(t, r)["device_lists"], "an incremental answer has device_lists")

	r = ssync(ctx, srv, pos, "0", `{"lists":{},"extensions":{"e2ee":{"enabled":false},"to_device":{"enabled":true,"since":"5"}}}`)
	assert.Nil(t, e2eeOf(t, r), "not enabled, not sent")
	exts := decoded(t, r)["extensions"].(map[string]any)
	assert.Equal(t, map[string]any{"next_batch": "5", "events": []any{}}, exts["to_device"])

	srv.SetE2EE(slidingsynctest.E2EEState{
		OneTimeKeyCounts:       map[id.KeyAlgorithm]int{id.KeyAlgorithmSignedCurve25519: 50},
		UnusedFallbackKeyTypes: []id.KeyAlgorithm{id.KeyAlgorithmSignedCurve25519},
	})
	sec := e2eeOf(t, ssync(ctx, srv, pos, "0", e2eeOn))
	assert.Equal(t, map[string]any{"signed_curve25519": float64(50)}, sec["device_one_time_keys_count"])
	assert.Equal(t, []any{"signed_curve25519"}, sec["device_unused_fallback_key_types"])

	// A served answer's counts are what the next computed one repeats; device_lists are not.
	srv.Push(&slidingsync.Response{Extensions: map[string]json.RawMessage{"e2ee": json.RawMessage(
		`{"device_one_time_keys_count":{"signed_curve25519":7},"device_lists":{"changed":["@u:x"],"left":[]}}`)}})
	pos = posOf(t, ssync(ctx, srv, pos, "0", e2eeOn))
	sec = e2eeOf(t, ssync(ctx, srv, pos, "0", e2eeOn))
	assert.Equal(t, map[string]any{"signed_curve25519": float64(7)}, sec["device_one_time_keys_count"])
	assert.Equal(t, []any{"signed_curve25519"}, sec["device_unused_fallback_key_types"], "absent in the served answer: unchanged")
	assert.Equal(t, map[string]any{"changed": []any{}, "left": []any{}}, sec["device_lists"])

	// A Responder's section is completed, and dropped when the request did not enable it.
	srv.SetResponder(func(req *slidingsync.Request) *slidingsync.Response {
		return &slidingsync.Response{Extensions: map[string]json.RawMessage{"e2ee": json.RawMessage(`{"device_lists":{"changed":["@v:x"],"left":[]}}`)}}
	})
	sec = e2eeOf(t, ssync(ctx, srv, "", "0", e2eeOn))
	assert.Equal(t, map[string]any{"signed_curve25519": float64(7)}, sec["device_one_time_keys_count"])
	assert.NotContains(t, sec, "device_lists", "no device_lists on an answer to a request without pos")
	sec = e2eeOf(t, ssync(ctx, srv, pos, "0", e2eeOn))
	assert.Equal(t, map[string]any{"changed": []any{"@v:x"}, "left": []any{}}, sec["device_lists"])
	assert.Nil(t, e2eeOf(t, ssync(ctx, srv, pos, "0", `{}`)))
}

// TestPoliteOptOut keeps the behaviour tests had before the Synapse personality: any pos, no
// request model, a fresh pos on every answer and {"pos": "N"} when nothing happened.
func TestPoliteOptOut(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		srv := slidingsynctest.NewServer(slidingsynctest.Options{Personality: slidingsynctest.PersonalityPolite})
		srv.SetE2EE(slidingsynctest.E2EEState{}) // no effect on a polite server
		start := time.Now()
		r := ssync(t.Context(), srv, "from-a-proxy", "1000", `{"lists":{"a":{"ranges":[[0,1]],"filters":{"spaces":["!s:x"]}}},"extensions":{"e2ee":{"enabled":true}}}`)
		assert.Equal(t, time.Second, time.Since(start))
		assert.JSONEq(t, `{"pos":"1"}`, string(r.body))
		srv.PushIdle(nil)
		assert.JSONEq(t, `{"pos":"2"}`, string(ssync(t.Context(), srv, "1", "", `{}`).body))
		srv.ExpirePositions()
		assert.Equal(t, "3", posOf(t, ssync(t.Context(), srv, "2", "", `{}`)), "nothing expires on a polite server")
	})
}
