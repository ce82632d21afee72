package crypto

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"strings"

	"github.com/rs/zerolog"
	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix/id"
)

// Device lists.
//
// mautrix keeps one flag per tracked user (crypto_tracked_user.devices_outdated) and clears it
// when FetchKeys stores the user's devices (PutDevices), whenever the query was sent. A change
// recorded while a query is in flight would be cleared by that query's completion. So every
// mark also bumps a generation in sdkcrypto_outdated_user, in the same transaction; the fetcher
// notes the generations before it queries and afterwards deletes only the rows whose
// generation did not move. A user whose row is still there was changed during the query: the
// fetcher marks them outdated again and queries once more. The rows are durable, so a crash
// between the query and that check loses nothing: every user with a row is treated as
// outdated.

const chunkSize = 500

const (
	bumpGenQuery = `
		INSERT INTO sdkcrypto_outdated_user (user_id, gen) VALUES ($1, 1)
		ON CONFLICT (user_id) DO UPDATE SET gen = sdkcrypto_outdated_user.gen + 1
	`
	bumpAllGenQuery = `
		INSERT INTO sdkcrypto_outdated_user (user_id, gen) SELECT user_id, 1 FROM crypto_tracked_user WHERE true
		ON CONFLICT (user_id) DO UPDATE SET gen = sdkcrypto_outdated_user.gen + 1
	`
	markAllOutdatedQuery   = `UPDATE crypto_tracked_user SET devices_outdated = true`
	untrackQuery           = `DELETE FROM crypto_tracked_user WHERE user_id = $1`
	deleteGenQuery         = `DELETE FROM sdkcrypto_outdated_user WHERE user_id = $1`
	deleteGenIfQuery       = `DELETE FROM sdkcrypto_outdated_user WHERE user_id = $1 AND gen = $2`
	selectGensQuery        = `SELECT user_id, gen FROM sdkcrypto_outdated_user`
	selectGenUsersPrefix   = `SELECT user_id FROM sdkcrypto_outdated_user WHERE user_id IN (`
	selectTrackedPrefix    = `SELECT user_id FROM crypto_tracked_user WHERE user_id IN (`
	markOutdatedListPrefix = `UPDATE crypto_tracked_user SET devices_outdated = true WHERE user_id IN (`
)

// inList returns "$1,$2,...)" and the parameters for users.
func inList(users []id.UserID) (string, []any) {
	var sb strings.Builder
	params := make([]any, len(users))
	for i, u := range users {
		if i > 0 {
			sb.WriteByte(',')
		}
		fmt.Fprintf(&sb, "$%d", i+1)
		params[i] = u
	}
	sb.WriteByte(')')
	return sb.String(), params
}

// queryUsers runs prefix+list for users in chunks and returns the user IDs it selects.
func (m *Machine) queryUsers(ctx context.Context, prefix string, users []id.UserID) ([]id.UserID, error) {
	var out []id.UserID
	for chunk := range slices.Chunk(users, chunkSize) {
		list, params := inList(chunk)
		rows, err := m.db.Query(ctx, prefix+list, params...)
		got, err := dbutil.NewRowIterWithError(rows, dbutil.ScanSingleColumn[id.UserID], err).AsList()
		if err != nil {
			return nil, err
		}
		out = append(out, got...)
	}
	return out, nil
}

// execUsers runs prefix+list for users in chunks.
func (m *Machine) execUsers(ctx context.Context, prefix string, users []id.UserID) error {
	for chunk := range slices.Chunk(users, chunkSize) {
		list, params := inList(chunk)
		if _, err := m.db.Exec(ctx, prefix+list, params...); err != nil {
			return err
		}
	}
	return nil
}

// markOutdated marks the tracked users among users outdated and bumps their generations.
func (m *Machine) markOutdated(ctx context.Context, users []id.UserID) error {
	return m.db.DoTxn(ctx, nil, func(ctx context.Context) error {
		tracked, err := m.queryUsers(ctx, selectTrackedPrefix, users)
		if err != nil {
			return err
		}
		if err := m.execUsers(ctx, markOutdatedListPrefix, tracked); err != nil {
			return err
		}
		for _, u := range tracked {
			if _, err := m.db.Exec(ctx, bumpGenQuery, u); err != nil {
				return err
			}
		}
		return nil
	})
}

// markAllOutdated marks every tracked user outdated and bumps their generations.
func (m *Machine) markAllOutdated(ctx context.Context) error {
	return m.db.DoTxn(ctx, nil, func(ctx context.Context) error {
		if _, err := m.db.Exec(ctx, markAllOutdatedQuery); err != nil {
			return err
		}
		_, err := m.db.Exec(ctx, bumpAllGenQuery)
		return err
	})
}

// untrack makes mautrix forget that it tracks users; their stored devices (and the trust
// given to them) stay, and are refreshed by the next query.
func (m *Machine) untrack(ctx context.Context, users []id.UserID) error {
	return m.db.DoTxn(ctx, nil, func(ctx context.Context) error {
		for _, u := range users {
			if _, err := m.db.Exec(ctx, untrackQuery, u); err != nil {
				return err
			}
			if _, err := m.db.Exec(ctx, deleteGenQuery, u); err != nil {
				return err
			}
		}
		return nil
	})
}

// refreshOutdated queries the devices of every outdated user once. again is true when a user
// was marked outdated again while the query was in flight.
func (m *Machine) refreshOutdated(ctx context.Context) (again bool, err error) {
	owed, gens, err := m.owed(ctx)
	if err != nil || len(owed) == 0 {
		return false, err
	}
	users := slices.Sorted(maps.Keys(owed))
	zerolog.Ctx(ctx).Debug().Int("count", len(users)).Msg("Querying the devices of outdated users")
	return m.queryInChunks(ctx, users, gens)
}

// owed returns the users whose devices must be queried (marked outdated in mautrix's table,
// or with a generation row left by a change not settled yet) and the generations.
func (m *Machine) owed(ctx context.Context) (map[id.UserID]struct{}, map[id.UserID]int64, error) {
	outdated, err := m.store.GetOutdatedTrackedUsers(ctx)
	if err != nil {
		return nil, nil, fmt.Errorf("list outdated users: %w", err)
	}
	gens, err := m.generations(ctx)
	if err != nil {
		return nil, nil, err
	}
	set := make(map[id.UserID]struct{}, len(outdated)+len(gens))
	for _, u := range outdated {
		set[u] = struct{}{}
	}
	for u := range gens {
		set[u] = struct{}{}
	}
	return set, gens, nil
}

// queryInChunks queries users in chunks (mautrix filters them with one IN list, which SQLite
// bounds) and settles them; again is true when some changed during their query.
func (m *Machine) queryInChunks(ctx context.Context, users []id.UserID, gens map[id.UserID]int64) (again bool, err error) {
	for chunk := range slices.Chunk(users, queryChunkSize) {
		changed, err := m.queryChunk(ctx, chunk, gens)
		if err != nil {
			return false, err
		}
		again = again || changed
	}
	return again, nil
}

// discardSessionsWith discards the outbound megolm sessions of the encrypted rooms shared with
// user, so that the next message in each goes out under a session shared with their current
// devices. A bot shares thousands of rooms with some users but holds outbound sessions in
// few: only those rooms get a statement, not one per shared room.
func (m *Machine) discardSessionsWith(ctx context.Context, user id.UserID) error {
	rows, err := m.store.DB.Query(ctx, "SELECT room_id FROM crypto_megolm_outbound_session WHERE account_id=$1", m.store.AccountID)
	held, err := dbutil.NewRowIterWithError(rows, dbutil.ScanSingleColumn[id.RoomID], err).AsList()
	if err != nil {
		return fmt.Errorf("list the outbound sessions: %w", err)
	} else if len(held) == 0 {
		return nil
	}
	rooms, err := m.olm.StateStore.FindSharedRooms(ctx, user)
	if err != nil {
		return fmt.Errorf("find rooms shared with %s: %w", user, err)
	}
	for _, roomID := range held {
		if !slices.Contains(rooms, roomID) {
			continue
		}
		if err := m.store.RemoveOutboundGroupSession(ctx, roomID); err != nil {
			return fmt.Errorf("discard the outbound session of %s: %w", roomID, err)
		}
	}
	return nil
}

// generations reads the durable generation of every user changed since their last settled
// query.
func (m *Machine) generations(ctx context.Context) (map[id.UserID]int64, error) {
	gens := make(map[id.UserID]int64)
	rows, err := m.db.Query(ctx, selectGensQuery)
	err = dbutil.NewRowIterWithError(rows, func(row dbutil.Scannable) (struct{}, error) {
		var u id.UserID
		var gen int64
		err := row.Scan(&u, &gen)
		gens[u] = gen
		return struct{}{}, err
	}, err).Iter(func(struct{}) (bool, error) { return true, nil })
	if err != nil {
		return nil, fmt.Errorf("read generations: %w", err)
	}
	return gens, nil
}

// queryChunkSize is how many users one key query asks for (a variable for tests).
var queryChunkSize = 1000

// queryChunk queries the devices of users, then settles their generations: a user whose
// generation did not move is done, one whose generation moved is marked outdated again.
func (m *Machine) queryChunk(ctx context.Context, users []id.UserID, gens map[id.UserID]int64) (again bool, err error) {
	if _, err := m.olm.FetchKeys(ctx, users, false); err != nil {
		return false, err
	}
	// mautrix discards the outbound sessions shared with a user only when this query finds
	// their devices changed. After a crash between storing the devices and discarding the
	// sessions, the repeated query finds nothing new and a new device would never receive
	// room keys: so the sessions of every user whose change is being settled are discarded
	// here, before the settle, and a crash repeats it.
	for _, u := range users {
		if _, ok := gens[u]; ok {
			if err := m.discardSessionsWith(ctx, u); err != nil {
				return false, err
			}
		}
	}
	var changed []id.UserID
	err = m.db.DoTxn(ctx, nil, func(ctx context.Context) error {
		for _, u := range users {
			if gen, ok := gens[u]; ok {
				if _, err := m.db.Exec(ctx, deleteGenIfQuery, u, gen); err != nil {
					return err
				}
			}
		}
		var err error
		changed, err = m.queryUsers(ctx, selectGenUsersPrefix, users)
		if err != nil {
			return err
		}
		return m.execUsers(ctx, markOutdatedListPrefix, changed)
	})
	if err != nil {
		return false, fmt.Errorf("settle generations: %w", err)
	}
	if len(changed) > 0 {
		zerolog.Ctx(ctx).Debug().Int("count", len(changed)).
			Msg("Device lists changed while they were queried; querying again")
	}
	return len(changed) > 0, nil
}
