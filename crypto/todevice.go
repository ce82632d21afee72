package crypto

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"

	"github.com/rs/zerolog"
	"go.mau.fi/util/dbutil"
	mcrypto "maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/crypto/olm"
	"maunium.net/go/mautrix/event"
	"maunium.net/go/mautrix/id"
)

// ErrRoomKeyNotStored is returned (wrapped) by HandleToDevice when an Olm message carried a
// valid room key that could not be stored. The batch must then not be acknowledged.
var ErrRoomKeyNotStored = errors.New("crypto: a decrypted room key was not stored")

// errPeek rolls back the transaction of the first decryption of an Olm message.
var errPeek = errors.New("crypto: peek only")

// HandleToDevice is the handler for e2ee.Config.ToDevice. An Olm-encrypted event is decrypted and handled
// by the OlmMachine inside one database transaction, which commits only if every room key it
// carried (m.room_key, m.forwarded_room_key) is in the crypto store afterwards; otherwise the
// transaction rolls back, together with the message hash that marks the message as seen and
// the Olm session state, so the re-delivered message decrypts again. Such a failure, a failing
// database or ctx being done makes HandleToDevice return an error, and the batch is not
// acknowledged. A message that does not decrypt (bad ciphertext, unknown session, not for this
// device, already decrypted in an acknowledged batch) is logged by mautrix and skipped, so one
// peer cannot block the queue. m.room_key.withheld is stored here and its storage errors are
// returned; other events go to OlmMachine.HandleToDeviceEvent.
//
// Restoring the Olm state of a message also undoes any step another goroutine made meanwhile
// on the sessions with its sender, so Olm encryption must hold the Machine's account lock:
// send with [Machine.EncryptRoomEvent], which does, rather than calling the OlmMachine's
// ShareGroupSession directly.
func (m *Machine) HandleToDevice(ctx context.Context, evts []*event.Event) error {
	m.acctMu.Lock()
	defer m.acctMu.Unlock()
	for _, evt := range evts {
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := m.handleToDeviceEvent(ctx, evt); err != nil {
			return err
		}
	}
	m.olm.MarkOlmHashSavePoint(ctx)
	return nil
}

func (m *Machine) handleToDeviceEvent(ctx context.Context, evt *event.Event) error {
	if len(evt.ToUserID) > 0 && (evt.ToUserID != m.cli.UserID || evt.ToDeviceID != m.cli.DeviceID) {
		return nil // mautrix drops these too
	}
	switch content := evt.Content.Parsed.(type) {
	case *event.EncryptedEventContent:
		if content.Algorithm == id.AlgorithmOlmV1 {
			return m.handleOlm(ctx, evt, content)
		}
	case *event.RoomKeyWithheldEventContent:
		// mautrix's HandleRoomKeyWithheld only logs a failed write.
		if content.Algorithm != id.AlgorithmMegolmV1 {
			return nil
		}
		if err := m.store.PutWithheldGroupSession(ctx, *content); err != nil {
			return fmt.Errorf("crypto: store withheld room key %s: %w", content.SessionID, err)
		}
		return nil
	case nil:
		if evt.Content.VeryRaw != nil {
			// The extension already tried; an unparsed event is dropped by mautrix anyway.
			zerolog.Ctx(ctx).Debug().Stringer("type", evt.Type).Stringer("sender", evt.Sender).
				Msg("Handing an unparsed to-device event to the OlmMachine")
		}
	}
	m.olm.HandleToDeviceEvent(ctx, evt)
	return nil
}

// handleOlm decrypts and handles one Olm message in two passes, because mautrix neither
// returns the room key it decrypted nor an error when storing it fails:
//
//  1. Peek: HandleEncryptedEvent on a copy of the event without a to-device class, so that
//     mautrix cannot parse the decrypted content and hands it back instead of handling it. The
//     transaction is rolled back and the Olm state restored.
//  2. HandleEncryptedEvent on the event itself, in a transaction that commits only if the
//     message hash was stored (so the message was decrypted again) and the room key the peek
//     found is in the store.
func (m *Machine) handleOlm(ctx context.Context, evt *event.Event, content *event.EncryptedEventContent) error {
	log := zerolog.Ctx(ctx).With().Stringer("sender", evt.Sender).Stringer("sender_key", content.SenderKey).Logger()
	own, ok := content.OlmCiphertext[m.olm.GetAccount().IdentityKey()]
	if !ok {
		log.Debug().Msg("Skipping an Olm message not encrypted for this device")
		return nil
	}
	raw, err := base64.RawStdEncoding.DecodeString(own.Body)
	if err != nil || len(raw) == 0 {
		log.Warn().Msg("Skipping an Olm message whose ciphertext is not base64")
		return nil
	}
	hash := sha256.Sum256(raw) // mautrix's duplicate detection key

	snap, err := m.snapshotOlm(ctx, content.SenderKey, own.Type == id.OlmMsgTypePreKey)
	if err != nil {
		return fmt.Errorf("crypto: snapshot Olm state: %w", err)
	}
	// Inside a caller's transaction the key is committed only when the caller commits, which
	// this Machine cannot see: it is then not announced to RoomKeyCommitted's waiters.
	_, inTxn := m.store.DB.Execable(ctx).(*dbutil.LoggingTxn)
	var dec *mcrypto.DecryptedOlmEvent
	err = m.store.DB.DoTxn(ctx, nil, func(ctx context.Context) error {
		peek := *evt
		peek.Type.Class = event.UnknownEventType
		dec = m.olm.HandleEncryptedEvent(ctx, &peek)
		return errPeek
	})
	if rerr := snap.restore(); rerr != nil {
		return fmt.Errorf("crypto: restore Olm state: %w", rerr)
	}
	if !errors.Is(err, errPeek) {
		return fmt.Errorf("crypto: begin transaction: %w", err)
	}
	if dec == nil {
		// Garbage, an unknown session or a message already handled in an acknowledged batch;
		// mautrix logged why.
		return nil
	}
	key := roomKeyOf(dec)

	err = m.store.DB.DoTxn(ctx, nil, func(ctx context.Context) error {
		if other := m.olm.HandleEncryptedEvent(ctx, evt); other != nil {
			log.Debug().Stringer("decrypted_type", other.Type).Msg("Dropping an unhandled Olm-encrypted to-device event")
		}
		seen, err := m.store.GetOlmHash(ctx, hash)
		if err != nil {
			return fmt.Errorf("read message hash: %w", err)
		} else if seen.IsZero() {
			return errors.New("the Olm message decrypted once but not twice")
		}
		if key == nil {
			return nil
		}
		igs, err := m.store.GetGroupSession(ctx, key.room, key.session)
		if err != nil && !errors.Is(err, mcrypto.ErrGroupSessionWithheld) {
			return fmt.Errorf("%w: room %s, session %s: %w", ErrRoomKeyNotStored, key.room, key.session, err)
		} else if igs == nil {
			return fmt.Errorf("%w: room %s, session %s", ErrRoomKeyNotStored, key.room, key.session)
		}
		return nil
	})
	if err != nil {
		if rerr := snap.restore(); rerr != nil {
			log.Error().Err(rerr).Msg("Failed to restore the Olm state after a failed decryption")
		}
		return fmt.Errorf("crypto: handle Olm message from %s: %w", evt.Sender, err)
	}
	if key != nil && !inTxn {
		m.roomKeyCommitted()
	}
	return nil
}

type roomKeyID struct {
	room    id.RoomID
	session id.SessionID
}

// roomKeyOf returns the room key a decrypted event carries, or nil when it carries none that
// mautrix would store (not Megolm, no signing key, a session key that does not import or does
// not match its session ID): those are dropped by mautrix and must not block the queue.
func roomKeyOf(dec *mcrypto.DecryptedOlmEvent) *roomKeyID {
	content := dec.Content
	content.Parsed = nil
	if content.ParseRaw(event.Type{Type: dec.Type.Type, Class: event.ToDeviceEventType}) != nil {
		return nil
	}
	var session olm.InboundGroupSession
	var err error
	var key roomKeyID
	switch c := content.Parsed.(type) {
	case *event.RoomKeyEventContent:
		if c.Algorithm != id.AlgorithmMegolmV1 || dec.Keys.Ed25519 == "" {
			return nil
		}
		session, err = olm.NewInboundGroupSession([]byte(c.SessionKey))
		key = roomKeyID{c.RoomID, c.SessionID}
	case *event.ForwardedRoomKeyEventContent:
		if c.Algorithm != id.AlgorithmMegolmV1 || dec.Keys.Ed25519 == "" {
			return nil
		}
		session, err = olm.InboundGroupSessionImport([]byte(c.SessionKey))
		key = roomKeyID{c.RoomID, c.SessionID}
	default:
		return nil
	}
	if err != nil || session.ID() != key.session {
		return nil
	}
	return &key
}

// olmSnapshot is the in-memory Olm state that decrypting one message may change: the
// sessions with its sender key, which mautrix's store caches and ratchets in place, and, for a
// pre-key message, the account, which loses the one-time key the sender used. Rolling back the
// database does not undo these.
type olmSnapshot struct {
	key      []byte
	sessions []*mcrypto.OlmSession
	pickled  [][]byte
	times    []mcrypto.ExpirationMixin
	account  *mcrypto.OlmAccount
	acct     []byte
}

func (m *Machine) snapshotOlm(ctx context.Context, senderKey id.SenderKey, preKey bool) (*olmSnapshot, error) {
	s := &olmSnapshot{key: m.store.PickleKey}
	sessions, err := m.store.GetSessions(ctx, senderKey)
	if err != nil {
		return nil, err
	}
	for _, sess := range sessions {
		p, err := sess.Internal.Pickle(s.key)
		if err != nil {
			return nil, err
		}
		s.sessions = append(s.sessions, sess)
		s.pickled = append(s.pickled, p)
		s.times = append(s.times, sess.ExpirationMixin)
	}
	if preKey {
		s.account = m.olm.GetAccount()
		if s.acct, err = s.account.Internal.Pickle(s.key); err != nil {
			return nil, err
		}
	}
	return s, nil
}

// restore puts the snapshot back into the same objects. A session created from a pre-key
// message stays in mautrix's cache, but mautrix only uses cached sessions that the database
// lists, and re-creates it when the message is delivered again.
func (s *olmSnapshot) restore() error {
	for i, sess := range s.sessions {
		if err := sess.Internal.Unpickle(s.pickled[i], s.key); err != nil {
			return err
		}
		sess.ExpirationMixin = s.times[i]
	}
	if s.account != nil {
		return s.account.Internal.Unpickle(s.acct, s.key)
	}
	return nil
}
