package e2ee

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"

	"github.com/rs/zerolog"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/sliding-e2ee/sdk/slidingsync"
)

// Wire keys and limits of the to_device extension.
const (
	// ToDeviceName is the extension's name and its wire key on the MSC3575 and MSC4186
	// dialects.
	ToDeviceName = "to_device"
	// ToDeviceKeyV4 is the default wire key on the stable v4 dialect: MSC4538, which
	// specifies to_device for simplified sliding sync, keeps this unstable prefix until it is
	// stable.
	ToDeviceKeyV4 = "org.matrix.msc4538.to_device"
	// DefaultToDeviceLimit is ToDeviceConfig.Limit when it is zero. It is also the maximum:
	// Synapse caps the limit at 100.
	DefaultToDeviceLimit = 100
)

// ToDeviceHandler handles one batch of to-device events, in the order the server sent them.
// It must store what it must keep (room keys, Olm sessions) durably before it returns: the
// batch is acknowledged to the server by the commit that follows. It may be called again with
// the same events (after a failed commit, a crash or a server that re-sends), so handling must
// be idempotent; mautrix's Olm message hashes make decryption so. An error aborts the cycle:
// nothing is committed and the batch is requested again after a backoff.
type ToDeviceHandler func(ctx context.Context, evts []*event.Event) error

// ToDeviceConfig configures the to_device extension.
type ToDeviceConfig struct {
	// Handler receives every batch. It is required.
	Handler ToDeviceHandler
	// Limit is how many events one response may carry. Zero means DefaultToDeviceLimit;
	// values are clamped to [1, 100], as limit 0 makes Synapse acknowledge everything.
	Limit int
	// V4WireKey overrides the wire key on the v4 dialect. Empty means ToDeviceKeyV4.
	V4WireKey string
}

// ToDevice is the to_device extension (MSC3885; MSC4538). Give it to the same connection as
// the E2EE extension. It implements slidingsync.Extension, WireKeyer, Checkpointer, Resetter,
// MorePender and AfterCommitter. Its methods other than Since are called by the connection;
// Since is safe to call from any goroutine.
type ToDevice struct {
	handler ToDeviceHandler
	limit   int
	v4Key   string
	claim   *claim

	mu        sync.Mutex
	committed string // since of the last commit
	staged    string
	more      bool
	stalled   bool // warned about a token that does not advance
}

var (
	_ slidingsync.Extension      = (*ToDevice)(nil)
	_ slidingsync.WireKeyer      = (*ToDevice)(nil)
	_ slidingsync.Checkpointer   = (*ToDevice)(nil)
	_ slidingsync.Resetter       = (*ToDevice)(nil)
	_ slidingsync.MorePender     = (*ToDevice)(nil)
	_ slidingsync.AfterCommitter = (*ToDevice)(nil)
)

// NewToDevice returns the to_device extension for the device. It claims the device in this
// process as NewE2EE does: while it is not closed, another NewToDevice for the same user and
// device returns ErrDeviceAlreadyClaimed.
func NewToDevice(userID id.UserID, deviceID id.DeviceID, cfg ToDeviceConfig) (*ToDevice, error) {
	if cfg.Handler == nil {
		return nil, errors.New("e2ee: ToDeviceConfig.Handler is required")
	}
	limit := cfg.Limit
	if limit == 0 {
		limit = DefaultToDeviceLimit
	}
	limit = min(max(limit, 1), DefaultToDeviceLimit)
	v4Key := cfg.V4WireKey
	if v4Key == "" {
		v4Key = ToDeviceKeyV4
	}
	cl, err := newClaim(userID, deviceID, ToDeviceName)
	if err != nil {
		return nil, err
	}
	return &ToDevice{handler: cfg.Handler, limit: limit, v4Key: v4Key, claim: cl}, nil
}

// Close releases the device's claim. Call it after the connection's Run has returned; it is
// idempotent.
func (td *ToDevice) Close() error {
	td.claim.release()
	return nil
}

// Since returns the committed token: the next_batch of the last handled and committed batch.
func (td *ToDevice) Since() string {
	td.mu.Lock()
	defer td.mu.Unlock()
	return td.committed
}

// Limit returns the limit sent with every request.
func (td *ToDevice) Limit() int { return td.limit }

// Name implements slidingsync.Extension. The checkpoint is stored under it on every dialect.
func (td *ToDevice) Name() string { return ToDeviceName }

// WireKey implements slidingsync.WireKeyer.
func (td *ToDevice) WireKey(p slidingsync.Protocol) string {
	if p == slidingsync.ProtocolV4 {
		return td.v4Key
	}
	return ToDeviceName
}

type toDeviceRequest struct {
	Enabled bool   `json:"enabled"`
	Limit   int    `json:"limit"`
	Since   string `json:"since,omitempty"`
}

type toDeviceResponse struct {
	NextBatch slidingsync.Opt[string] `json:"next_batch,omitzero"`
	Events    []json.RawMessage       `json:"events"`
}

type toDeviceCheckpoint struct {
	Since string `json:"since,omitempty"`
}

// Request implements slidingsync.Extension: the full configuration with the committed token,
// which acknowledges only batches that were handled and committed.
func (td *ToDevice) Request(context.Context, slidingsync.RequestInfo) (any, error) {
	td.mu.Lock()
	defer td.mu.Unlock()
	return toDeviceRequest{Enabled: true, Limit: td.limit, Since: td.committed}, nil
}

// Process implements slidingsync.Extension: it hands the events to the handler and stages
// next_batch, which Checkpoint then commits with pos.
func (td *ToDevice) Process(ctx context.Context, _ slidingsync.RequestInfo, raw json.RawMessage) error {
	td.mu.Lock()
	since := td.committed
	td.staged, td.more = since, false
	td.mu.Unlock()
	if raw == nil {
		// tuwunel leaves the section out when it has no events.
		return nil
	}
	var resp toDeviceResponse
	if err := json.Unmarshal(raw, &resp); err != nil {
		return fmt.Errorf("%w: to_device extension: %w", slidingsync.ErrInvalidResponse, err)
	}
	if resp.NextBatch.Null {
		return fmt.Errorf("%w: to_device extension: next_batch is null", slidingsync.ErrInvalidResponse)
	}
	log := zerolog.Ctx(ctx)
	evts := decodeToDevice(ctx, resp.Events)
	if len(evts) > 0 {
		if err := td.handler(ctx, evts); err != nil {
			return fmt.Errorf("to-device handler: %w", err)
		}
	}
	next := resp.NextBatch.Val
	td.mu.Lock()
	defer td.mu.Unlock()
	switch {
	case next == "" || (next == since && len(resp.Events) > 0):
		// A token that does not advance: keep since, do not ask for more at once (that
		// would spin), and say so once until it advances again.
		if !td.stalled {
			td.stalled = true
			log.Warn().Str("since", since).Str("next_batch", next).Int("events", len(resp.Events)).
				Msg("to_device next_batch is missing or does not advance; keeping since")
		}
	default:
		if td.stalled && next != since {
			td.stalled = false
			log.Info().Str("next_batch", next).Msg("to_device next_batch advances again")
		}
		td.staged = next
		td.more = len(resp.Events) >= td.limit && next != since
	}
	return nil
}

// decodeToDevice decodes each event on its own, so that one undecodable event does not block
// the queue: it is dropped with a warning. Contents are parsed for known types.
func decodeToDevice(ctx context.Context, raws []json.RawMessage) []*event.Event {
	evts := make([]*event.Event, 0, len(raws))
	dropped := 0
	for _, raw := range raws {
		var evt event.Event
		if err := json.Unmarshal(raw, &evt); err != nil || evt.Type.Type == "" {
			dropped++
			continue
		}
		evt.Type.Class = event.ToDeviceEventType
		evt.Mautrix.EventSource = event.SourceToDevice
		if err := evt.Content.ParseRaw(evt.Type); err != nil && !errors.Is(err, event.ErrContentAlreadyParsed) {
			zerolog.Ctx(ctx).Debug().Err(err).Stringer("type", evt.Type).Msg("Failed to parse to-device event content")
		}
		evts = append(evts, &evt)
	}
	if dropped > 0 {
		zerolog.Ctx(ctx).Warn().Int("dropped", dropped).Msg("Dropped undecodable to-device events")
	}
	return evts
}

// Stalled implements slidingsync.Staller: true while the token does not advance, so the loop
// backs off instead of asking again at once.
func (td *ToDevice) Stalled() bool {
	td.mu.Lock()
	defer td.mu.Unlock()
	return td.stalled
}

// MorePending implements slidingsync.MorePender: true after a full batch whose token
// advanced, so that the next request does not long-poll.
func (td *ToDevice) MorePending() bool {
	td.mu.Lock()
	defer td.mu.Unlock()
	return td.more
}

// Checkpoint implements slidingsync.Checkpointer with the staged token.
func (td *ToDevice) Checkpoint(context.Context) (json.RawMessage, error) {
	td.mu.Lock()
	defer td.mu.Unlock()
	return json.Marshal(toDeviceCheckpoint{Since: td.staged})
}

// Restore implements slidingsync.Checkpointer.
func (td *ToDevice) Restore(_ context.Context, checkpoint json.RawMessage) error {
	var cp toDeviceCheckpoint
	if len(checkpoint) > 0 && string(checkpoint) != "null" {
		if err := json.Unmarshal(checkpoint, &cp); err != nil {
			return fmt.Errorf("e2ee: decode to_device checkpoint: %w", err)
		}
	}
	td.mu.Lock()
	defer td.mu.Unlock()
	td.committed, td.staged, td.more = cp.Since, cp.Since, false
	return nil
}

// Reset implements slidingsync.Resetter. The token is independent of pos and is kept: the
// request after M_UNKNOWN_POS carries it again, and nothing is delivered twice.
func (td *ToDevice) Reset(context.Context) error { return nil }

// AfterCommit implements slidingsync.AfterCommitter: the staged token becomes the one sent.
func (td *ToDevice) AfterCommit(context.Context) {
	td.mu.Lock()
	defer td.mu.Unlock()
	td.committed = td.staged
}
