package bot

import (
	"bytes"
	"context"
	"crypto/sha256"
	"database/sql"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/rs/zerolog"
	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/id"

	"github.com/sliding-e2ee/sdk/slidingsync"
)

// Bounds of the outbox.
const (
	// sendAttempts bounds the attempts of one send whose outcome stays unknown (network
	// errors, 5xx) before its error reaches the handler.
	sendAttempts = 8
	// lookupPages bounds how many pages of 100 events /messages is read for an earlier
	// attempt of a send.
	lookupPages = 10
	// lookupSlack is how much older than its first attempt an event may look (clock skew
	// between the bot and the server) and still be that attempt.
	lookupSlack = 5 * time.Minute
)

// dispatchKey is the context key of a dispatch.
type dispatchKey struct{}

// dispatch numbers the sends made under one idempotency key.
type dispatch struct {
	key string
	mu  sync.Mutex
	n   int
	idx map[string]int // mautrix's transaction ID of a send → its number (a retried request keeps it)
}

func newDispatch(key string) *dispatch { return &dispatch{key: key, idx: map[string]int{}} }

func withDispatch(ctx context.Context, d *dispatch) context.Context {
	return context.WithValue(ctx, dispatchKey{}, d)
}

// txnID returns the transaction ID of the send that mautrix gave the transaction ID orig.
func (d *dispatch) txnID(orig string) string {
	d.mu.Lock()
	defer d.mu.Unlock()
	n, ok := d.idx[orig]
	if !ok {
		n = d.n
		d.n++
		d.idx[orig] = n
	}
	return d.key + "." + strconv.Itoa(n)
}

// eventKey derives the idempotency key of the dispatch of an inbox item.
func eventKey(key string) string {
	sum := sha256.Sum256([]byte("event\x00" + key))
	return "ssb" + hex.EncodeToString(sum[:12])
}

// IdempotencyKey returns the key of the event being dispatched (or given to
// WithIdempotencyKey): the same every time the event is dispatched again after a crash, and
// different for every other event. Use it to make a handler's own side effects idempotent.
// It is empty outside a handler.
func IdempotencyKey(ctx context.Context) string {
	if d, ok := ctx.Value(dispatchKey{}).(*dispatch); ok {
		return d.key
	}
	return ""
}

// WithIdempotencyKey returns a context under which the client's room sends are exactly once
// as a handler's are (see the package documentation), keyed by key: code outside handlers
// that repeats its sends after a crash with the same key gets the event IDs of the sends
// that happened instead of sending again, for 7 days after a send's first attempt.
func WithIdempotencyKey(ctx context.Context, key string) context.Context {
	sum := sha256.Sum256([]byte("user\x00" + key))
	return withDispatch(ctx, newDispatch("ssu"+hex.EncodeToString(sum[:12])))
}

// sendTransport is the client's transport: it refuses plain HTTP to remote hosts, and makes
// the room sends made under a dispatch exactly once.
type sendTransport struct {
	h    *Helper
	next http.RoundTripper
}

func (t *sendTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	next := t.next
	if next == nil {
		next = http.DefaultTransport
	}
	if !t.h.cfg.AllowInsecureHTTP {
		next = slidingsync.RefuseInsecureHTTP(next)
	}
	d, ok := req.Context().Value(dispatchKey{}).(*dispatch)
	if !ok || req.Method != http.MethodPut {
		return next.RoundTrip(req)
	}
	roomID, orig, ok := parseSendPath(req.URL.EscapedPath())
	if !ok {
		return next.RoundTrip(req)
	}
	return t.h.send(req, next, d, roomID, orig)
}

// parseSendPath recognises PUT .../rooms/{roomID}/send/{type}/{txnID} and
// .../rooms/{roomID}/redact/{eventID}/{txnID}.
func parseSendPath(escaped string) (roomID id.RoomID, txnID string, ok bool) {
	segs := strings.Split(escaped, "/")
	for i, s := range segs {
		if s != "rooms" || len(segs) != i+5 || (segs[i+2] != "send" && segs[i+2] != "redact") {
			continue
		}
		room, err1 := url.PathUnescape(segs[i+1])
		txn, err2 := url.PathUnescape(segs[i+4])
		if err1 != nil || err2 != nil {
			return "", "", false
		}
		return id.RoomID(room), txn, true
	}
	return "", "", false
}

// sendLock returns the lock that keeps two attempts at the send txn apart (two goroutines
// under the same idempotency key).
func (h *Helper) sendLock(txn string) *sync.Mutex {
	sum := sha256.Sum256([]byte(txn))
	return &h.sendLocks[sum[0]%byte(len(h.sendLocks))]
}

// outboxRow is the outbox's record of one send.
type outboxRow struct {
	firstTry time.Time
	eventID  id.EventID
}

func (h *Helper) outboxDB() (*dbutil.Database, string, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.db == nil {
		return nil, "", ErrNotRunning
	}
	return h.db, h.account, nil
}

// outboxEntry reads the outbox row of a send, or records a first attempt. attempted says
// whether an earlier attempt was recorded; row.eventID is set when it is known to be done.
func outboxEntry(ctx context.Context, db *dbutil.Database, account, txn string, roomID id.RoomID) (row outboxRow, attempted bool, err error) {
	var firstTry int64
	var eventID sql.NullString
	err = db.QueryRow(ctx, `SELECT first_try, event_id FROM ssbot_outbox WHERE account=$1 AND txn_id=$2`, account, txn).Scan(&firstTry, &eventID)
	switch {
	case err == nil:
		return outboxRow{firstTry: time.UnixMilli(firstTry), eventID: id.EventID(eventID.String)}, true, nil
	case !errors.Is(err, sql.ErrNoRows):
		return row, false, fmt.Errorf("bot: read the outbox: %w", err)
	}
	row.firstTry = time.Now()
	_, err = db.Exec(ctx, `INSERT INTO ssbot_outbox (account, txn_id, room_id, first_try) VALUES ($1, $2, $3, $4)`,
		account, txn, roomID, row.firstTry.UnixMilli())
	if err != nil {
		return row, false, fmt.Errorf("bot: record the send in the outbox: %w", err)
	}
	return row, false, nil
}

// send makes one room send exactly once. Its transaction ID is the dispatch's key and the
// send's number; the outbox records it before the first attempt. A send the outbox knows
// happened is answered from the outbox; one that was attempted before with an unknown
// outcome (a crash, a lost answer) is first looked for among the room's events, by its
// transaction ID; only when it is not found is it sent (again).
func (h *Helper) send(req *http.Request, next http.RoundTripper, d *dispatch, roomID id.RoomID, orig string) (*http.Response, error) {
	ctx := req.Context()
	db, account, err := h.outboxDB()
	if err != nil {
		return nil, err
	}
	txn := d.txnID(orig)
	mu := h.sendLock(txn)
	mu.Lock()
	defer mu.Unlock()
	log := zerolog.Ctx(ctx).With().Str("txn_id", txn).Logger()

	body, err := readBody(req)
	if err != nil {
		return nil, err
	}
	row, attempted, err := outboxEntry(ctx, db, account, txn, roomID)
	if err != nil {
		return nil, err
	}
	if row.eventID != "" {
		log.Debug().Msg("Send already done")
		return sentResponse(req, row.eventID), nil
	}
	u := *req.URL
	escaped := u.EscapedPath()
	u.RawPath = escaped[:strings.LastIndexByte(escaped, '/')+1] + url.PathEscape(txn)
	if u.Path, err = url.PathUnescape(u.RawPath); err != nil {
		return nil, err
	}
	var resp *http.Response
	for attempt := 1; ; attempt++ {
		if attempted {
			// An earlier attempt may have reached the server: servers that do not remember
			// transaction IDs (Dendrite after a lost answer) would store a second event.
			evtID, err := h.findSent(ctx, roomID, txn, row.firstTry)
			if err != nil {
				return nil, fmt.Errorf("bot: look for an earlier attempt of a send: %w", err)
			}
			if evtID != "" {
				log.Info().Stringer("event_id", evtID).Msg("An earlier attempt of the send reached the server; not sending again")
				if err := h.markSent(ctx, db, account, txn, evtID); err != nil {
					log.Warn().Err(err).Msg("Failed to record a send in the outbox")
				}
				return sentResponse(req, evtID), nil
			}
		}
		r := req.Clone(ctx)
		r.URL = &u
		r.Body = io.NopCloser(bytes.NewReader(body))
		r.ContentLength = int64(len(body))
		r.GetBody = func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(body)), nil }
		resp, err = next.RoundTrip(r)
		attempted = true
		switch {
		case err == nil && resp.StatusCode == http.StatusOK:
			return h.noteAnswer(ctx, db, account, txn, resp)
		case err == nil && resp.StatusCode < http.StatusInternalServerError:
			// Refused: the server did not store it. Forget the attempt, so a repeat sends
			// at once.
			if _, derr := db.Exec(ctx, `DELETE FROM ssbot_outbox WHERE account=$1 AND txn_id=$2`, account, txn); derr != nil {
				log.Warn().Err(derr).Msg("Failed to forget a refused send")
			}
			return resp, nil
		}
		if ctx.Err() != nil || attempt == sendAttempts {
			return resp, err
		}
		if resp != nil {
			_ = resp.Body.Close()
		}
		wait := min(time.Second<<(attempt-1), 30*time.Second)
		log.Warn().Err(err).Dur("retry_in", wait).Msg("A send's outcome is unknown; looking for it and retrying")
		select {
		case <-ctx.Done():
			return nil, context.Cause(ctx)
		case <-time.After(wait):
		}
	}
}

func readBody(req *http.Request) ([]byte, error) {
	if req.Body == nil {
		return nil, nil
	}
	defer req.Body.Close()
	return io.ReadAll(req.Body)
}

// noteAnswer records the event ID of a successful send and hands the answer back.
func (h *Helper) noteAnswer(ctx context.Context, db *dbutil.Database, account, txn string, resp *http.Response) (*http.Response, error) {
	body, err := io.ReadAll(resp.Body)
	_ = resp.Body.Close()
	if err != nil {
		return nil, err
	}
	resp.Body = io.NopCloser(bytes.NewReader(body))
	var sent mautrix.RespSendEvent
	if json.Unmarshal(body, &sent) == nil && sent.EventID != "" {
		if err := h.markSent(ctx, db, account, txn, sent.EventID); err != nil {
			// The row stays pending: a repeat looks the event up instead of sending again.
			zerolog.Ctx(ctx).Warn().Err(err).Msg("Failed to record a send in the outbox")
		}
	}
	return resp, nil
}

func (h *Helper) markSent(ctx context.Context, db *dbutil.Database, account, txn string, eventID id.EventID) error {
	_, err := db.Exec(context.WithoutCancel(ctx), `UPDATE ssbot_outbox SET event_id=$3 WHERE account=$1 AND txn_id=$2`, account, txn, eventID)
	return err
}

// findSent looks for the bot's own event with transaction ID txn among the room's latest
// events (its sender sees the ID in unsigned.transaction_id), back to shortly before the
// send's first attempt.
func (h *Helper) findSent(ctx context.Context, roomID id.RoomID, txn string, firstTry time.Time) (id.EventID, error) {
	oldest := firstTry.Add(-lookupSlack).UnixMilli()
	from := ""
	for range lookupPages {
		resp, err := h.cli.Messages(ctx, roomID, from, "", mautrix.DirectionBackward, nil, 100)
		if err != nil {
			return "", err
		}
		for _, evt := range resp.Chunk {
			if evt == nil {
				continue
			}
			if evt.Sender == h.cli.UserID && evt.Unsigned.TransactionID == txn {
				return evt.ID, nil
			}
			if evt.Timestamp < oldest {
				return "", nil
			}
		}
		if resp.End == "" || len(resp.Chunk) == 0 {
			return "", nil
		}
		from = resp.End
	}
	return "", nil
}

// sentResponse is the answer to a send that already happened.
func sentResponse(req *http.Request, eventID id.EventID) *http.Response {
	body, _ := json.Marshal(mautrix.RespSendEvent{EventID: eventID})
	return &http.Response{
		StatusCode:    http.StatusOK,
		Status:        "200 OK",
		Proto:         "HTTP/1.1",
		ProtoMajor:    1,
		ProtoMinor:    1,
		Header:        http.Header{"Content-Type": {"application/json"}},
		Body:          io.NopCloser(bytes.NewReader(body)),
		ContentLength: int64(len(body)),
		Request:       req,
	}
}
