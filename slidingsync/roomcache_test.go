package slidingsync_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"testing"
	"testing/synctest"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/sliding-e2ee/sdk/slidingsync"
	"github.com/sliding-e2ee/sdk/slidingsync/slidingsynctest"
	"github.com/sliding-e2ee/sdk/slidingsync/storetest"
)

// noLoaderStore hides MemoryStore's RoomLoader methods.
type noLoaderStore struct{ slidingsync.Store }

func TestRoomCacheNeedsRoomLoader(t *testing.T) {
	cli := slidingsynctest.NewServer(slidingsynctest.Options{}).NewClient()
	_, err := slidingsync.New(cli, slidingsync.Config{RoomCache: 10, Store: noLoaderStore{slidingsync.NewMemoryStore()}})
	assert.ErrorContains(t, err, "RoomLoader")
	_, err = slidingsync.New(cli, slidingsync.Config{RoomCache: -1})
	assert.Error(t, err)
	_, err = slidingsync.New(cli, slidingsync.Config{RoomCache: 10})
	assert.NoError(t, err, "the default MemoryStore is a RoomLoader")
}

// randomRoomResponses returns n responses over a few rooms that mix initial entries, partial
// updates, explicit nulls, timeline events and gaps, so that most merges need the room's
// previous state.
func randomRoomResponses(seed uint64, n int) []*slidingsync.Response {
	rng := rand.New(rand.NewPCG(seed, 0))
	rooms := make([]id.RoomID, 12)
	for i := range rooms {
		rooms[i] = id.RoomID(fmt.Sprintf("!r%d:x", i))
	}
	out := make([]*slidingsync.Response, n)
	for i := range out {
		resp := &slidingsync.Response{Pos: fmt.Sprintf("p%d", i+1), Rooms: map[id.RoomID]*slidingsync.RoomResponse{}}
		for range 1 + rng.IntN(4) {
			roomID := rooms[rng.IntN(len(rooms))]
			rr := &slidingsync.RoomResponse{Initial: i == 0 || rng.IntN(6) == 0}
			switch rng.IntN(3) {
			case 0:
				rr.Name = slidingsync.Some(fmt.Sprintf("name %d", i))
			case 1:
				rr.Name = slidingsync.Null[string]()
			}
			if rng.IntN(2) == 0 {
				rr.JoinedCount = slidingsync.Some(rng.IntN(50))
			}
			for j := range rng.IntN(3) {
				rr.Timeline = append(rr.Timeline, &event.Event{
					ID: id.EventID(fmt.Sprintf("$e%d-%d", i, j)), Type: event.EventMessage, Sender: "@u:x",
					Content: event.Content{VeryRaw: []byte(fmt.Sprintf(`{"msgtype":"m.text","body":"%d"}`, i))},
				})
			}
			rr.Limited = rng.IntN(8) == 0
			resp.Rooms[roomID] = rr
		}
		out[i] = resp
	}
	return out
}

// runResponses feeds resps to a Conn with cfg on store and returns once the last is processed.
func runResponses(t *testing.T, store slidingsync.Store, cfg slidingsync.Config, resps []*slidingsync.Response) *slidingsync.Conn {
	t.Helper()
	cfg.Store = store
	cfg.CompactState = true
	srv := slidingsynctest.NewServer(slidingsynctest.Options{})
	h := startWith(t, srv, srv.NewClient(), slidingsync.ProtocolMSC4186, cfg)
	for _, resp := range resps {
		srv.Push(resp)
	}
	h.run()
	_, err := srv.WaitRequests(context.Background(), len(resps)+1)
	require.NoError(t, err)
	synctest.Wait()
	require.ErrorIs(t, h.stop(t), context.Canceled)
	require.Equal(t, resps[len(resps)-1].Pos, h.conn.Pos())
	return h.conn
}

// TestRoomCacheMergesLikeAFullModel checks that a Conn keeping 3 rooms in memory, restarted
// half-way, stores exactly what a Conn keeping every room stores.
func TestRoomCacheMergesLikeAFullModel(t *testing.T) {
	for seed := range uint64(20) {
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				resps := randomRoomResponses(seed, 40)
				full := slidingsync.NewMemoryStore()
				runResponses(t, full, slidingsync.Config{}, resps)

				cached := slidingsync.NewMemoryStore()
				runResponses(t, cached, slidingsync.Config{RoomCache: 3}, resps[:20])
				conn := runResponses(t, cached, slidingsync.Config{RoomCache: 3}, resps[20:])
				assert.LessOrEqual(t, len(conn.Rooms()), 3, "rooms kept in memory")

				def := slidingsynctest.NewServer(slidingsynctest.Options{}).Options() // the identity runResponses uses
				key := slidingsync.ConnKey{UserID: def.UserID, DeviceID: def.DeviceID}
				want, err := full.Load(context.Background(), key)
				require.NoError(t, err)
				got, err := cached.Load(context.Background(), key)
				require.NoError(t, err)
				require.Greater(t, len(got.Rooms), 3)
				storetest.AssertEqual(t, want, got)

				// LoadRoom reads a room that is no longer in memory.
				for roomID, rs := range got.Rooms {
					loaded, ok, err := conn.LoadRoom(context.Background(), roomID)
					require.NoError(t, err)
					require.True(t, ok, roomID)
					assert.Equal(t, rs.Name, loaded.Name, roomID)
				}
				_, ok, err := conn.LoadRoom(context.Background(), "!unknown:x")
				require.NoError(t, err)
				assert.False(t, ok)
			})
		})
	}
}
