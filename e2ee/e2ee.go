package e2ee

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"

	"github.com/rs/zerolog"
	"maunium.net/go/mautrix/id"

	"github.com/sliding-e2ee/sdk/slidingsync"
)

// Consumer receives what the e2ee extension learns; the crypto layer implements it. Both
// methods are called on the connection's Run goroutine, one response at a time.
type Consumer interface {
	// HandleE2EE is called for every response whose Delta is not empty, inside the store
	// transaction that commits the response's pos, with ctx carrying that transaction. It
	// must durably record what it still has to do (mark the Changed users and, on Gap, every
	// tracked user as outdated; untrack the Left users) and must not make network calls.
	// Writes made with ctx to another child database of the store's database commit or roll
	// back with pos; writes to another database must be durable before HandleE2EE returns.
	// An error aborts the commit, and the response is requested and delivered again.
	// Deliveries can repeat (after a failed commit, a crash, or a server that re-sends a
	// delta), so handling must be idempotent.
	HandleE2EE(ctx context.Context, d *Delta) error
	// E2EECommitted is called after every commit with the state just committed, also when
	// the response carried no e2ee data, so that the first commit after a start kicks work
	// left over from before a crash. It should start the network work (key queries for
	// outdated users, key uploads when counts are low or NeedsFallbackKey) on a goroutine the
	// consumer owns, retried with backoff, and return at once.
	E2EECommitted(ctx context.Context, st State)
}

// DeltaConsumer is a Consumer that learns which delta each commit carried. The extension
// calls E2EEDeltaCommitted instead of E2EECommitted when its consumer implements it, with the
// delta that HandleE2EE received inside the transaction just committed, or nil when HandleE2EE
// was not called. A delta whose commit failed is never passed, so a consumer that remembers
// what a HandleE2EE call wrote (to skip writing it again) can trust that memory only once the
// same delta comes back here.
type DeltaConsumer interface {
	Consumer
	E2EEDeltaCommitted(ctx context.Context, st State, d *Delta)
}

// SkippingConsumer is a DeltaConsumer that can tell that HandleE2EE would write nothing for a
// delta, because what it would record is already stored. The extension then leaves the
// commit's transaction alone (slidingsync.TxnSkipper), so that an idle response, which from
// Synapse always repeats the one-time key counts and fallback key types, commits nothing but
// pos. NeedsHandle must answer as HandleE2EE would decide at that moment.
type SkippingConsumer interface {
	DeltaConsumer
	NeedsHandle(d *Delta) bool
}

// Config configures the e2ee extension.
type Config struct {
	// Consumer receives every delta and commit. It is required.
	Consumer Consumer
}

// E2EE is the e2ee extension (MSC3884; MSC4543 on v4). Give it to one slidingsync.Conn in
// [slidingsync.Config.Extensions]. It implements slidingsync.Extension, WireKeyer,
// Checkpointer, Resetter, TxnCommitter and AfterCommitter. Its methods other than State are
// called by the connection; State is safe to call from any goroutine.
type E2EE struct {
	consumer Consumer
	claim    *claim

	mu        sync.Mutex
	committed State
	staged    State
	delta     *Delta // of the response being committed; nil when there is none
	handled   *Delta // the delta HandleE2EE received in the commit under way
	warnedNo  bool   // warned once that an initial response had no e2ee section
}

var (
	_ slidingsync.Extension      = (*E2EE)(nil)
	_ slidingsync.WireKeyer      = (*E2EE)(nil)
	_ slidingsync.Checkpointer   = (*E2EE)(nil)
	_ slidingsync.Resetter       = (*E2EE)(nil)
	_ slidingsync.TxnCommitter   = (*E2EE)(nil)
	_ slidingsync.TxnSkipper     = (*E2EE)(nil)
	_ slidingsync.AfterCommitter = (*E2EE)(nil)
)

// NewE2EE returns the e2ee extension for the device. It claims the device in this process:
// while it is not closed, another NewE2EE for the same user and device returns
// ErrDeviceAlreadyClaimed. Across processes, hold the store's lease (see the package
// documentation).
func NewE2EE(userID id.UserID, deviceID id.DeviceID, cfg Config) (*E2EE, error) {
	if cfg.Consumer == nil {
		return nil, errors.New("e2ee: Config.Consumer is required")
	}
	cl, err := newClaim(userID, deviceID, E2EEName)
	if err != nil {
		return nil, err
	}
	return &E2EE{consumer: cfg.Consumer, claim: cl}, nil
}

// Close releases the device's claim. Call it after the connection's Run has returned; it is
// idempotent.
func (e *E2EE) Close() error {
	e.claim.release()
	return nil
}

// State returns the committed state.
func (e *E2EE) State() State {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.committed.clone()
}

// Name implements slidingsync.Extension. The checkpoint is stored under it on every dialect.
func (e *E2EE) Name() string { return E2EEName }

// WireKey implements slidingsync.WireKeyer: E2EEKeyV4 on v4, E2EEName otherwise.
func (e *E2EE) WireKey(p slidingsync.Protocol) string {
	if p == slidingsync.ProtocolV4 {
		return E2EEKeyV4
	}
	return E2EEName
}

// Request implements slidingsync.Extension: {"enabled": true} on every request, as servers
// of the MSC4186 family drop the section from the response of a request that left it out.
func (e *E2EE) Request(context.Context, slidingsync.RequestInfo) (any, error) {
	return e2eeRequest{Enabled: true}, nil
}

// Process implements slidingsync.Extension: it decodes the section and merges it into a
// staged state; nothing is delivered before the commit.
func (e *E2EE) Process(ctx context.Context, info slidingsync.RequestInfo, raw json.RawMessage) error {
	resp, err := DecodeResponse(ctx, raw)
	if err != nil {
		return err
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if resp == nil && info.Pos == "" && !e.warnedNo && info.Protocol != slidingsync.ProtocolMSC3575 {
		// MSC4543: the response to a request without pos must carry the section.
		e.warnedNo = true
		zerolog.Ctx(ctx).Warn().Msg("Response to a request without pos has no e2ee section; the server may not support the extension")
	}
	st, d := Merge(e.committed, resp, Info{Initial: info.Pos == ""})
	e.staged = st
	e.delta, e.handled = nil, nil
	if !d.Empty() {
		e.delta = &d
	}
	if d.Gap {
		zerolog.Ctx(ctx).Debug().Bool("initial", info.Pos == "").Msg("Device-list gap: every tracked user is outdated")
	}
	return nil
}

// Checkpoint implements slidingsync.Checkpointer with the staged state.
func (e *E2EE) Checkpoint(context.Context) (json.RawMessage, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	return json.Marshal(e.staged)
}

// Restore implements slidingsync.Checkpointer: it drops anything staged and returns to the
// committed checkpoint (nil means a connection that never committed with e2ee).
func (e *E2EE) Restore(_ context.Context, checkpoint json.RawMessage) error {
	var st State
	if len(checkpoint) > 0 && string(checkpoint) != "null" {
		if err := json.Unmarshal(checkpoint, &st); err != nil {
			return fmt.Errorf("e2ee: decode checkpoint: %w", err)
		}
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	e.committed, e.staged, e.delta, e.handled = st, st.clone(), nil, nil
	return nil
}

// Reset implements slidingsync.Resetter. Nothing is dropped: the next request goes out
// without pos, which makes its response a gap.
func (e *E2EE) Reset(ctx context.Context) error {
	zerolog.Ctx(ctx).Debug().Msg("e2ee: connection reset, the next response is a device-list gap")
	return nil
}

// CommitTxn implements slidingsync.TxnCommitter: it hands the delta to the consumer inside
// the commit's transaction.
func (e *E2EE) CommitTxn(ctx context.Context) error {
	e.mu.Lock()
	d := e.delta
	e.mu.Unlock()
	if d == nil {
		return nil
	}
	if err := e.consumer.HandleE2EE(ctx, d); err != nil {
		return fmt.Errorf("e2ee consumer: %w", err)
	}
	e.mu.Lock()
	e.handled = d
	e.mu.Unlock()
	return nil
}

// SkipTxn implements slidingsync.TxnSkipper: true when the response carried no delta, or the
// consumer is a SkippingConsumer with nothing to write for it.
func (e *E2EE) SkipTxn() bool {
	e.mu.Lock()
	d := e.delta
	e.mu.Unlock()
	if d == nil {
		return true
	}
	sc, ok := e.consumer.(SkippingConsumer)
	return ok && !sc.NeedsHandle(d)
}

// AfterCommit implements slidingsync.AfterCommitter: the staged state becomes the committed
// one and the consumer is told (with the committed delta, if it is a DeltaConsumer).
func (e *E2EE) AfterCommit(ctx context.Context) {
	e.mu.Lock()
	d := e.handled // a delta left out of the commit was not handled: it is not reported
	e.committed, e.delta, e.handled = e.staged, nil, nil
	st := e.committed.clone()
	e.mu.Unlock()
	if dc, ok := e.consumer.(DeltaConsumer); ok {
		dc.E2EEDeltaCommitted(ctx, st, d)
		return
	}
	e.consumer.E2EECommitted(ctx, st)
}
