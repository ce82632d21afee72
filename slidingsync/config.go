package slidingsync

import (
	"context"
	"errors"
	"fmt"
	"time"

	"maunium.net/go/mautrix/id"
)

// What the zero values of Config mean; New applies them once (withDefaults).
const (
	defaultPollTimeout     = 30 * time.Second
	defaultTimeoutMargin   = 15 * time.Second
	defaultNoPollTimeout   = 2 * time.Minute
	defaultMinBackoff      = time.Second
	defaultMaxBackoff      = 30 * time.Second
	defaultMaxResponseSize = 256 << 20
)

// Config holds the settings of a Conn. The zero value of every field is usable.
type Config struct {
	// Protocol forces a dialect. ProtocolAuto (the zero value) discovers it when Run starts.
	Protocol Protocol
	// BaseURL is where sliding sync is served when it is not the homeserver (an MSC3575 proxy).
	// Empty means the homeserver, or what discovery finds; setting it needs an explicit Protocol.
	BaseURL string
	// ConnID separates concurrent connections of one device. Empty is the default connection.
	ConnID string
	// Lists and RoomSubscriptions are the initial configuration; change them later with
	// SetList, RemoveList, Subscribe and Unsubscribe.
	Lists             map[string]List                // lists by name
	RoomSubscriptions map[id.RoomID]RoomSubscription // subscriptions by room
	// Extensions are sent with every request, keyed by their wire key.
	Extensions []Extension
	// Store persists state. Nil means a new MemoryStore.
	Store Store
	// OnResponse is called once per processed response, after extensions and the merge and
	// before the commit. An error aborts the cycle (nothing is committed, the same pos is
	// retried after a backoff), so delivery is at least once. The Step it returns is the
	// application's part of the commit: Step.Commit runs inside the transaction that commits
	// pos (for writes to other tables of the same database), Step.After once it is durable;
	// return Step{} for neither. Nil means no handler.
	OnResponse func(ctx context.Context, res *Result) (Step, error)
	// PollTimeout is the long-poll time asked of the server. Zero means 30 s.
	PollTimeout time.Duration
	// TimeoutMargin is added to the poll timeout for the HTTP request's own timeout, so that a
	// response sent at the end of the poll is not lost. Zero means 15 s.
	TimeoutMargin time.Duration
	// NoPollTimeout is the HTTP timeout of a request that asks the server not to wait
	// (timeout=0: the first request of a Run, window steps, catch-up after a full to-device
	// batch). The server computes such a response at once, which for a large window on a
	// loaded server can take long, and Synapse keeps computing after the client gives up.
	// Zero means 2 min.
	NoPollTimeout time.Duration
	// OnFailure, if set, is called from Run for every failed cycle that Run retries, before
	// the wait: the application learns that syncing is failing (and how long it has been
	// failing the same way) while Run keeps retrying. It must not block.
	OnFailure func(ctx context.Context, f Failure)
	// MinBackoff and MaxBackoff bound the exponential backoff after retryable errors (5xx,
	// network, undecodable responses). Zero means 1 s and 30 s.
	MinBackoff, MaxBackoff time.Duration
	// TimelineCap is how many timeline events are kept per room. Zero means 20.
	TimelineCap int
	// MaxResponseSize bounds a response body. Zero means 256 MiB.
	MaxResponseSize int64
	// CompactState keeps the events of the state model (RoomState.State, Timeline and
	// InviteState) with their content as raw JSON only: Content.VeryRaw is set, Raw and Parsed
	// are nil. Read one by parsing a copy of its content (c := evt.Content;
	// c.ParseRaw(evt.Type)), as the state is shared. It roughly halves the memory the state
	// model takes and makes commits cheaper; the events of Result.Response are not affected.
	// False keeps them decoded.
	CompactState bool
	// RoomCache bounds how many rooms' merged state the Conn keeps in memory. Zero keeps every
	// room. A positive value keeps at most that many, those most recently touched by a
	// response; the Store must then implement RoomLoader: Run loads the checkpoint without its
	// rooms and reads a room from the store when a response touches it and it is not in
	// memory. Room and Rooms then see only the rooms in memory; LoadRoom reads any. Use it
	// when the state model of every room would cost too much memory (about 4 to 7 KB a room).
	RoomCache int
	// AllowInsecureHTTP allows plain http:// to a homeserver or proxy that is not on a
	// loopback address. False (the default) makes Run refuse before sending the access token.
	AllowInsecureHTTP bool
}

// Result is what OnResponse receives for one processed response.
type Result struct {
	// Response is the decoded response.
	Response *Response
	// Rooms holds the merged state of every room in the response.
	Rooms map[id.RoomID]*RoomState
	// Lists holds the merged state of every list in the response.
	Lists map[string]ListState
	// Initial is true when the request carried no pos.
	Initial bool
}

// withDefaults returns cfg with every zero value replaced by what it means, so that the rest
// of the Conn reads its settings without checking them again.
func (cfg Config) withDefaults() Config {
	def := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	def(&cfg.PollTimeout, defaultPollTimeout)
	def(&cfg.TimeoutMargin, defaultTimeoutMargin)
	def(&cfg.NoPollTimeout, defaultNoPollTimeout)
	def(&cfg.MinBackoff, defaultMinBackoff)
	def(&cfg.MaxBackoff, defaultMaxBackoff)
	if cfg.TimelineCap <= 0 {
		cfg.TimelineCap = defaultTimelineCap
	}
	if cfg.MaxResponseSize <= 0 {
		cfg.MaxResponseSize = defaultMaxResponseSize
	}
	if cfg.Store == nil {
		cfg.Store = NewMemoryStore()
	}
	return cfg
}

// check refuses a configuration New cannot run. Defaults are applied.
func (cfg Config) check() error {
	if cfg.Protocol != ProtocolAuto && !cfg.Protocol.valid() {
		return fmt.Errorf("slidingsync: unknown protocol %q", cfg.Protocol)
	}
	if cfg.BaseURL != "" && cfg.Protocol == ProtocolAuto {
		return errors.New("slidingsync: BaseURL needs an explicit Protocol")
	}
	if len(cfg.ConnID) > 16 {
		return fmt.Errorf("slidingsync: conn_id %q is longer than 16 characters", cfg.ConnID)
	}
	seen := make(map[string]bool, len(cfg.Extensions))
	for _, ext := range cfg.Extensions {
		if ext == nil {
			return errors.New("slidingsync: nil extension")
		}
		if seen[ext.Name()] {
			return fmt.Errorf("slidingsync: extension %q configured twice", ext.Name())
		}
		seen[ext.Name()] = true
	}
	for name, l := range cfg.Lists {
		if err := l.Window.check(); err != nil {
			return fmt.Errorf("slidingsync: list %q: %w", name, err)
		}
	}
	if cfg.RoomCache < 0 {
		return fmt.Errorf("slidingsync: negative RoomCache %d", cfg.RoomCache)
	}
	if _, ok := cfg.Store.(RoomLoader); cfg.RoomCache > 0 && !ok {
		return errors.New("slidingsync: RoomCache needs a Store that implements RoomLoader")
	}
	return nil
}
