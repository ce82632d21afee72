package slidingsync

import (
	"bytes"
	"fmt"
	"maps"
	"runtime"
	"slices"
	"strconv"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
)

// The benchmarks share one process so that their numbers compare: go test -bench . runs
// them all in the same binary, on the same generated bodies.

const benchRoomCount = 10000

// benchIncrementalRooms are the five rooms of the small incremental response for a list of n
// rooms: first, last and a few in between.
func benchIncrementalRooms(n int) []int { return []int{0, 17, n * 4242 / 10000, n * 9 / 10, n - 1} }

func benchRoomID(i int) id.RoomID { return id.RoomID(fmt.Sprintf("!room%05d:synapse.example", i)) }

// benchEvent writes one event in the shape Synapse serialises it (no room_id, unsigned.age).
func benchEvent(buf *bytes.Buffer, evtType, stateKey, sender, content string, ts int64, eventID string, isState bool) {
	buf.WriteString(`{"type":`)
	buf.WriteString(strconv.Quote(evtType))
	if isState {
		buf.WriteString(`,"state_key":`)
		buf.WriteString(strconv.Quote(stateKey))
	}
	buf.WriteString(`,"sender":`)
	buf.WriteString(strconv.Quote(sender))
	buf.WriteString(`,"content":`)
	buf.WriteString(content)
	buf.WriteString(`,"origin_server_ts":`)
	buf.WriteString(strconv.FormatInt(ts, 10))
	buf.WriteString(`,"unsigned":{"age":`)
	buf.WriteString(strconv.FormatInt(1795900000000-ts, 10))
	buf.WriteString(`},"event_id":`)
	buf.WriteString(strconv.Quote(eventID))
	buf.WriteString(`}`)
}

func benchMember(i, m int) string { return fmt.Sprintf("@user%05d-%d:synapse.example", i, m) }

// benchMembers is 2 or 3, so a room has 4 to 6 required state events.
func benchMembers(i int) int { return 2 + (i % 3 / 2) }

func benchEncrypted(i int) bool { return i%2 == 0 }

func benchInitialRoom(buf *bytes.Buffer, i int) {
	ts := int64(1795800000000 + i*1000)
	creator := benchMember(i, 0)
	members := benchMembers(i)
	fmt.Fprintf(buf, `%q:{"bump_stamp":%d,"joined_count":%d,"invited_count":0,"notification_count":0,"highlight_count":0,"name":"Room %d","initial":true,"required_state":[`,
		benchRoomID(i), 2000000-i, members, i)
	benchEvent(buf, "m.room.create", "", creator, fmt.Sprintf(`{"room_version":"10","creator":%q}`, creator), ts, fmt.Sprintf("$create-%d", i), true)
	buf.WriteByte(',')
	benchEvent(buf, "m.room.name", "", creator, fmt.Sprintf(`{"name":"Room %d"}`, i), ts+1, fmt.Sprintf("$name-%d", i), true)
	if benchEncrypted(i) {
		buf.WriteByte(',')
		benchEvent(buf, "m.room.encryption", "", creator, `{"algorithm":"m.megolm.v1.aes-sha2"}`, ts+2, fmt.Sprintf("$encryption-%d", i), true)
	}
	for m := range members {
		buf.WriteByte(',')
		benchEvent(buf, "m.room.member", benchMember(i, m), benchMember(i, m),
			fmt.Sprintf(`{"membership":"join","displayname":"User %d-%d"}`, i, m), ts+3+int64(m), fmt.Sprintf("$member-%d-%d", i, m), true)
	}
	buf.WriteString(`],"timeline":[`)
	benchEvent(buf, "m.room.message", "", benchMember(i, 1), fmt.Sprintf(`{"msgtype":"m.text","body":"hello from room %d"}`, i), ts+10, fmt.Sprintf("$msg-%d-0", i), false)
	fmt.Fprintf(buf, `],"limited":true,"prev_batch":"t%d-1000_1_1_1_1_1_1_1_1_1","num_live":0}`, i)
}

// benchAllListOp is Synapse's SYNC op over the whole list, in the room order of the list.
func benchAllListOp(buf *bytes.Buffer, n int, order func(k int) int) {
	fmt.Fprintf(buf, `"all":{"count":%d,"ops":[{"op":"SYNC","range":[0,%d],"room_ids":[`, n, n-1)
	for k := range n {
		if k > 0 {
			buf.WriteByte(',')
		}
		buf.WriteString(strconv.Quote(string(benchRoomID(order(k)))))
	}
	buf.WriteString(`]}]}`)
}

// benchInitial is an initial response for n rooms in Synapse's shape.
func benchInitial(n int) []byte {
	var buf bytes.Buffer
	buf.Grow(n * 1700)
	buf.WriteString(`{"pos":"1/s1000_1_1_1_1_1_1_1_1_1","lists":{`)
	benchAllListOp(&buf, n, func(k int) int { return k })
	buf.WriteString(`},"rooms":{`)
	for i := range n {
		if i > 0 {
			buf.WriteByte(',')
		}
		benchInitialRoom(&buf, i)
	}
	buf.WriteString(`},"extensions":{"e2ee":{"device_one_time_keys_count":{"signed_curve25519":50},"device_unused_fallback_key_types":["signed_curve25519"]},"to_device":{"next_batch":"1","events":[]}}}`)
	return buf.Bytes()
}

// benchIncremental is a small incremental response: five rooms with one or two new messages
// each. withSync adds what Synapse really sends on every response, the SYNC op over the
// whole requested range (with the five rooms moved to the top).
func benchIncremental(rooms int, withSync bool) []byte {
	var buf bytes.Buffer
	buf.WriteString(`{"pos":"2/s1010_1_1_1_1_1_1_1_1_1","lists":{`)
	if withSync {
		moved := map[int]bool{}
		for _, i := range benchIncrementalRooms(rooms) {
			moved[i] = true
		}
		order := benchIncrementalRooms(rooms)
		for i := range rooms {
			if !moved[i] {
				order = append(order, i)
			}
		}
		benchAllListOp(&buf, rooms, func(k int) int { return order[k] })
	} else {
		fmt.Fprintf(&buf, `"all":{"count":%d}`, rooms)
	}
	buf.WriteString(`},"rooms":{`)
	for n, i := range benchIncrementalRooms(rooms) {
		if n > 0 {
			buf.WriteByte(',')
		}
		events := 1 + n%2
		ts := int64(1795850000000 + i*1000)
		fmt.Fprintf(&buf, `%q:{"bump_stamp":%d,"joined_count":%d,"invited_count":0,"notification_count":0,"highlight_count":0,"timeline":[`,
			benchRoomID(i), 3000000+n, benchMembers(i))
		for e := range events {
			if e > 0 {
				buf.WriteByte(',')
			}
			benchEvent(&buf, "m.room.message", "", benchMember(i, 0), fmt.Sprintf(`{"msgtype":"m.text","body":"news %d"}`, e), ts+int64(e), fmt.Sprintf("$news-%d-%d", i, e), false)
		}
		fmt.Fprintf(&buf, `],"limited":false,"prev_batch":"t%d-1010_1_1_1_1_1_1_1_1_1","num_live":%d}`, i, events)
	}
	buf.WriteString(`},"extensions":{"e2ee":{"device_lists":{"changed":[],"left":[]},"device_one_time_keys_count":{"signed_curve25519":50},"device_unused_fallback_key_types":["signed_curve25519"]},"to_device":{"next_batch":"1","events":[]}}}`)
	return buf.Bytes()
}

var (
	benchInitialBody             = sync.OnceValue(func() []byte { return benchInitial(benchRoomCount) })
	benchIncrementalBody         = sync.OnceValue(func() []byte { return benchIncremental(benchRoomCount, false) })
	benchIncrementalWithSyncBody = sync.OnceValue(func() []byte { return benchIncremental(benchRoomCount, true) })
)

// benchState is what a client holds after merging a response.
type benchState struct {
	lists map[string]ListState
	rooms map[id.RoomID]*RoomState
}

// decodeMerge is the pure part of processing a response, as Conn does it: decode, merge every
// list and every room of the response against what is known, collect the results.
func decodeMerge(body []byte, known *benchState) (*benchState, error) {
	resp, err := DecodeResponse(body)
	if err != nil {
		return nil, err
	}
	out := &benchState{
		lists: make(map[string]ListState, len(resp.Lists)),
		rooms: make(map[id.RoomID]*RoomState, len(resp.Rooms)),
	}
	for name, lr := range resp.Lists {
		ls, err := MergeList(known.lists[name], lr)
		if err != nil {
			return nil, err
		}
		out.lists[name] = ls
	}
	for roomID, rr := range resp.Rooms {
		out.rooms[roomID] = MergeRoom(known.rooms[roomID], roomID, rr, 0)
	}
	return out, nil
}

func mustDecodeMerge(tb testing.TB, body []byte, known *benchState) *benchState {
	tb.Helper()
	out, err := decodeMerge(body, known)
	if err != nil {
		tb.Fatal(err)
	}
	return out
}

var emptyBenchState = &benchState{}

var benchKnown10k = sync.OnceValues(func() (*benchState, error) {
	return decodeMerge(benchInitialBody(), emptyBenchState)
})

var benchSink any

// mallocs returns the number of heap allocations so far.
func mallocs() uint64 {
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.Mallocs
}

func reportPerRoom(b *testing.B, startMallocs uint64, rooms int) {
	b.ReportMetric(float64(mallocs()-startMallocs)/float64(b.N)/float64(rooms), "allocs/room")
}

// benchDecode measures plain decoding of body, the floor the merge benchmarks compare to.
// With withKnown set, the 10 000-room state the incremental merge benchmarks merge into is kept
// alive, so that both run with the same live heap and the difference is the merge, not the
// garbage collector.
func benchDecode(b *testing.B, body []byte, rooms int, withKnown bool) {
	if withKnown {
		known, err := benchKnown10k()
		if err != nil {
			b.Fatal(err)
		}
		defer runtime.KeepAlive(known)
	}
	b.SetBytes(int64(len(body)))
	b.ReportAllocs()
	start := mallocs()
	for b.Loop() {
		resp, err := DecodeResponse(body)
		if err != nil {
			b.Fatal(err)
		}
		benchSink = resp
	}
	reportPerRoom(b, start, rooms)
}

func BenchmarkDecodeInitial10k(b *testing.B) {
	benchDecode(b, benchInitialBody(), benchRoomCount, false)
}

func BenchmarkDecodeMergeInitial10k(b *testing.B) {
	body := benchInitialBody()
	b.SetBytes(int64(len(body)))
	b.ReportAllocs()
	start := mallocs()
	for b.Loop() {
		benchSink = mustDecodeMerge(b, body, emptyBenchState)
	}
	reportPerRoom(b, start, benchRoomCount)
}

func BenchmarkDecodeIncremental5(b *testing.B) {
	benchDecode(b, benchIncrementalBody(), len(benchIncrementalRooms(benchRoomCount)), true)
}

func BenchmarkDecodeMergeIncremental5(b *testing.B) {
	body := benchIncrementalBody()
	known, err := benchKnown10k() // built before the timed loop starts
	if err != nil {
		b.Fatal(err)
	}
	b.SetBytes(int64(len(body)))
	b.ReportAllocs()
	start := mallocs()
	for b.Loop() {
		benchSink = mustDecodeMerge(b, body, known)
	}
	reportPerRoom(b, start, len(benchIncrementalRooms(benchRoomCount)))
}

// The same five rooms with the SYNC op Synapse repeats on every response.
func BenchmarkDecodeIncremental5WithSync(b *testing.B) {
	benchDecode(b, benchIncrementalWithSyncBody(), len(benchIncrementalRooms(benchRoomCount)), true)
}

func BenchmarkDecodeMergeIncremental5WithSync(b *testing.B) {
	body := benchIncrementalWithSyncBody()
	known, err := benchKnown10k()
	if err != nil {
		b.Fatal(err)
	}
	b.SetBytes(int64(len(body)))
	b.ReportAllocs()
	start := mallocs()
	for b.Loop() {
		benchSink = mustDecodeMerge(b, body, known)
	}
	reportPerRoom(b, start, len(benchIncrementalRooms(benchRoomCount)))
}

// TestBenchmarkBodies checks that the generator makes the bodies the benchmarks claim, on a
// list small enough to keep the race detector fast; the benchmarks use benchRoomCount.
func TestBenchmarkBodies(t *testing.T) {
	const n = 300
	known := mustDecodeMerge(t, benchInitial(n), emptyBenchState)
	require.Len(t, known.rooms, n)
	all := known.lists["all"]
	assert.Equal(t, n, all.Count)
	require.Len(t, all.Rooms, n)
	assert.Equal(t, benchRoomID(0), all.Rooms[0])
	assert.Equal(t, benchRoomID(n-1), all.Rooms[n-1])
	sizes := map[int]int{}
	for i := range n {
		rs := known.rooms[benchRoomID(i)]
		require.NotNil(t, rs)
		sizes[len(rs.State)]++
		require.Len(t, rs.Timeline, 1)
		require.Equal(t, benchEncrypted(i), rs.StateEvent(event.StateEncryption, "") != nil)
		require.Equal(t, fmt.Sprintf("Room %d", i), rs.Name)
		require.Zero(t, rs.NotificationCount)
	}
	assert.Equal(t, []int{4, 5, 6}, slices.Sorted(maps.Keys(sizes)), "4 to 6 required state events per room")

	for _, withSync := range []bool{false, true} {
		body := benchIncremental(n, withSync)
		resp, err := DecodeResponse(body)
		require.NoError(t, err)
		require.Len(t, resp.Rooms, 5)
		for _, rr := range resp.Rooms {
			assert.False(t, rr.Initial)
			assert.NotEmpty(t, rr.Timeline)
			assert.LessOrEqual(t, len(rr.Timeline), 2)
		}
		next := mustDecodeMerge(t, body, known)
		assert.Equal(t, n, next.lists["all"].Count)
		if withSync {
			assert.Equal(t, benchRoomID(17), next.lists["all"].Rooms[1])
			assert.Equal(t, benchRoomID(1), next.lists["all"].Rooms[5])
		} else {
			assert.Len(t, next.lists["all"].Rooms, n, "a count-only list keeps the window")
		}
		assert.Len(t, next.rooms[benchRoomID(17)].Timeline, 3, "1 initial message and 2 new ones")
	}
}

// BenchmarkStateHeap10k reports the live heap the state model of a 10 000-room initial
// response keeps, per room, with decoded events and with CompactState.
func BenchmarkStateHeap10k(b *testing.B) {
	body := benchInitialBody()
	for _, compact := range []bool{false, true} {
		b.Run(fmt.Sprintf("compact=%v", compact), func(b *testing.B) {
			var perRoom float64
			for b.Loop() {
				runtime.GC()
				var before, after runtime.MemStats
				runtime.ReadMemStats(&before)
				st := mustDecodeMerge(b, body, emptyBenchState)
				if compact {
					for roomID, rs := range st.rooms {
						st.rooms[roomID] = compactRoom(rs)
					}
				}
				runtime.GC()
				runtime.ReadMemStats(&after)
				perRoom = float64(after.HeapAlloc-before.HeapAlloc) / float64(len(st.rooms))
				runtime.KeepAlive(st)
			}
			b.ReportMetric(perRoom, "live-B/room")
		})
	}
}
