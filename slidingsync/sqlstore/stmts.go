package sqlstore

import (
	"context"
	"database/sql"
	"strings"
	"sync"
	"time"

	"go.mau.fi/util/dbutil"
)

// stmtCache keeps the statements that every commit runs (pos, extension checkpoints, the
// lease check) prepared. Neither dbutil nor the SQLite drivers cache statements, and on an
// idle long-poll parsing them again was the largest part of a commit's CPU. database/sql
// prepares a cached statement once per connection and reuses it inside transactions.
//
// Only SQLite uses it: PostgreSQL parses on the server, and prepared statements break behind
// proxies that pool connections per transaction.
type stmtCache struct {
	mu    sync.Mutex
	stmts map[string]*sql.Stmt
}

// exec runs query in the transaction ctx carries, or on its own, as db.Exec would, through a
// prepared statement on SQLite. On other databases it is db.Exec.
func (c *stmtCache) exec(ctx context.Context, db *dbutil.Database, query string, args ...any) (sql.Result, error) {
	if db.Dialect != dbutil.SQLite {
		return db.Exec(ctx, query, args...)
	}
	ex := db.Execable(ctx)
	txn, inTxn := ex.(*dbutil.LoggingTxn)
	if !inTxn && ex != &db.LoggingDB {
		return db.Exec(ctx, query, args...) // some other transaction type
	}
	stmt, err := c.prepare(ctx, db, query)
	if err != nil {
		return nil, err
	} else if stmt == nil {
		return db.Exec(ctx, query, args...)
	}
	start := time.Now()
	var res sql.Result
	if inTxn {
		txStmt := txn.UnderlyingTx.StmtContext(ctx, stmt)
		res, err = txStmt.ExecContext(ctx, args...)
		_ = txStmt.Close() // the connection keeps the statement; this only detaches it from the transaction
	} else {
		res, err = stmt.ExecContext(ctx, args...)
	}
	db.Log.QueryTiming(ctx, "Exec", query, args, -1, time.Since(start), err)
	return res, err
}

// prepare returns the prepared statement of query, or nil when the pool has a connection
// limit: preparing takes a connection of its own while the transaction holds one, which could
// wait forever with a limit of one.
func (c *stmtCache) prepare(ctx context.Context, db *dbutil.Database, query string) (*sql.Stmt, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if stmt, ok := c.stmts[query]; ok {
		return stmt, nil
	}
	if c.stmts == nil {
		c.stmts = make(map[string]*sql.Stmt)
	}
	if db.RawDB.Stats().MaxOpenConnections != 0 {
		c.stmts[query] = nil
		return nil, nil
	}
	stmt, err := db.RawDB.PrepareContext(ctx, sqlitePlaceholders(query))
	if err != nil {
		return nil, err
	}
	c.stmts[query] = stmt
	return stmt, nil
}

// sqlitePlaceholders rewrites $1 into ?1, as dbutil does for every SQLite query.
func sqlitePlaceholders(query string) string {
	var out strings.Builder
	out.Grow(len(query))
	for i := 0; i < len(query); i++ {
		if query[i] == '$' && i+1 < len(query) && query[i+1] >= '0' && query[i+1] <= '9' {
			out.WriteByte('?')
		} else {
			out.WriteByte(query[i])
		}
	}
	return out.String()
}
