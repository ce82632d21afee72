package e2ee

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/rs/zerolog"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"

	"github.com/sliding-e2ee/sdk/slidingsync"
)

// Consumer receives what the e2ee extension learns; package crypto's Machine implements it.
type Consumer interface {
	// HandleE2EE is called once per processed response, on the connection's Run goroutine,
	// before the commit, with the state the commit will hold and what the response told (d,
	// empty when nothing). It must not make network calls; it says in the Step it returns
	// what the response makes it do (its Checkpoint, More and Stalled are ignored):
	//
	//   - Step.Commit runs inside the store transaction that commits the response's pos, with
	//     ctx carrying that transaction. It must durably record what the consumer still has
	//     to do (mark the Changed users and, on Gap, every tracked user as outdated; untrack
	//     the Left users). Writes made with ctx to another child database of the store's
	//     database commit or roll back with pos; writes to another database must be durable
	//     before it returns. An error aborts the commit, and the response is requested and
	//     delivered again. Nil when there is nothing to write (Synapse repeats the key counts
	//     in every response), so that an idle response commits nothing but pos.
	//   - Step.After runs once that commit is durable, and only then: it should start the
	//     network work (key queries for outdated users, key uploads when counts are low or
	//     NeedsFallbackKey) on a goroutine the consumer owns, retried with backoff, and
	//     return at once.
	//
	// Deliveries can repeat (after a failed commit, a crash, or a server that re-sends a
	// delta), so handling must be idempotent.
	HandleE2EE(ctx context.Context, st State, d *Delta) slidingsync.Step
}

// Config says which extensions New returns and where their data goes. At least one of
// Consumer and ToDevice is required.
type Config struct {
	// Consumer receives the e2ee extension's deltas. Nil leaves the e2ee extension out.
	Consumer Consumer
	// ToDevice handles every to-device batch, in the order the server sent the events. Nil
	// leaves the to_device extension out. It must store what it must keep (room keys, Olm
	// sessions) durably before it returns: the batch is acknowledged to the server by the
	// commit that follows. It may be called again with the same events (after a failed
	// commit, a crash or a server that re-sends), so handling must be idempotent; mautrix's
	// Olm message hashes make decryption so. An error aborts the cycle: nothing is committed
	// and the batch is requested again after a backoff. Machine.HandleToDevice of package
	// crypto is one.
	ToDevice func(ctx context.Context, evts []*event.Event) error
	// ToDeviceLimit is how many to-device events one response may carry. Zero means 100,
	// which is also the maximum (Synapse's cap); values are clamped to [1, 100], as limit 0
	// makes Synapse acknowledge everything.
	ToDeviceLimit int
	// ToDeviceV4Key overrides the to_device wire key on the v4 dialect. Empty means
	// "org.matrix.msc4538.to_device".
	ToDeviceV4Key string
}

// New returns the e2ee and to_device extensions of a device (those Config asks for), to give
// to one slidingsync.Conn in [slidingsync.Config.Extensions], in that order. It claims the
// device in this process for each: until release is called (after the connection's Run has
// returned; it is idempotent), another New for the same user and device and the same
// extension returns ErrDeviceAlreadyClaimed. Across processes, hold the store's lease (see
// the package documentation). Each extension must serve one connection at a time.
func New(userID id.UserID, deviceID id.DeviceID, cfg Config) (exts []slidingsync.Extension, release func(), err error) {
	if cfg.Consumer == nil && cfg.ToDevice == nil {
		return nil, nil, errors.New("e2ee: Config.Consumer or Config.ToDevice is required")
	}
	var claims []*claim
	release = func() {
		for _, cl := range claims {
			cl.release()
		}
	}
	if cfg.Consumer != nil {
		cl, err := newClaim(userID, deviceID, e2eeName)
		if err != nil {
			return nil, nil, err
		}
		claims = append(claims, cl)
		exts = append(exts, &keysExt{consumer: cfg.Consumer})
	}
	if cfg.ToDevice != nil {
		cl, err := newClaim(userID, deviceID, toDeviceName)
		if err != nil {
			release()
			return nil, nil, err
		}
		claims = append(claims, cl)
		exts = append(exts, newToDevice(cfg))
	}
	return exts, release, nil
}

// keysExt is the e2ee extension (MSC3884; MSC4543 on v4).
type keysExt struct {
	consumer Consumer
	warnedNo bool // warned once that an initial response had no e2ee section
	// last caches the decoding of the last checkpoint seen, which an idle long-poll repeats.
	lastRaw json.RawMessage
	last    State
}

// Name implements slidingsync.Extension. The checkpoint is stored under it on every dialect.
func (e *keysExt) Name() string { return e2eeName }

// WireKey implements slidingsync.Extension: the MSC4543 key on v4.
func (e *keysExt) WireKey(p slidingsync.Protocol) string {
	if p == slidingsync.ProtocolV4 {
		return e2eeKeyV4
	}
	return e2eeName
}

// Request implements slidingsync.Extension: {"enabled": true} on every request, as servers
// of the MSC4186 family drop the section from the response of a request that left it out.
func (e *keysExt) Request(context.Context, slidingsync.RequestInfo) (any, error) {
	return e2eeRequest{Enabled: true}, nil
}

// Process implements slidingsync.Extension: it merges the section into the committed state
// and lets the consumer say what the response makes it do; the new state is the Step's
// checkpoint.
func (e *keysExt) Process(ctx context.Context, info slidingsync.RequestInfo, raw json.RawMessage) (slidingsync.Step, error) {
	resp, err := decodeResponse(ctx, raw)
	if err != nil {
		return slidingsync.Step{}, err
	}
	committed, err := e.committed(info.Checkpoint)
	if err != nil {
		return slidingsync.Step{}, err
	}
	if resp == nil && info.Pos == "" && !e.warnedNo && info.Protocol != slidingsync.ProtocolMSC3575 {
		// MSC4543: the response to a request without pos must carry the section.
		e.warnedNo = true
		zerolog.Ctx(ctx).Warn().Msg("Response to a request without pos has no e2ee section; the server may not support the extension")
	}
	st, d := Merge(committed, resp, info.Pos == "")
	if d.Gap {
		zerolog.Ctx(ctx).Debug().Bool("initial", info.Pos == "").Msg("Device-list gap: every tracked user is outdated")
	}
	step := e.consumer.HandleE2EE(ctx, st.clone(), &d)
	step.More, step.Stalled = false, false
	if step.Checkpoint, err = json.Marshal(st); err != nil {
		return slidingsync.Step{}, err
	}
	return step, nil
}

// committed decodes the last committed state (none: a connection that never committed with
// e2ee).
func (e *keysExt) committed(raw json.RawMessage) (State, error) {
	if len(raw) == 0 || string(raw) == "null" {
		return State{}, nil
	}
	if !bytes.Equal(raw, e.lastRaw) {
		var st State
		if err := json.Unmarshal(raw, &st); err != nil {
			return State{}, fmt.Errorf("e2ee: decode checkpoint: %w", err)
		}
		e.lastRaw, e.last = bytes.Clone(raw), st
	}
	return e.last.clone(), nil
}
