// Command ssinspect prints what a sliding sync database holds: every connection with its pos,
// lists, rooms and extension checkpoints (e2ee knowledge, the to-device cursor), the most
// recently active rooms with their merged state, and, when the database also holds the crypto
// layer's tables (package crypto, mautrix's crypto store) or the example bot's, the tracked and
// outdated users, the fallback key state and the bot's task queue. It only reads, apart from
// bringing the store's tables up to date as every program using the store does.
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
	"time"

	"go.mau.fi/util/dbutil"

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
	return printCrypto(ctx, out, db, maxRooms)
}

// printCrypto prints the crypto layer's durable state and the example bot's task queue, for
// the tables that exist.
func printCrypto(ctx context.Context, out io.Writer, db *dbutil.Database, maxUsers int) error {
	has := func(table string) bool {
		ok, err := db.TableExists(ctx, table)
		return err == nil && ok
	}
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	defer tw.Flush()
	if has("crypto_tracked_user") {
		var tracked, outdated int
		if err := db.QueryRow(ctx, `SELECT COUNT(*), COALESCE(SUM(CASE WHEN devices_outdated THEN 1 ELSE 0 END), 0) FROM crypto_tracked_user`).
			Scan(&tracked, &outdated); err != nil {
			return fmt.Errorf("count tracked users: %w", err)
		}
		fmt.Fprintln(tw, "crypto")
		fmt.Fprintf(tw, "  tracked users\t%d, %d with outdated devices\n", tracked, outdated)
	}
	if has("sdkcrypto_outdated_user") {
		rows, err := db.Query(ctx, `SELECT user_id, gen FROM sdkcrypto_outdated_user ORDER BY user_id`)
		users, err := dbutil.NewRowIterWithError(rows, func(s dbutil.Scannable) (string, error) {
			var u string
			var gen int64
			err := s.Scan(&u, &gen)
			return fmt.Sprintf("%s (generation %d)", u, gen), err
		}, err).AsList()
		if err != nil {
			return fmt.Errorf("read outdated users: %w", err)
		}
		fmt.Fprintf(tw, "  users to query\t%d\n", len(users))
		for _, u := range users[:min(len(users), maxUsers)] {
			fmt.Fprintf(tw, "    %s\n", u)
		}
	}
	if has("sdkcrypto_fallback_key") {
		rows, err := db.Query(ctx, `SELECT account_id, upload_pending, uploaded, rotated_at FROM sdkcrypto_fallback_key ORDER BY account_id`)
		lines, err := dbutil.NewRowIterWithError(rows, func(s dbutil.Scannable) (string, error) {
			var acc string
			var pending, uploaded bool
			var rotated int64
			err := s.Scan(&acc, &pending, &uploaded, &rotated)
			state := "uploaded"
			switch {
			case rotated == 0:
				state = "none generated yet"
			case !uploaded:
				state = "generated, upload pending"
			}
			if pending {
				state += ", the server reported it used"
			}
			if rotated != 0 {
				state += ", last rotated " + time.UnixMilli(rotated).UTC().Format(time.RFC3339)
			}
			return fmt.Sprintf("  fallback key %s\t%s\n", acc, state), err
		}, err).AsList()
		if err != nil {
			return fmt.Errorf("read fallback key state: %w", err)
		}
		for _, l := range lines {
			fmt.Fprint(tw, l)
		}
	}
	if has("ssbot_inbox") {
		var pending, done, sends, unsettled int
		if err := db.QueryRow(ctx, `SELECT COALESCE(SUM(CASE WHEN done THEN 0 ELSE 1 END), 0), COALESCE(SUM(CASE WHEN done THEN 1 ELSE 0 END), 0) FROM ssbot_inbox`).
			Scan(&pending, &done); err != nil {
			return fmt.Errorf("count bot events: %w", err)
		}
		if err := db.QueryRow(ctx, `SELECT COUNT(*), COALESCE(SUM(CASE WHEN event_id IS NULL THEN 1 ELSE 0 END), 0) FROM ssbot_outbox`).
			Scan(&sends, &unsettled); err != nil {
			return fmt.Errorf("count bot sends: %w", err)
		}
		fmt.Fprintf(tw, "bot events\t%d pending, %d handled\n", pending, done)
		fmt.Fprintf(tw, "bot sends\t%d, %d with an unknown outcome\n", sends, unsettled)
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
	case "e2ee":
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
