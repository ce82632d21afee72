package sqlstore

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/rs/zerolog"
	"go.mau.fi/util/dbutil"

	"github.com/sliding-e2ee/sdk/slidingsync"
	"maunium.net/go/mautrix/id"
)

// defaultRoomBatchSize is how many rooms one INSERT statement writes when Store.RoomBatchSize is
// zero. SQLite allows 32766 parameters per statement and PostgreSQL 65535; a room takes two.
const defaultRoomBatchSize = 1000

const maxRoomBatchSize = 16000

// Store is a [slidingsync.Store] in a SQL database (SQLite or PostgreSQL) through dbutil. It is
// safe for concurrent use; see the package documentation for its guarantees.
type Store struct {
	// DB is the store's child database: it shares the connection pool and the transaction of
	// the database passed to New, and has its own version table.
	DB *dbutil.Database
	// RoomBatchSize is how many rooms one multi-row INSERT writes. Zero means
	// 1000; values above 16000 are cut to 16000.
	RoomBatchSize int

	stmts stmtCache
}

var _ slidingsync.RoomLoader = (*Store)(nil)

// New returns a store on db, in a child database with its own version table
// ([versionTableName]). log may be nil to use db's logger. Call Upgrade before using the store.
// New registers no SQL driver: the application opens db with the driver it wants.
func New(db *dbutil.Database, log dbutil.DatabaseLogger) *Store {
	return &Store{DB: db.Child(versionTableName, upgradeTable, log)}
}

// Upgrade creates or upgrades the store's tables.
func (s *Store) Upgrade(ctx context.Context) error {
	return s.DB.Upgrade(ctx)
}

const (
	upsertConnQuery = `
		INSERT INTO slidingsync_conn (user_id, device_id, conn_id, pos) VALUES ($1, $2, $3, $4)
		ON CONFLICT (user_id, device_id, conn_id) DO UPDATE SET pos=excluded.pos
	`
	upsertConnOriginQuery = `
		INSERT INTO slidingsync_conn (user_id, device_id, conn_id, pos, origin) VALUES ($1, $2, $3, $4, $5)
		ON CONFLICT (user_id, device_id, conn_id) DO UPDATE SET pos=excluded.pos, origin=excluded.origin
	`
	upsertListQuery = `
		INSERT INTO slidingsync_list (user_id, device_id, conn_id, name, state) VALUES ($1, $2, $3, $4, $5)
		ON CONFLICT (user_id, device_id, conn_id, name) DO UPDATE SET state=excluded.state
	`
	upsertRoomQuery = `
		INSERT INTO slidingsync_room (user_id, device_id, conn_id, room_id, state) VALUES ($1, $2, $3, $4, $5)
		ON CONFLICT (user_id, device_id, conn_id, room_id) DO UPDATE SET state=excluded.state
	`
	upsertExtensionQuery = `
		INSERT INTO slidingsync_extension (user_id, device_id, conn_id, name, checkpoint) VALUES ($1, $2, $3, $4, $5)
		ON CONFLICT (user_id, device_id, conn_id, name) DO UPDATE SET checkpoint=excluded.checkpoint
	`
	getPosQuery        = `SELECT pos, origin FROM slidingsync_conn WHERE user_id=$1 AND device_id=$2 AND conn_id=$3`
	getListsQuery      = `SELECT name, state FROM slidingsync_list WHERE user_id=$1 AND device_id=$2 AND conn_id=$3`
	getRoomsQuery      = `SELECT room_id, state FROM slidingsync_room WHERE user_id=$1 AND device_id=$2 AND conn_id=$3`
	getExtensionsQuery = `SELECT name, checkpoint FROM slidingsync_extension WHERE user_id=$1 AND device_id=$2 AND conn_id=$3`
)

// namedBlob is a row of JSON under a name. The JSON is passed as a string: the columns are
// TEXT, which PostgreSQL takes without the hex encoding lib/pq gives []byte.
type namedBlob struct {
	name string
	data []byte
}

func (nb *namedBlob) GetMassInsertValues() [2]any {
	return [2]any{nb.name, string(nb.data)}
}

var (
	massUpsertRooms = dbutil.NewMassInsertBuilder[*namedBlob, [3]any](upsertRoomQuery, "($1, $2, $3, $%d, $%d)")
	massUpsertLists = dbutil.NewMassInsertBuilder[*namedBlob, [3]any](upsertListQuery, "($1, $2, $3, $%d, $%d)")
)

func keyParams(key slidingsync.ConnKey) [3]any {
	return [3]any{key.UserID, key.DeviceID, key.ConnID}
}

// Commit implements [slidingsync.Store]: in one transaction it runs every TxnHook with the
// transaction's context, stores pos, and upserts every list, room and extension checkpoint of
// the update. Rooms and lists not in the update are kept. If ctx already carries a
// transaction of the same parent database, Commit joins it.
func (s *Store) Commit(ctx context.Context, key slidingsync.ConnKey, upd *slidingsync.Update) error {
	if upd == nil {
		return errors.New("sqlstore: nil update")
	}
	if s.DB.Dialect == dbutil.SQLite {
		// A SQLite commit is local and short: once begun it runs to its end. A context that
		// cannot be cancelled also spares a watcher goroutine per statement (modernc) and per
		// transaction (database/sql), which is most of an idle cycle's commit.
		ctx = context.WithoutCancel(ctx)
	}
	if posOnly(upd) {
		// An idle long-poll: one statement is atomic on its own.
		if _, err := s.stmts.exec(ctx, s.DB, upsertConnQuery, key.UserID, key.DeviceID, key.ConnID, upd.Pos); err != nil {
			return fmt.Errorf("sqlstore: store pos: %w", err)
		}
		return nil
	}
	lists := make([]*namedBlob, 0, len(upd.Lists))
	for name, ls := range upd.Lists {
		data, err := json.Marshal(ls)
		if err != nil {
			return fmt.Errorf("sqlstore: encode list %q: %w", name, err)
		}
		lists = append(lists, &namedBlob{name: name, data: data})
	}
	batch := s.RoomBatchSize
	if batch <= 0 {
		batch = defaultRoomBatchSize
	}
	batch = min(batch, maxRoomBatchSize)
	// Rooms are encoded on other goroutines while the transaction begins and writes.
	rooms, err := startRoomEncoder(upd.Rooms, batch)
	if err != nil {
		return err
	}
	defer rooms.close()
	static := keyParams(key)
	return s.DB.DoTxn(ctx, nil, func(ctx context.Context) error {
		for i, hook := range upd.TxnHooks {
			if err := hook(ctx); err != nil {
				return fmt.Errorf("sqlstore: transaction hook %d: %w", i, err)
			}
		}
		if err := s.storePos(ctx, key, upd); err != nil {
			return err
		}
		if len(lists) > 0 {
			query, params := massUpsertLists.Build(static, lists)
			if _, err := s.DB.Exec(ctx, query, params...); err != nil {
				return fmt.Errorf("sqlstore: store lists: %w", err)
			}
		}
		err := rooms.each(func(rows []*namedBlob) error {
			query, params := massUpsertRooms.Build(static, rows)
			if _, err := s.DB.Exec(ctx, query, params...); err != nil {
				return fmt.Errorf("sqlstore: store rooms: %w", err)
			}
			return nil
		})
		if err != nil {
			return err
		}
		for name, raw := range upd.Extensions {
			var data []byte
			if len(raw) > 0 {
				data = raw
			}
			if _, err := s.stmts.exec(ctx, s.DB, upsertExtensionQuery, key.UserID, key.DeviceID, key.ConnID, name, data); err != nil {
				return fmt.Errorf("sqlstore: store checkpoint of extension %q: %w", name, err)
			}
		}
		zerolog.Ctx(ctx).Trace().
			Str("pos", upd.Pos).
			Int("rooms", len(upd.Rooms)).
			Int("lists", len(lists)).
			Int("extensions", len(upd.Extensions)).
			Msg("Committed sliding sync update")
		return nil
	})
}

// storePos writes pos, and the origin when the update sets one.
func (s *Store) storePos(ctx context.Context, key slidingsync.ConnKey, upd *slidingsync.Update) error {
	var err error
	if upd.Origin != "" {
		_, err = s.DB.Exec(ctx, upsertConnOriginQuery, key.UserID, key.DeviceID, key.ConnID, upd.Pos, upd.Origin)
	} else {
		_, err = s.stmts.exec(ctx, s.DB, upsertConnQuery, key.UserID, key.DeviceID, key.ConnID, upd.Pos)
	}
	if err != nil {
		return fmt.Errorf("sqlstore: store pos: %w", err)
	}
	return nil
}

// posOnly reports whether an update writes nothing but pos (an origin goes through the
// transaction: it is written once per connection).
func posOnly(upd *slidingsync.Update) bool {
	return upd.Origin == "" && len(upd.Lists) == 0 && len(upd.Rooms) == 0 && len(upd.Extensions) == 0 && len(upd.TxnHooks) == 0
}

// Load implements [slidingsync.Store]. It reads in one transaction (REPEATABLE READ on
// PostgreSQL) so that it sees one commit, never parts of two.
func (s *Store) Load(ctx context.Context, key slidingsync.ConnKey) (*slidingsync.Checkpoint, error) {
	return s.loadTxn(ctx, key, true)
}

// LoadHead implements [slidingsync.RoomLoader]: Load without the rooms.
func (s *Store) LoadHead(ctx context.Context, key slidingsync.ConnKey) (*slidingsync.Checkpoint, error) {
	return s.loadTxn(ctx, key, false)
}

func (s *Store) loadTxn(ctx context.Context, key slidingsync.ConnKey, withRooms bool) (*slidingsync.Checkpoint, error) {
	var opts *dbutil.TxnOptions
	if s.DB.Dialect == dbutil.Postgres {
		opts = &dbutil.TxnOptions{Isolation: sql.LevelRepeatableRead, ReadOnly: true}
	}
	var cp *slidingsync.Checkpoint
	err := s.DB.DoTxn(ctx, opts, func(ctx context.Context) error {
		var err error
		cp, err = s.load(ctx, key, withRooms)
		return err
	})
	if err != nil {
		return nil, err
	}
	return cp, nil
}

// loadRoomsChunk bounds the room IDs of one LoadRooms query.
const loadRoomsChunk = 500

// LoadRooms implements [slidingsync.RoomLoader]. It reads up to 500 rooms per query.
func (s *Store) LoadRooms(ctx context.Context, key slidingsync.ConnKey, roomIDs []id.RoomID) (map[id.RoomID]*slidingsync.RoomState, error) {
	out := make(map[id.RoomID]*slidingsync.RoomState, len(roomIDs))
	var query strings.Builder
	for chunk := range slices.Chunk(roomIDs, loadRoomsChunk) {
		query.Reset()
		query.WriteString(getRoomsQuery)
		query.WriteString(" AND room_id IN (")
		params := make([]any, 0, 3+len(chunk))
		params = append(params, key.UserID, key.DeviceID, key.ConnID)
		for i, roomID := range chunk {
			if i > 0 {
				query.WriteByte(',')
			}
			fmt.Fprintf(&query, "$%d", 4+i)
			params = append(params, roomID)
		}
		query.WriteByte(')')
		err := s.scanBlobs(ctx, query.String(), params, func(name string, data []byte) error {
			rs, err := decodeRoom(name, data)
			if err == nil {
				out[id.RoomID(name)] = rs
			}
			return err
		})
		if err != nil {
			return nil, err
		}
	}
	return out, nil
}

func decodeRoom(name string, data []byte) (*slidingsync.RoomState, error) {
	rs := &slidingsync.RoomState{}
	if err := json.Unmarshal(data, rs); err != nil {
		return nil, fmt.Errorf("sqlstore: decode room %s: %w", name, err)
	}
	return rs, nil
}

func (s *Store) load(ctx context.Context, key slidingsync.ConnKey, withRooms bool) (*slidingsync.Checkpoint, error) {
	cp := &slidingsync.Checkpoint{}
	err := s.DB.QueryRow(ctx, getPosQuery, key.UserID, key.DeviceID, key.ConnID).Scan(&cp.Pos, &cp.Origin)
	if errors.Is(err, sql.ErrNoRows) {
		return cp, nil
	} else if err != nil {
		return nil, fmt.Errorf("sqlstore: load pos: %w", err)
	}
	cp.Lists = make(map[string]slidingsync.ListState)
	err = s.scanBlobs(ctx, getListsQuery, keyArgs(key), func(name string, data []byte) error {
		var ls slidingsync.ListState
		if err := json.Unmarshal(data, &ls); err != nil {
			return fmt.Errorf("sqlstore: decode list %q: %w", name, err)
		}
		cp.Lists[name] = ls
		return nil
	})
	if err != nil {
		return nil, err
	}
	if withRooms {
		cp.Rooms = make(map[id.RoomID]*slidingsync.RoomState)
		err = s.scanBlobs(ctx, getRoomsQuery, keyArgs(key), func(name string, data []byte) error {
			rs, err := decodeRoom(name, data)
			cp.Rooms[id.RoomID(name)] = rs
			return err
		})
		if err != nil {
			return nil, err
		}
	}
	cp.Extensions = make(map[string]json.RawMessage)
	err = s.scanBlobs(ctx, getExtensionsQuery, keyArgs(key), func(name string, data []byte) error {
		if len(data) == 0 {
			data = nil
		}
		cp.Extensions[name] = data
		return nil
	})
	if err != nil {
		return nil, err
	}
	return cp, nil
}

func keyArgs(key slidingsync.ConnKey) []any {
	return []any{key.UserID, key.DeviceID, key.ConnID}
}

func (s *Store) scanBlobs(ctx context.Context, query string, args []any, fn func(name string, data []byte) error) error {
	rows, err := s.DB.Query(ctx, query, args...)
	if err != nil {
		return fmt.Errorf("sqlstore: load: %w", err)
	}
	defer rows.Close()
	for rows.Next() {
		var name string
		var data []byte
		if err := rows.Scan(&name, &data); err != nil {
			return fmt.Errorf("sqlstore: load: %w", err)
		}
		if err := fn(name, data); err != nil {
			return err
		}
	}
	if err := rows.Err(); err != nil {
		return fmt.Errorf("sqlstore: load: %w", err)
	}
	return nil
}

// Conns returns the key of every stored connection, ordered by user, device and conn_id, for
// tools that show or clean up what a database holds.
func (s *Store) Conns(ctx context.Context) ([]slidingsync.ConnKey, error) {
	rows, err := s.DB.Query(ctx, `SELECT user_id, device_id, conn_id FROM slidingsync_conn ORDER BY user_id, device_id, conn_id`)
	if err != nil {
		return nil, fmt.Errorf("sqlstore: list connections: %w", err)
	}
	defer rows.Close()
	var keys []slidingsync.ConnKey
	for rows.Next() {
		var key slidingsync.ConnKey
		if err := rows.Scan(&key.UserID, &key.DeviceID, &key.ConnID); err != nil {
			return nil, fmt.Errorf("sqlstore: list connections: %w", err)
		}
		keys = append(keys, key)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("sqlstore: list connections: %w", err)
	}
	return keys, nil
}

// Delete forgets everything stored for key, in one transaction: pos, lists, rooms and
// extension checkpoints. It does not rely on foreign keys being enforced.
func (s *Store) Delete(ctx context.Context, key slidingsync.ConnKey) error {
	return s.DB.DoTxn(ctx, nil, func(ctx context.Context) error {
		for _, table := range []string{"slidingsync_list", "slidingsync_room", "slidingsync_extension", "slidingsync_conn"} {
			query := "DELETE FROM " + table + " WHERE user_id=$1 AND device_id=$2 AND conn_id=$3"
			if _, err := s.DB.Exec(ctx, query, key.UserID, key.DeviceID, key.ConnID); err != nil {
				return fmt.Errorf("sqlstore: delete from %s: %w", table, err)
			}
		}
		return nil
	})
}

// roomEncoder encodes the rooms of an update in batches on up to GOMAXPROCS goroutines, so
// that the transaction writes one batch while the next ones are encoded.
type roomEncoder struct {
	ids     []id.RoomID
	states  []*slidingsync.RoomState
	batch   int
	results []chan encodedBatch
	next    atomic.Int64
	stop    chan struct{}
	wg      sync.WaitGroup
}

type encodedBatch struct {
	rows []*namedBlob
	err  error
}

// startRoomEncoder starts encoding. The caller must call close, which returns after every
// goroutine stopped.
func startRoomEncoder(rooms map[id.RoomID]*slidingsync.RoomState, batch int) (*roomEncoder, error) {
	e := &roomEncoder{
		ids:    make([]id.RoomID, 0, len(rooms)),
		states: make([]*slidingsync.RoomState, 0, len(rooms)),
		batch:  batch,
		stop:   make(chan struct{}),
	}
	for roomID, rs := range rooms {
		if rs == nil {
			return nil, fmt.Errorf("sqlstore: room %s has nil state", roomID)
		}
		e.ids = append(e.ids, roomID)
		e.states = append(e.states, rs)
	}
	batches := (len(e.ids) + batch - 1) / batch
	e.results = make([]chan encodedBatch, batches)
	for i := range e.results {
		e.results[i] = make(chan encodedBatch, 1)
	}
	for range min(runtime.GOMAXPROCS(0), batches) {
		e.wg.Go(e.work)
	}
	return e, nil
}

func (e *roomEncoder) work() {
	for {
		i := int(e.next.Add(1)) - 1
		if i >= len(e.results) {
			return
		}
		select {
		case <-e.stop:
			return
		default:
		}
		from, to := i*e.batch, min((i+1)*e.batch, len(e.ids))
		rows := make([]*namedBlob, 0, to-from)
		var err error
		for j := from; j < to; j++ {
			var data []byte
			// RoomState.MarshalJSON returns compact JSON: calling it directly saves
			// json.Marshal's second pass over it.
			data, err = e.states[j].MarshalJSON()
			if err != nil {
				err = fmt.Errorf("sqlstore: encode room %s: %w", e.ids[j], err)
				break
			}
			rows = append(rows, &namedBlob{name: string(e.ids[j]), data: data})
		}
		e.results[i] <- encodedBatch{rows: rows, err: err}
	}
}

// each calls fn with every encoded batch, in order, and stops at the first error.
func (e *roomEncoder) each(fn func(rows []*namedBlob) error) error {
	for _, ch := range e.results {
		res := <-ch
		if res.err != nil {
			return res.err
		}
		if err := fn(res.rows); err != nil {
			return err
		}
	}
	return nil
}

func (e *roomEncoder) close() {
	close(e.stop)
	e.wg.Wait()
}
