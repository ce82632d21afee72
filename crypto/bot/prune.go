package bot

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/rs/zerolog"
	"go.mau.fi/util/dbutil"
)

const (
	// keepPerRoom is how many handled events of each room the inbox keeps, by key only. A
	// server sends a room's newest events again (5, the bot's timeline limit) when a
	// connection starts afresh or the room comes back into the window, and a limited
	// timeline is filled back to the newest event the inbox knows, so older handled events
	// are never delivered again.
	keepPerRoom = 50
	// outboxRetention is how long a send's outbox row is kept once no pending event can run
	// its handler again. WithIdempotencyKey's guarantee lasts as long.
	outboxRetention = 7 * 24 * time.Hour
	// pruneEvery is how often the dispatcher prunes, at most.
	pruneEvery = time.Hour
)

// prune deletes, in one transaction, the handled events of each room beyond its newest
// keepPerRoom (handled invites are kept: they are forgotten when the room stops being an
// invite) and the outbox rows older than outboxRetention that no pending event needs.
func (in *inbox) prune(ctx context.Context, now time.Time) (events, sends int64, err error) {
	err = in.db.DoTxn(ctx, nil, func(ctx context.Context) error {
		res, err := in.db.Exec(ctx, `DELETE FROM ssbot_inbox WHERE account=$1 AND event_key IN (
			SELECT event_key FROM (
				SELECT event_key, ROW_NUMBER() OVER (PARTITION BY room_id ORDER BY seq DESC) AS newer
				FROM ssbot_inbox WHERE account=$1 AND done AND event_key NOT LIKE 'invite|%'
			) AS handled WHERE newer > $2)`, in.account, keepPerRoom)
		if err != nil {
			return fmt.Errorf("delete handled events: %w", err)
		}
		if events, err = res.RowsAffected(); err != nil {
			return err
		}
		rows, err := in.db.Query(ctx, `SELECT event_key FROM ssbot_inbox WHERE account=$1 AND NOT done`, in.account)
		pending, err := dbutil.NewRowIterWithError(rows, dbutil.ScanSingleColumn[string], err).AsList()
		if err != nil {
			return fmt.Errorf("read pending events: %w", err)
		}
		rows, err = in.db.Query(ctx, `SELECT txn_id FROM ssbot_outbox WHERE account=$1 AND first_try<$2`,
			in.account, now.Add(-outboxRetention).UnixMilli())
		old, err := dbutil.NewRowIterWithError(rows, dbutil.ScanSingleColumn[string], err).AsList()
		if err != nil {
			return fmt.Errorf("read old sends: %w", err)
		}
		needed := make(map[string]bool, len(pending))
		for _, key := range pending {
			needed[eventKey(key)] = true
		}
		for _, txn := range old {
			if key, _, ok := strings.Cut(txn, "."); ok && needed[key] {
				continue
			}
			if _, err := in.db.Exec(ctx, `DELETE FROM ssbot_outbox WHERE account=$1 AND txn_id=$2`, in.account, txn); err != nil {
				return fmt.Errorf("delete send %s: %w", txn, err)
			}
			sends++
		}
		return nil
	})
	if err != nil {
		return 0, 0, fmt.Errorf("bot: prune the inbox and outbox: %w", err)
	}
	return events, sends, nil
}

// pruneIfDue prunes when pruneEvery has passed since last, and returns when it last pruned.
// A failure is logged and tried again after pruneEvery: pruning only bounds the tables' size.
func (in *inbox) pruneIfDue(ctx context.Context, last time.Time) time.Time {
	now := time.Now()
	if !last.IsZero() && now.Sub(last) < pruneEvery {
		return last
	}
	log := zerolog.Ctx(ctx)
	events, sends, err := in.prune(ctx, now)
	if err != nil {
		if ctx.Err() == nil {
			log.Warn().Err(err).Msg("Pruning the inbox failed; trying again later")
		}
		return now
	}
	if events > 0 || sends > 0 {
		log.Debug().Int64("events", events).Int64("sends", sends).Msg("Pruned handled events and old sends")
	}
	return now
}
