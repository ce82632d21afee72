package slidingsynctest_test

import (
	"context"
	"fmt"
	"time"

	"maunium.net/go/mautrix/id"

	"github.com/sliding-e2ee/sdk/slidingsync"
	"github.com/sliding-e2ee/sdk/slidingsync/slidingsynctest"
)

// A bot's test scripts one response, runs a connection until the server has seen the next
// request (so the response was processed), then checks the merged room.
func Example() {
	srv := slidingsynctest.NewServer(slidingsynctest.Options{Protocol: slidingsync.ProtocolMSC4186})
	defer srv.Close()
	lobby := id.RoomID("!lobby:example.org")
	srv.Push(&slidingsync.Response{Rooms: map[id.RoomID]*slidingsync.RoomResponse{
		lobby: {Initial: true, Name: slidingsync.Some("Lobby"), JoinedCount: slidingsync.Some(2)},
	}})

	conn, err := slidingsync.New(srv.NewClient(), slidingsync.Config{
		Protocol: slidingsync.ProtocolMSC4186,
		Lists:    map[string]slidingsync.List{"all": {ListConfig: slidingsync.ListConfig{Ranges: []slidingsync.Range{{Start: 0, End: 9}}}}},
	})
	if err != nil {
		panic(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- conn.Run(ctx) }()

	// A Conn sends its next request only after processing the previous response.
	waitCtx, waitCancel := context.WithTimeout(ctx, 10*time.Second)
	defer waitCancel()
	if _, err := srv.WaitRequests(waitCtx, 2); err != nil {
		panic(err)
	}
	cancel()
	fmt.Println("run:", <-done)

	room, ok := conn.Room(lobby)
	fmt.Println(ok, room.Name, room.JoinedCount, conn.Pos())
	fmt.Println("second request pos:", srv.Requests()[1].Parsed.Pos)
	// Output:
	// run: context canceled
	// true Lobby 2 1
	// second request pos: 1
}
