package e2ee

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/rs/zerolog"
	"maunium.net/go/mautrix/event"

	"github.com/sliding-e2ee/sdk/slidingsync"
)

// Wire keys and limits of the to_device extension.
const (
	// toDeviceName is the extension's name and its wire key on the MSC3575 and MSC4186
	// dialects.
	toDeviceName = "to_device"
	// toDeviceKeyV4 is the default wire key on the stable v4 dialect: MSC4538, which
	// specifies to_device for simplified sliding sync, keeps this unstable prefix until it is
	// stable.
	toDeviceKeyV4 = "org.matrix.msc4538.to_device"
	// maxToDeviceLimit is the limit when Config.ToDeviceLimit is zero, and its maximum:
	// Synapse caps the limit at 100.
	maxToDeviceLimit = 100
)

// toDevice is the to_device extension (MSC3885; MSC4538). Its cursor (since) is its
// checkpoint, which the Conn keeps.
type toDevice struct {
	handler func(ctx context.Context, evts []*event.Event) error // Config.ToDevice
	limit   int
	v4Key   string
	stalled bool // warned about a token that does not advance
}

func newToDevice(cfg Config) *toDevice {
	limit := cfg.ToDeviceLimit
	if limit == 0 {
		limit = maxToDeviceLimit
	}
	limit = min(max(limit, 1), maxToDeviceLimit)
	return &toDevice{handler: cfg.ToDevice, limit: limit, v4Key: cmp.Or(cfg.ToDeviceV4Key, toDeviceKeyV4)}
}

// Name implements slidingsync.Extension. The checkpoint is stored under it on every dialect.
func (td *toDevice) Name() string { return toDeviceName }

// WireKey implements slidingsync.Extension.
func (td *toDevice) WireKey(p slidingsync.Protocol) string {
	if p == slidingsync.ProtocolV4 {
		return td.v4Key
	}
	return toDeviceName
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

// since returns the committed token: the next_batch of the last handled and committed batch.
func since(checkpoint json.RawMessage) (string, error) {
	var cp toDeviceCheckpoint
	if len(checkpoint) > 0 && string(checkpoint) != "null" {
		if err := json.Unmarshal(checkpoint, &cp); err != nil {
			return "", fmt.Errorf("e2ee: decode to_device checkpoint: %w", err)
		}
	}
	return cp.Since, nil
}

// Request implements slidingsync.Extension: the full configuration with the committed token,
// which acknowledges only batches that were handled and committed.
func (td *toDevice) Request(_ context.Context, info slidingsync.RequestInfo) (any, error) {
	s, err := since(info.Checkpoint)
	return toDeviceRequest{Enabled: true, Limit: td.limit, Since: s}, err
}

// Process implements slidingsync.Extension: it hands the events to the handler, and the Step
// carries next_batch as the checkpoint, committed with pos.
func (td *toDevice) Process(ctx context.Context, info slidingsync.RequestInfo, raw json.RawMessage) (slidingsync.Step, error) {
	since, err := since(info.Checkpoint)
	if err != nil || raw == nil {
		// tuwunel leaves the section out when it has no events.
		return slidingsync.Step{Stalled: td.stalled}, err
	}
	var resp toDeviceResponse
	if err := json.Unmarshal(raw, &resp); err != nil {
		return slidingsync.Step{}, fmt.Errorf("%w: to_device extension: %w", slidingsync.ErrInvalidResponse, err)
	}
	if resp.NextBatch.Null {
		return slidingsync.Step{}, fmt.Errorf("%w: to_device extension: next_batch is null", slidingsync.ErrInvalidResponse)
	}
	if evts := decodeToDevice(ctx, resp.Events); len(evts) > 0 {
		if err := td.handler(ctx, evts); err != nil {
			return slidingsync.Step{}, fmt.Errorf("to-device handler: %w", err)
		}
	}
	log := zerolog.Ctx(ctx)
	next := resp.NextBatch.Val
	if next == "" || (next == since && len(resp.Events) > 0) {
		// A token that does not advance: keep since, do not ask for more at once (that
		// would spin), back off, and say so once until it advances again.
		if !td.stalled {
			td.stalled = true
			log.Warn().Str("since", since).Str("next_batch", next).Int("events", len(resp.Events)).
				Msg("to_device next_batch is missing or does not advance; keeping since")
		}
		return slidingsync.Step{Stalled: true}, nil
	}
	if td.stalled && next != since {
		td.stalled = false
		log.Info().Str("next_batch", next).Msg("to_device next_batch advances again")
	}
	// A stall lasts until the token advances: the loop keeps backing off until then.
	step := slidingsync.Step{More: len(resp.Events) >= td.limit && next != since, Stalled: td.stalled}
	if next != since {
		if step.Checkpoint, err = json.Marshal(toDeviceCheckpoint{Since: next}); err != nil {
			return slidingsync.Step{}, err
		}
	}
	return step, nil
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
