package slidingsync

import (
	"encoding/json"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"maunium.net/go/mautrix/event"
)

func TestCompactRoom(t *testing.T) {
	var rr RoomResponse
	require.NoError(t, json.Unmarshal([]byte(`{
		"initial": true,
		"required_state": [
			{"type": "m.room.member", "state_key": "@a:x", "sender": "@a:x", "event_id": "$m",
			 "content": {"membership": "join", "displayname": "A"}, "unsigned": {"prev_content": {"membership": "invite"}}},
			{"type": "m.room.encryption", "state_key": "", "sender": "@a:x", "event_id": "$e", "content": {"algorithm": "m.megolm.v1.aes-sha2"}}
		],
		"timeline": [{"type": "m.room.message", "sender": "@a:x", "event_id": "$t", "content": {"msgtype": "m.text", "body": "hi"}}],
		"invite_state": [{"type": "m.room.name", "state_key": "", "sender": "@a:x", "content": {"name": "N"}}]
	}`), &rr))
	full := MergeRoom(nil, "!r:x", &rr, 0)
	before, err := json.Marshal(full)
	require.NoError(t, err)

	small := compactRoom(full)
	require.NotSame(t, full, small)
	var events []*event.Event
	for _, e := range small.State {
		events = append(events, e)
	}
	events = append(events, small.Timeline...)
	events = append(events, small.InviteState...)
	require.Len(t, events, 4)
	for _, e := range events {
		assert.Nil(t, e.Content.Raw, "%s: no decoded map", e.Type.Type)
		assert.Nil(t, e.Content.Parsed, "%s: no parsed content", e.Type.Type)
		assert.NotEmpty(t, e.Content.VeryRaw)
	}
	member := small.StateEvent(event.StateMember, "@a:x")
	require.NotNil(t, member.Unsigned.PrevContent)
	assert.Nil(t, member.Unsigned.PrevContent.Raw)

	// The original is untouched, and both encode to the same JSON.
	assert.Equal(t, "A", full.StateEvent(event.StateMember, "@a:x").Content.Raw["displayname"])
	assert.Equal(t, "hi", full.Timeline[0].Content.Raw["body"])
	after, err := json.Marshal(small)
	require.NoError(t, err)
	assert.JSONEq(t, string(before), string(after))

	// The content is one ParseRaw away, on a copy: the state is shared.
	content := member.Content
	require.NoError(t, content.ParseRaw(event.StateMember))
	assert.Equal(t, "A", content.AsMember().Displayname)
	assert.Nil(t, member.Content.Parsed)

	// Already compact, or nothing to compact: the same value back.
	again := compactRoom(compactRoom(full))
	assert.Equal(t, again, compactRoom(again))
	assert.Same(t, again, compactRoom(again))
	assert.Nil(t, compactRoom(nil))
	code := &RoomState{ID: "!c:x", Timeline: []*event.Event{{Type: event.EventMessage, Content: event.Content{Parsed: &event.MessageEventContent{Body: "built in code"}}}}}
	assert.Same(t, code, compactRoom(code), "events without raw JSON are kept")
}
