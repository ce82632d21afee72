package main

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"fmt"
	"io"
	"maps"
	"net/http"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix"

	"github.com/sliding-e2ee/sdk/crypto/bot"
	"github.com/sliding-e2ee/sdk/slidingsync"
	"github.com/sliding-e2ee/sdk/slidingsync/sqlstore/dbopen"
)

// countingDriverName is modernc's SQLite driver wrapped to count what reaches SQLite.
const countingDriverName = "sqlite-counting"

var registerCounting sync.Once

// stmtCounter counts the statements and transactions of every connection of the counting
// driver, and the statements by text while recording.
type stmtCounter struct {
	stmts, begins, commits, rollbacks atomic.Int64

	mu     sync.Mutex
	record bool
	texts  map[string]int
}

var counter = &stmtCounter{}

func (c *stmtCounter) note(query string) {
	c.stmts.Add(1)
	c.mu.Lock()
	if c.record {
		c.texts[strings.Join(strings.Fields(query), " ")]++
	}
	c.mu.Unlock()
}

// recording starts recording statement texts and returns a function that stops and returns
// them.
func (c *stmtCounter) recording() func() map[string]int {
	c.mu.Lock()
	c.record, c.texts = true, map[string]int{}
	c.mu.Unlock()
	return func() map[string]int {
		c.mu.Lock()
		defer c.mu.Unlock()
		c.record = false
		return c.texts
	}
}

type countingDriver struct{ driver.Driver }

func (d countingDriver) Open(name string) (driver.Conn, error) {
	conn, err := d.Driver.Open(name)
	if err != nil {
		return nil, err
	}
	return &countingConn{conn}, nil
}

// countingConn passes every interface of modernc's conn through, so that database/sql takes
// the same paths as without the wrapper.
type countingConn struct{ driver.Conn }

func (c *countingConn) ExecContext(ctx context.Context, query string, args []driver.NamedValue) (driver.Result, error) {
	counter.note(query)
	return c.Conn.(driver.ExecerContext).ExecContext(ctx, query, args)
}

func (c *countingConn) QueryContext(ctx context.Context, query string, args []driver.NamedValue) (driver.Rows, error) {
	counter.note(query)
	return c.Conn.(driver.QueryerContext).QueryContext(ctx, query, args)
}

func (c *countingConn) PrepareContext(ctx context.Context, query string) (driver.Stmt, error) {
	st, err := c.Conn.(driver.ConnPrepareContext).PrepareContext(ctx, query)
	if err != nil {
		return nil, err
	}
	return &countingStmt{Stmt: st, query: query}, nil
}

func (c *countingConn) BeginTx(ctx context.Context, opts driver.TxOptions) (driver.Tx, error) {
	counter.begins.Add(1)
	tx, err := c.Conn.(driver.ConnBeginTx).BeginTx(ctx, opts)
	if err != nil {
		return nil, err
	}
	return countingTx{tx}, nil
}

func (c *countingConn) ResetSession(ctx context.Context) error {
	return c.Conn.(driver.SessionResetter).ResetSession(ctx)
}

func (c *countingConn) IsValid() bool { return c.Conn.(driver.Validator).IsValid() }

func (c *countingConn) Ping(ctx context.Context) error { return c.Conn.(driver.Pinger).Ping(ctx) }

type countingTx struct{ driver.Tx }

func (t countingTx) Commit() error {
	counter.commits.Add(1)
	return t.Tx.Commit()
}

func (t countingTx) Rollback() error {
	counter.rollbacks.Add(1)
	return t.Tx.Rollback()
}

type countingStmt struct {
	driver.Stmt
	query string
}

func (s *countingStmt) ExecContext(ctx context.Context, args []driver.NamedValue) (driver.Result, error) {
	counter.note(s.query)
	return s.Stmt.(driver.StmtExecContext).ExecContext(ctx, args)
}

func (s *countingStmt) QueryContext(ctx context.Context, args []driver.NamedValue) (driver.Rows, error) {
	counter.note(s.query)
	return s.Stmt.(driver.StmtQueryContext).QueryContext(ctx, args)
}

// openCounting opens a SQLite file as dbopen does, through the counting driver.
func openCounting(target string) (*dbutil.Database, error) {
	registerCounting.Do(func() {
		db, err := sql.Open(dbopen.DriverModernc, "")
		if err != nil {
			panic(err)
		}
		sql.Register(countingDriverName, countingDriver{db.Driver()})
		_ = db.Close()
	})
	return dbutil.NewFromConfig("", dbutil.Config{PoolConfig: dbutil.PoolConfig{
		Type:         countingDriverName,
		URI:          dbopen.SQLiteDSN(dbopen.DriverModernc, target),
		MaxIdleConns: 4, // dbopen's default
	}}, nil)
}

// idleServer answers the bot in-process: key uploads, an initial sliding sync response with
// every room, and then, one at a time as the test allows, responses as Synapse sends them
// when nothing changed.
type idleServer struct {
	allow   chan struct{} // one token per idle response
	arrived chan struct{} // a request with pos arrived: the previous response is committed
	pos     atomic.Int64
	held    atomic.Int64 // nanoseconds spent holding long-polls until their timeout
}

// idleRooms are the account's rooms: as many as the bot's window holds once the scan is over
// (slidingsync.Scan's head), so that every idle response lists the window's room IDs, as Synapse's do.
var idleRooms = func() []string {
	rooms := make([]string, 5)
	for i := range rooms {
		rooms[i] = fmt.Sprintf("!idle%03d:example.org", i)
	}
	return rooms
}()

func newIdleServer() *idleServer {
	return &idleServer{allow: make(chan struct{}), arrived: make(chan struct{}, 1)}
}

func (s *idleServer) RoundTrip(req *http.Request) (*http.Response, error) {
	if req.Body != nil {
		_, _ = io.Copy(io.Discard, req.Body)
		_ = req.Body.Close()
	}
	switch {
	case strings.HasSuffix(req.URL.Path, "/keys/upload"):
		return jsonResponse(req, http.StatusOK, `{"one_time_key_counts":{"signed_curve25519":50}}`), nil
	case req.URL.Path == slidingsync.ProtocolMSC4186.Path():
		return s.sync(req)
	}
	return jsonResponse(req, http.StatusNotFound, `{"errcode":"M_UNRECOGNIZED","error":"not in the idle benchmark"}`), nil
}

const idleE2EE = `"e2ee":{"device_one_time_keys_count":{"signed_curve25519":50},"device_unused_fallback_key_types":["signed_curve25519"]%s},` +
	`"to_device":{"next_batch":"7","events":[]}`

func (s *idleServer) sync(req *http.Request) (*http.Response, error) {
	list := fmt.Sprintf(`"lists":{"all":{"count":%d,"ops":[{"op":"SYNC","range":[0,%d],"room_ids":["%s"]}]}}`,
		len(idleRooms), len(idleRooms)-1, strings.Join(idleRooms, `","`))
	if req.URL.Query().Get("pos") == "" {
		var rooms []string
		for i, roomID := range idleRooms {
			rooms = append(rooms, fmt.Sprintf(`"%s":{"initial":true,"name":"Room %d","bump_stamp":%d,"required_state":[],"timeline":[],"limited":false,"num_live":0,"notification_count":0,"highlight_count":0}`, roomID, i, i+1))
		}
		body := fmt.Sprintf(`{"pos":"%d",%s,"rooms":{%s},"extensions":{`+idleE2EE+`}}`,
			s.pos.Add(1), list, strings.Join(rooms, ","), "")
		return jsonResponse(req, http.StatusOK, body), nil
	}
	arrived := time.Now()
	s.arrived <- struct{}{}
	select {
	case <-s.allow:
	case <-req.Context().Done():
		return nil, req.Context().Err()
	}
	// As Synapse, an idle long-poll is answered once its timeout ran out, and the pos the
	// request carried comes back.
	if ms, err := strconv.Atoi(req.URL.Query().Get("timeout")); err == nil {
		start := time.Now()
		time.Sleep(time.Until(arrived.Add(time.Duration(ms) * time.Millisecond)))
		s.held.Add(int64(time.Since(start)))
	}
	body := fmt.Sprintf(`{"pos":"%d",%s,"rooms":{},"extensions":{`+idleE2EE+`}}`,
		s.pos.Load(), list, `,"device_lists":{"changed":[],"left":[]}`)
	return jsonResponse(req, http.StatusOK, body), nil
}

func jsonResponse(req *http.Request, status int, body string) *http.Response {
	return &http.Response{
		StatusCode:    status,
		Status:        http.StatusText(status),
		Header:        http.Header{"Content-Type": {"application/json"}},
		Body:          io.NopCloser(strings.NewReader(body)),
		ContentLength: int64(len(body)),
		Request:       req,
		Proto:         "HTTP/1.1", ProtoMajor: 1, ProtoMinor: 1,
	}
}

// idleBot is a running bot on an idleServer, warmed up: keys uploaded and a few idle cycles
// done, waiting for the next idle response.
type idleBot struct {
	srv *idleServer
}

func startIdleBot(tb testing.TB) *idleBot {
	tb.Helper()
	log := zerolog.New(io.Discard).Level(zerolog.InfoLevel)
	srv := newIdleServer()
	db, err := openCounting(filepath.Join(tb.TempDir(), "bot.db"))
	require.NoError(tb, err)
	tb.Cleanup(func() { _ = db.Close() })
	h, _ := startBot(tb, log.WithContext(context.Background()), options{
		homeserver: "https://hs.example.org", user: "@bot:example.org", accessToken: "token", deviceID: "IDLEBOT",
		protocol: "msc4186", pollTimeout: idlePoll,
	}, func(cli *mautrix.Client, cfg *bot.Config) {
		cli.Client = &http.Client{Transport: srv}
		cfg.DB = db
	}, nil)
	b := &idleBot{srv: srv}
	timeout := time.After(30 * time.Second)
	select {
	case <-h.Ready():
	case <-timeout:
		tb.Fatal("the bot did not upload its keys")
	}
	select {
	case <-srv.arrived:
	case <-timeout:
		tb.Fatal("the bot did not send a request with pos")
	}
	// Start-up work (fallback key upload, the first task query) settles.
	for range 20 {
		b.cycle()
	}
	time.Sleep(50 * time.Millisecond)
	return b
}

// cycle serves one idle response and returns once the bot committed it and asked again.
func (b *idleBot) cycle() {
	b.srv.allow <- struct{}{}
	<-b.srv.arrived
}

// settle gives the goroutines woken by the last commit (the Machine's Run, the replier) time
// to finish.
func (b *idleBot) settle() { time.Sleep(20 * time.Millisecond) }

func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// idlePoll is the bot's long-poll timeout in the idle benchmark; the server holds each idle
// request until it has run out, as Synapse does.
const idlePoll = 2 * time.Millisecond

// idleHold is how long the benchmark waits after each cycle, as a server holds the next
// long-poll: the goroutines the commit woke (the Machine's Run, the replier) finish their
// work meanwhile instead of merging the work of several cycles.
const idleHold = time.Millisecond

// BenchmarkIdleCycle runs the example bot's whole pipeline (Conn, e2ee and to_device
// extensions, crypto.Machine, task queue, lease, sqlstore in one SQLite file) on idle
// responses as Synapse sends them, with an in-process transport. ns/op is the sync loop's
// time per cycle (request, decode, process, commit), without the hold; cpu-ns/op is the
// process's CPU per cycle, and stmts/op and txns/op what reached SQLite, the work of the
// goroutines woken by the commit included.
//
//	TMPDIR=/dev/shm go test -tags goolm -run '^$' -bench IdleCycle -benchmem -count 5 ./example/e2eebot/
func BenchmarkIdleCycle(b *testing.B) {
	bot := startIdleBot(b)
	stmts, begins := counter.stmts.Load(), counter.begins.Load()
	cpu := cpuTime()
	held := -time.Duration(bot.srv.held.Load())
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		bot.cycle()
		start := time.Now()
		time.Sleep(idleHold)
		held += time.Since(start)
	}
	held += time.Duration(bot.srv.held.Load())
	n := float64(b.N)
	b.ReportMetric(float64(b.Elapsed()-held)/n, "ns/op")
	b.ReportMetric(float64(cpuTime()-cpu)/n, "cpu-ns/op")
	b.ReportMetric(float64(counter.stmts.Load()-stmts)/n, "stmts/op")
	b.ReportMetric(float64(counter.begins.Load()-begins)/n, "txns/op")
}

// TestIdleCycleStatements checks what an idle cycle on Synapse sends to SQLite: nothing. The
// response repeats the pos, no extension has anything to write (the fallback key state and
// counts it repeats are known to be stored), so there is nothing to commit, and neither the
// Machine's Run nor the replier reads anything.
func TestIdleCycleStatements(t *testing.T) {
	bot := startIdleBot(t)
	const cycles = 10
	stop := counter.recording()
	begins := counter.begins.Load()
	for range cycles {
		bot.cycle()
		bot.settle()
	}
	texts := stop()
	assert.Equal(t, int64(0), counter.begins.Load()-begins, "no transaction")
	var got []string
	for _, q := range slices.Sorted(maps.Keys(texts)) {
		got = append(got, fmt.Sprintf("%d in %d cycles: %s", texts[q], cycles, q))
	}
	assert.Empty(t, got, "statements in idle cycles")
}
