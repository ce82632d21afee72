package crypto

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/rs/zerolog"
	"maunium.net/go/mautrix"
	goolmaccount "maunium.net/go/mautrix/crypto/goolm/account"
	"maunium.net/go/mautrix/id"

	"github.com/sliding-e2ee/sdk/e2ee"
)

// What the zero values of the fallback key settings of Config mean.
const (
	defaultFallbackKeyRotation = time.Hour
	defaultFallbackKeyGrace    = time.Hour
)

// ErrFallbackNeedsGoolm is returned by New when fallback keys are enabled but the OlmMachine's
// account is not a goolm account: mautrix has no fallback key support, so this package drives
// goolm's account directly. Build with the goolm tag or set Config.DisableFallbackKeys.
var ErrFallbackNeedsGoolm = errors.New("crypto: fallback keys need the goolm Olm backend (build with -tags goolm, or set Config.DisableFallbackKeys)")

const (
	loadFallbackQuery = `
		SELECT upload_pending, uploaded, rotated_at, forget_at FROM sdkcrypto_fallback_key WHERE account_id = $1
	`
	setFallbackPendingQuery = `
		INSERT INTO sdkcrypto_fallback_key (account_id, upload_pending) VALUES ($1, $2)
		ON CONFLICT (account_id) DO UPDATE SET upload_pending = excluded.upload_pending
	`
	fallbackRotatedQuery = `
		INSERT INTO sdkcrypto_fallback_key (account_id, upload_pending, uploaded, rotated_at, forget_at)
		VALUES ($1, true, false, $2, $3)
		ON CONFLICT (account_id) DO UPDATE SET uploaded = false, rotated_at = excluded.rotated_at, forget_at = excluded.forget_at
	`
	fallbackUploadedQuery  = `UPDATE sdkcrypto_fallback_key SET uploaded = true, upload_pending = false WHERE account_id = $1`
	fallbackForgottenQuery = `UPDATE sdkcrypto_fallback_key SET forget_at = 0 WHERE account_id = $1`
)

// fallbackCache remembers the committed upload_pending of the fallback key row. Synapse sends
// the unused fallback key types in every response, and writing the same value again on every
// idle long-poll cost a statement in each commit.
//
// known is true only while pending is what the database holds: HandleE2EE clears it before
// it writes and stages what it wrote; the commit of the same delta (the After of the Step that
// wrote it) confirms it. A commit that rolls back never confirms, so the next response writes again.
// Run's writes to the row (writeFallback) clear known and bump gen before and after they run,
// so a commit that overlapped one of them confirms nothing: which write landed last is then
// unknown.
type fallbackCache struct {
	known, pending bool
	gen            uint64 // bumped around each of Run's writes
	runWriting     bool

	staged        *e2ee.Delta // the delta whose HandleE2EE wrote the row, until its commit
	stagedPending bool
	stagedGen     uint64
}

type fallbackRow struct {
	pending, uploaded   bool
	rotatedAt, forgetAt int64 // unix milliseconds
}

func (m *Machine) loadFallback(ctx context.Context) (row fallbackRow, err error) {
	err = m.db.QueryRow(ctx, loadFallbackQuery, m.accountKey).Scan(&row.pending, &row.uploaded, &row.rotatedAt, &row.forgetAt)
	if errors.Is(err, sql.ErrNoRows) {
		err = nil
	}
	return
}

// setFallbackPending records durably whether the server lacks an unused fallback key.
func (m *Machine) setFallbackPending(ctx context.Context, pending bool) error {
	_, err := m.db.Exec(ctx, setFallbackPendingQuery, m.accountKey, pending)
	return err
}

// handleFallbackTypes records what a response said about the device's fallback keys, inside
// the commit transaction, unless the row is known to hold it already (see fallbackCache). A
// response without the field (a server without fallback key support) changes nothing.
func (m *Machine) handleFallbackTypes(ctx context.Context, d *e2ee.Delta) error {
	if m.goolm == nil {
		return nil
	}
	pending := d.FallbackKeyUsed(id.KeyAlgorithmSignedCurve25519)
	m.mu.Lock()
	fb := &m.fb
	if fb.known && fb.pending == pending {
		m.mu.Unlock()
		return nil
	}
	fb.known = false
	fb.staged, fb.stagedPending, fb.stagedGen = d, pending, fb.gen
	m.mu.Unlock()
	if err := m.setFallbackPending(ctx, pending); err != nil {
		return err
	}
	// Run reads the row again. Callers that commit outside a transaction (tests, tools) may
	// never report the commit; in a transaction Run may read before it commits, and the
	// commit sets this again.
	m.fallbackDirty.Store(true)
	return nil
}

// fallbackCommittedLocked is told that the commit of d (nil: a commit without a delta, or one
// reported without it) is durable. It confirms what HandleE2EE wrote for d and reports whether
// Run must read the row again. Caller holds m.mu.
func (m *Machine) fallbackCommittedLocked(d *e2ee.Delta) bool {
	fb := &m.fb
	if fb.staged == nil {
		return false
	}
	if d == fb.staged && fb.stagedGen == fb.gen && !fb.runWriting {
		fb.known, fb.pending = true, fb.stagedPending
	}
	fb.staged = nil
	m.fallbackDirty.Store(true)
	return true
}

// writeFallback runs one of Run's writes to the fallback key row (see fallbackCache).
func (m *Machine) writeFallback(write func() error) error {
	m.mu.Lock()
	m.fb.known, m.fb.runWriting = false, true
	m.fb.gen++
	m.mu.Unlock()
	defer func() {
		m.mu.Lock()
		m.fb.runWriting = false
		m.fb.gen++
		m.mu.Unlock()
	}()
	return write()
}

// fallbackWork forgets the previous private key once its grace period is over, and rotates
// and uploads the fallback key when the server lacks one, at most once per
// FallbackKeyRotation. next is when it wants to run again (zero: only on a kick).
func (m *Machine) fallbackWork(ctx context.Context) (next time.Time, err error) {
	if m.goolm == nil {
		return time.Time{}, nil
	}
	row, err := m.loadFallback(ctx)
	if err != nil {
		return time.Time{}, fmt.Errorf("load fallback key state: %w", err)
	}
	now := time.Now()
	if row.forgetAt != 0 {
		if forget := time.UnixMilli(row.forgetAt); now.Before(forget) {
			next = forget
		} else if err := m.forgetOldFallbackKey(ctx); err != nil {
			return time.Time{}, err
		}
	}
	switch {
	case row.rotatedAt != 0 && !row.uploaded:
		// Rotated but not uploaded yet (a failed upload, a crash): upload the same key.
	case !row.pending:
		return next, nil
	case row.rotatedAt != 0 && now.Before(time.UnixMilli(row.rotatedAt).Add(m.cfg.FallbackKeyRotation)):
		// Rotated recently: the report is stale or the new key was used at once. Wait.
		due := time.UnixMilli(row.rotatedAt).Add(m.cfg.FallbackKeyRotation)
		if next.IsZero() || due.Before(next) {
			next = due
		}
		return next, nil
	default:
		if err := m.rotateFallbackKey(ctx, now, row.rotatedAt != 0); err != nil {
			return time.Time{}, err
		}
		if row.rotatedAt != 0 {
			if forget := now.Add(m.cfg.FallbackKeyGrace); next.IsZero() || forget.Before(next) {
				next = forget
			}
		}
	}
	if err := m.uploadFallbackKey(ctx); err != nil {
		return time.Time{}, err
	}
	return next, nil
}

// rotateFallbackKey generates a new fallback key, keeping the previous private key (if any)
// for the grace period, and saves the account before anything is uploaded.
func (m *Machine) rotateFallbackKey(ctx context.Context, now time.Time, hadKey bool) error {
	m.acctMu.Lock()
	defer m.acctMu.Unlock()
	acc := m.goolm
	cur, prev, num, next := acc.CurrentFallbackKey, acc.PrevFallbackKey, acc.NumFallbackKeys, acc.NextOneTimeKeyID
	if err := acc.GenFallbackKey(); err != nil {
		return fmt.Errorf("generate fallback key: %w", err)
	}
	var forgetAt int64
	if hadKey {
		forgetAt = now.Add(m.cfg.FallbackKeyGrace).UnixMilli()
	}
	// The account and the record commit together, so that a crash cannot leave a rotated
	// account that the record does not know about (which would rotate again and drop the
	// uploaded key from the account).
	err := m.writeFallback(func() error {
		return m.db.DoTxn(ctx, nil, func(ctx context.Context) error {
			if err := m.store.PutAccount(ctx, m.olm.GetAccount()); err != nil {
				return fmt.Errorf("save account: %w", err)
			}
			if _, err := m.db.Exec(ctx, fallbackRotatedQuery, m.accountKey, now.UnixMilli(), forgetAt); err != nil {
				return fmt.Errorf("record fallback key rotation: %w", err)
			}
			return nil
		})
	})
	if err != nil {
		// Undo the rotation in memory too, so that a retry keeps the uploaded key.
		acc.CurrentFallbackKey, acc.PrevFallbackKey, acc.NumFallbackKeys, acc.NextOneTimeKeyID = cur, prev, num, next
		return err
	}
	zerolog.Ctx(ctx).Debug().Bool("kept_previous", hadKey).Msg("Generated a new fallback key")
	return nil
}

// currentFallbackKeys returns the current fallback key as the fallback_keys field of a
// /keys/upload request: {"signed_curve25519:<key id>": {"key": ..., "fallback": true,
// "signatures": {...}}}, signed by the device. It is empty before the first rotation or when
// fallback keys are disabled.
func (m *Machine) currentFallbackKeys() (map[id.KeyID]mautrix.OneTimeKey, error) {
	m.acctMu.Lock()
	defer m.acctMu.Unlock()
	return m.signedFallbackKeys()
}

func (m *Machine) signedFallbackKeys() (map[id.KeyID]mautrix.OneTimeKey, error) {
	out := make(map[id.KeyID]mautrix.OneTimeKey)
	if m.goolm == nil {
		return out, nil
	}
	acc := m.olm.GetAccount()
	for keyID, pub := range m.goolm.FallbackKey() {
		key := mautrix.OneTimeKey{Key: pub, Fallback: true, IsSigned: true}
		sig, err := acc.SignJSON(&key)
		if err != nil {
			return nil, fmt.Errorf("sign fallback key: %w", err)
		}
		key.Signatures = map[id.UserID]map[id.KeyID]string{
			m.cli.UserID: {id.NewKeyID(id.KeyAlgorithmEd25519, m.cli.DeviceID.String()): sig},
		}
		out[id.NewKeyID(id.KeyAlgorithmSignedCurve25519, keyID)] = key
	}
	return out, nil
}

type fallbackUploadRequest struct {
	FallbackKeys map[id.KeyID]mautrix.OneTimeKey `json:"fallback_keys"`
}

// uploadFallbackKey uploads the current fallback key and records that it was.
func (m *Machine) uploadFallbackKey(ctx context.Context) error {
	keys, err := m.currentFallbackKeys()
	if err != nil {
		return err
	}
	if len(keys) == 0 {
		return errors.New("no fallback key to upload")
	}
	var resp mautrix.RespUploadKeys
	url := m.cli.BuildClientURL("v3", "keys", "upload")
	if _, err := m.cli.MakeRequest(ctx, http.MethodPost, url, &fallbackUploadRequest{FallbackKeys: keys}, &resp); err != nil {
		return fmt.Errorf("upload fallback key: %w", err)
	}
	m.acctMu.Lock()
	m.goolm.CurrentFallbackKey.Published = true
	err = m.writeFallback(func() error {
		return m.db.DoTxn(ctx, nil, func(ctx context.Context) error {
			if err := m.store.PutAccount(ctx, m.olm.GetAccount()); err != nil {
				return fmt.Errorf("save account: %w", err)
			}
			if _, err := m.db.Exec(ctx, fallbackUploadedQuery, m.accountKey); err != nil {
				return fmt.Errorf("record fallback key upload: %w", err)
			}
			return nil
		})
	})
	m.acctMu.Unlock()
	if err != nil {
		return err
	}
	zerolog.Ctx(ctx).Debug().Msg("Uploaded the fallback key")
	return nil
}

// forgetOldFallbackKey drops the previous fallback private key after its grace period.
func (m *Machine) forgetOldFallbackKey(ctx context.Context) error {
	m.acctMu.Lock()
	m.goolm.ForgetOldFallbackKey()
	err := m.db.DoTxn(ctx, nil, func(ctx context.Context) error {
		if err := m.store.PutAccount(ctx, m.olm.GetAccount()); err != nil {
			return fmt.Errorf("save account: %w", err)
		}
		if _, err := m.db.Exec(ctx, fallbackForgottenQuery, m.accountKey); err != nil {
			return fmt.Errorf("record forgotten fallback key: %w", err)
		}
		return nil
	})
	m.acctMu.Unlock()
	if err != nil {
		return err
	}
	zerolog.Ctx(ctx).Debug().Msg("Forgot the previous fallback key")
	return nil
}

// goolmAccount returns the goolm account behind acc, or nil.
func goolmAccount(internal any) *goolmaccount.Account {
	acc, _ := internal.(*goolmaccount.Account)
	return acc
}
