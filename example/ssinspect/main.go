// Command ssinspect prints what a sliding sync database holds: every connection with its pos,
// lists, rooms and extension checkpoints (e2ee knowledge, the to-device cursor), and the most
// recently active rooms with their merged state. It only reads, apart from bringing the store's
// tables up to date as every program using the store does.
//
//	go run -tags goolm ./example/ssinspect -db e2eebot.db [-rooms 10]
package main

import (
	"cmp"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"maps"
	"os"
	"slices"
	"strings"
	"text/tabwriter"

	"maunium.net/go/mautrix/event"

	"github.com/sliding-e2ee/sdk/e2ee"
	"github.com/sliding-e2ee/sdk/slidingsync"
	"github.com/sliding-e2ee/sdk/slidingsync/sqlstore"
	"github.com/sliding-e2ee/sdk/slidingsync/sqlstore/dbopen"
)

func main() {
	dbPath := flag.String("db", "e2eebot.db", "SQLite path or postgres:// URI")
	rooms := flag.Int("rooms", 10, "how many of the most recently active rooms to show per connection")
	flag.Parse()
	if err := run(context.Background(), os.Stdout, *dbPath, *rooms); err != nil {
		fmt.Fprintln(os.Stderr, "ssinspect:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, out io.Writer, target string, maxRooms int) error {
	if !strings.Contains(target, "://") {
		if _, err := os.Stat(target); err != nil {
			return fmt.Errorf("no database at %s: %w", target, err)
		}
	}
	db, err := dbopen.Open(target, dbopen.Config{})
	if err != nil {
		return err
	}
	defer db.Close()
	store := sqlstore.New(db, nil)
	if err := store.Upgrade(ctx); err != nil {
		return err
	}
	keys, err := store.Conns(ctx)
	if err != nil {
		return err
	}
	if len(keys) == 0 {
		fmt.Fprintln(out, "no sliding sync connections stored")
		return nil
	}
	for _, key := range keys {
		cp, err := store.Load(ctx, key)
		if err != nil {
			return fmt.Errorf("load %v: %w", key, err)
		}
		printConn(out, key, cp, maxRooms)
	}
	return nil
}

func printConn(out io.Writer, key slidingsync.ConnKey, cp *slidingsync.Checkpoint, maxRooms int) {
	connID := key.ConnID
	if connID == "" {
		connID = "(default)"
	}
	fmt.Fprintf(out, "connection %s / %s / %s\n", key.UserID, key.DeviceID, connID)
	tw := tabwriter.NewWriter(out, 2, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "  pos\t%s\n", cp.Pos)
	for _, name := range slices.Sorted(maps.Keys(cp.Lists)) {
		ls := cp.Lists[name]
		fmt.Fprintf(tw, "  list %s\t%d rooms, %d in the window\n", name, ls.Count, len(ls.Rooms))
	}
	stale := 0
	for _, rs := range cp.Rooms {
		if rs.MembersStale {
			stale++
		}
	}
	fmt.Fprintf(tw, "  rooms\t%d known, %d with stale membership\n", len(cp.Rooms), stale)
	for _, name := range slices.Sorted(maps.Keys(cp.Extensions)) {
		fmt.Fprintf(tw, "  extension %s\t%s\n", name, describeExtension(name, cp.Extensions[name]))
	}
	tw.Flush()

	rooms := slices.SortedFunc(maps.Values(cp.Rooms), func(a, b *slidingsync.RoomState) int {
		if c := cmp.Compare(b.BumpStamp, a.BumpStamp); c != 0 {
			return c
		}
		return strings.Compare(string(a.ID), string(b.ID))
	})
	if len(rooms) > maxRooms {
		rooms = rooms[:maxRooms]
	}
	if len(rooms) == 0 {
		fmt.Fprintln(out)
		return
	}
	tw = tabwriter.NewWriter(out, 2, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "  ROOM\tNAME\tENCRYPTED\tJOINED\tSTATE\tTIMELINE\tFLAGS")
	for _, rs := range rooms {
		encrypted := "no"
		if rs.StateEvent(event.StateEncryption, "") != nil {
			encrypted = "yes"
		}
		var flags []string
		if rs.IsDM {
			flags = append(flags, "dm")
		}
		if rs.Limited {
			flags = append(flags, "limited")
		}
		if rs.MembersStale {
			flags = append(flags, "members-stale")
		}
		fmt.Fprintf(tw, "  %s\t%s\t%s\t%d\t%d\t%d\t%s\n", rs.ID, rs.Name, encrypted, rs.JoinedCount,
			len(rs.State), len(rs.Timeline), strings.Join(flags, ","))
	}
	tw.Flush()
	fmt.Fprintln(out)
}

// describeExtension summarises the checkpoints of the SDK's own extensions and shows others
// raw.
func describeExtension(name string, raw json.RawMessage) string {
	switch name {
	case e2ee.E2EEName:
		var st e2ee.State
		if err := json.Unmarshal(raw, &st); err != nil {
			return "undecodable: " + err.Error()
		}
		counts := "unknown"
		if st.OTKCountsKnown {
			counts = fmt.Sprint(st.OTKCounts)
		}
		fallback := "never reported"
		if st.FallbackKeyTypesKnown {
			fallback = fmt.Sprint(st.FallbackKeyTypes)
		}
		return fmt.Sprintf("active=%t, one-time keys %s, unused fallback keys %s", st.Active, counts, fallback)
	case "to_device":
		var cp struct {
			Since string `json:"since"`
		}
		if err := json.Unmarshal(raw, &cp); err != nil {
			return "undecodable: " + err.Error()
		}
		if cp.Since == "" {
			return "nothing acknowledged yet"
		}
		return "acknowledged up to " + cp.Since
	}
	if raw == nil {
		return "(empty)"
	}
	return string(raw)
}
