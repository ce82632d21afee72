package crypto

import (
	"context"
	"encoding/json"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/sliding-e2ee/sdk/slidingsync"
)

const roomBody = `{
	"pos": "1",
	"rooms": {
		"!room:example.org": {
			"initial": true,
			"required_state": [
				{"type": "m.room.encryption", "state_key": "", "sender": "@alice:example.org", "event_id": "$e", "origin_server_ts": 1, "content": {"algorithm": "m.megolm.v1.aes-sha2"}},
				{"type": "m.room.member", "state_key": "@alice:example.org", "sender": "@alice:example.org", "event_id": "$a", "origin_server_ts": 1, "content": {"membership": "join"}},
				{"type": "m.room.member", "state_key": "@bob:example.org", "sender": "@bob:example.org", "event_id": "$b2", "origin_server_ts": 3, "content": {"membership": "leave"}},
				{"type": "m.room.name", "state_key": ""}
			],
			"timeline": [
				{"type": "m.room.member", "state_key": "@bob:example.org", "sender": "@bob:example.org", "event_id": "$b1", "origin_server_ts": 2, "content": {"membership": "join"}},
				{"type": "m.room.member", "state_key": "@carol:example.org", "sender": "@carol:example.org", "event_id": "$c", "origin_server_ts": 2, "content": {"membership": "invite"}},
				{"type": "m.room.message", "sender": "@carol:example.org", "event_id": "$m", "origin_server_ts": 4, "content": {"msgtype": "m.text", "body": "hi"}}
			]
		},
		"!plain:example.org": {
			"initial": true,
			"required_state": [
				{"type": "m.room.member", "state_key": "@alice:example.org", "sender": "@alice:example.org", "event_id": "$p", "origin_server_ts": 1, "content": {"membership": "join"}}
			]
		}
	}
}`

func TestUpdateStateStore(t *testing.T) {
	ctx := context.Background()
	var resp slidingsync.Response
	require.NoError(t, json.Unmarshal([]byte(roomBody), &resp))
	store := mautrix.NewMemoryStateStore()
	updateStateStore(ctx, store, &slidingsync.Result{Response: &resp})

	const room id.RoomID = "!room:example.org"
	enc, err := store.IsEncrypted(ctx, room)
	require.NoError(t, err)
	assert.True(t, enc)
	enc, err = store.IsEncrypted(ctx, "!plain:example.org")
	require.NoError(t, err)
	assert.False(t, enc)
	for user, want := range map[id.UserID]event.Membership{
		alice: event.MembershipJoin,
		bob:   event.MembershipLeave, // required_state (current) wins over the timeline
		carol: event.MembershipInvite,
	} {
		got, err := store.GetMember(ctx, room, user)
		require.NoError(t, err)
		assert.Equal(t, want, got.Membership, user)
	}
	// The response's events are left as they were.
	assert.Empty(t, resp.Rooms[room].RequiredState[0].RoomID)
}

func TestRequiredState(t *testing.T) {
	all := RequiredState(true)
	assert.False(t, all.LazyMembers)
	assert.Contains(t, all.Include, slidingsync.StateFilter{Type: "m.room.member", StateKey: "*"})
	assert.Contains(t, all.Include, slidingsync.StateFilter{Type: "m.room.encryption", StateKey: ""})
	lazy := RequiredState(false)
	assert.True(t, lazy.LazyMembers)
	assert.NotContains(t, lazy.Include, slidingsync.StateFilter{Type: "m.room.member", StateKey: "*"})
}
