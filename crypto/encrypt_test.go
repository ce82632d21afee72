package crypto

import (
	"context"
	"encoding/json"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"maunium.net/go/mautrix"
	mcrypto "maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/sliding-e2ee/sdk/e2ee"
	"github.com/sliding-e2ee/sdk/slidingsync"
)

// EncryptRoomEvent shares the room key with every member's devices, fetching the member list
// once and again after a limited timeline, querying members whose devices changed first, and
// sharing a new session after a membership change.
func TestEncryptRoomEvent(t *testing.T) {
	ctx := context.Background()
	const room id.RoomID = "!enc:example.org"
	const aliceDevice id.DeviceID = "ALICEDEV"
	bot := newEnv(t, Config{})
	al := newEnvAs(t, Config{}, alice, aliceDevice)
	link(bot, al)
	bot.setUp(ctx)
	al.setUp(ctx)
	bot.hs.members = map[id.RoomID][]id.UserID{room: {testUser, alice}}
	store := bot.olm.StateStore.(interface {
		IsEncrypted(context.Context, id.RoomID) (bool, error)
	})

	empty, aliceKey := "", alice.String()
	stateEvt := func(typ event.Type, key *string, content string) *event.Event {
		return &event.Event{Type: typ, StateKey: key, Sender: alice, ID: id.EventID("$" + typ.Type + *key),
			Content: event.Content{VeryRaw: json.RawMessage(content)}}
	}
	res := func(rr *slidingsync.RoomResponse) *slidingsync.Result {
		return &slidingsync.Result{Response: &slidingsync.Response{Rooms: map[id.RoomID]*slidingsync.RoomResponse{room: rr}}}
	}
	bot.m.HandleRooms(ctx, res(&slidingsync.RoomResponse{Initial: true, RequiredState: []*event.Event{
		stateEvt(event.StateEncryption, &empty, `{"algorithm":"m.megolm.v1.aes-sha2"}`),
		stateEvt(event.StateMember, &aliceKey, `{"membership":"join"}`),
	}}))
	enc, err := store.IsEncrypted(ctx, room)
	require.NoError(t, err)
	require.True(t, enc)

	sent := func() int {
		bot.hs.mu.Lock()
		defer bot.hs.mu.Unlock()
		return len(bot.hs.sent)
	}
	fetches := func() int {
		bot.hs.mu.Lock()
		defer bot.hs.mu.Unlock()
		return bot.hs.memberFetches
	}
	encrypt := func(body string) *event.EncryptedEventContent {
		t.Helper()
		c, err := bot.m.EncryptRoomEvent(ctx, room, event.EventMessage, &event.MessageEventContent{MsgType: event.MsgText, Body: body})
		require.NoError(t, err)
		return c
	}
	// alice receives the room key over to-device and decrypts.
	decrypts := func(c *event.EncryptedEventContent, body string) {
		t.Helper()
		bot.hs.mu.Lock()
		var toDev struct {
			Messages map[id.UserID]map[id.DeviceID]json.RawMessage `json:"messages"`
		}
		require.NoError(t, json.Unmarshal(bot.hs.sent[len(bot.hs.sent)-1], &toDev))
		bot.hs.mu.Unlock()
		if raw, ok := toDev.Messages[alice][aliceDevice]; ok {
			al.deliver(testUser, raw)
		}
		raw, err := json.Marshal(c)
		require.NoError(t, err)
		evt := &event.Event{Type: event.EventEncrypted, Sender: testUser, RoomID: room, ID: id.EventID("$" + body)}
		require.NoError(t, json.Unmarshal(raw, &evt.Content))
		require.NoError(t, evt.Content.ParseRaw(evt.Type))
		dec, err := al.olm.DecryptMegolmEvent(ctx, evt)
		require.NoError(t, err)
		assert.Equal(t, body, dec.Content.AsMessage().Body)
	}

	c := encrypt("one")
	assert.Equal(t, 1, fetches(), "the member list is fetched before the first encryption")
	require.Equal(t, 1, sent(), "the room key went to alice")
	decrypts(c, "one")

	encrypt("two")
	assert.Equal(t, 1, fetches(), "no new fetch")
	assert.Equal(t, 1, sent(), "the session is reused")

	// A limited timeline may hide membership changes: the list is fetched again.
	bot.m.HandleRooms(ctx, res(&slidingsync.RoomResponse{Limited: true}))
	encrypt("three")
	assert.Equal(t, 2, fetches())

	// alice's devices changed: she is queried before the next key share.
	_, queriesBefore := bot.hs.snapshot()
	require.NoError(t, bot.m.record(ctx, &e2ee.Delta{Changed: []id.UserID{alice}}))
	// A membership change in the timeline discards the outbound session.
	carolKey := carol.String()
	join := stateEvt(event.StateMember, &carolKey, `{"membership":"join"}`)
	join.Sender = carol
	bot.m.HandleRooms(ctx, res(&slidingsync.RoomResponse{Timeline: []*event.Event{join}}))
	c = encrypt("four")
	_, queries := bot.hs.snapshot()
	assert.Contains(t, queries[len(queriesBefore):], []id.UserID{alice}, "alice's devices are queried again first")
	assert.Equal(t, 2, sent(), "a new session went out after the membership change")
	decrypts(c, "four")
}

// A crash after mautrix stored a user's new devices but before it discarded the sessions
// shared with them leaves a query that finds nothing new: the settle of the user's change
// still discards the room's outbound session, so the new device gets the next room key.
func TestSettledChangeDiscardsSharedSessions(t *testing.T) {
	ctx := context.Background()
	const room id.RoomID = "!shared:example.org"
	bot := newEnv(t, Config{})
	ss := bot.olm.StateStore.(mautrix.StateStore)
	require.NoError(t, ss.SetEncryptionEvent(ctx, room, &event.EncryptionEventContent{Algorithm: id.AlgorithmMegolmV1}))
	require.NoError(t, ss.SetMembership(ctx, room, alice, event.MembershipJoin))
	require.NoError(t, ss.SetMembership(ctx, room, testUser, event.MembershipJoin))
	// alice's devices are already stored as the server will answer them (none): the query
	// after the "crash" finds no change.
	bot.track(alice)
	// Another encrypted room with alice but no session, and one without alice with a session.
	const sessionless, elsewhere id.RoomID = "!quiet:example.org", "!elsewhere:example.org"
	for _, r := range []id.RoomID{sessionless, elsewhere} {
		require.NoError(t, ss.SetEncryptionEvent(ctx, r, &event.EncryptionEventContent{Algorithm: id.AlgorithmMegolmV1}))
		require.NoError(t, ss.SetMembership(ctx, r, testUser, event.MembershipJoin))
	}
	require.NoError(t, ss.SetMembership(ctx, sessionless, alice, event.MembershipJoin))
	for _, r := range []id.RoomID{room, elsewhere} {
		sess, err := mcrypto.NewOutboundGroupSession(r, nil, nil)
		require.NoError(t, err)
		sess.Shared = true
		require.NoError(t, bot.store.AddOutboundGroupSession(ctx, sess))
	}

	require.NoError(t, bot.m.record(ctx, &e2ee.Delta{Changed: []id.UserID{alice}}))
	_, err := bot.m.refreshOutdated(ctx)
	require.NoError(t, err)
	got, err := bot.store.GetOutboundGroupSession(ctx, room)
	require.NoError(t, err)
	assert.Nil(t, got, "the session shared with alice is discarded")
	got, err = bot.store.GetOutboundGroupSession(ctx, elsewhere)
	require.NoError(t, err)
	assert.NotNil(t, got, "a session in a room without alice stays")
	assert.Empty(t, bot.outdated())
}
