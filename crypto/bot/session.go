package bot

import (
	"context"
	"crypto/rand"
	"database/sql"
	"errors"
	"fmt"
	"time"

	"github.com/rs/zerolog"
	"go.mau.fi/util/dbutil"
	"maunium.net/go/mautrix"
	mcrypto "maunium.net/go/mautrix/crypto"
	"maunium.net/go/mautrix/id"

	"github.com/sliding-e2ee/sdk/slidingsync"
	"github.com/sliding-e2ee/sdk/slidingsync/sqlstore"
)

// session is what Run needs of the stored session.
type session struct {
	pickleKey []byte
	created   time.Time
}

// userOf returns the user the client or Config.LoginAs names.
func (h *Helper) userOf() (id.UserID, error) {
	if h.cli.UserID != "" {
		return h.cli.UserID, nil
	}
	if h.cfg.LoginAs == nil {
		return "", errors.New("bot: the client has no user ID and Config.LoginAs is nil")
	}
	user := id.UserID(h.cfg.LoginAs.Identifier.User)
	if _, _, err := user.Parse(); err != nil {
		return "", fmt.Errorf("bot: Config.LoginAs names %q, not a full user ID (@user:server), so the stored session could not be found again", user)
	}
	return user, nil
}

// session restores the stored session into the client, or logs in once (or takes the
// client's access token) and stores it, so that a restart never creates a new device.
func (h *Helper) session(ctx context.Context, db *dbutil.Database) (session, error) {
	user, err := h.userOf()
	if err != nil {
		return session{}, err
	}
	var deviceID id.DeviceID
	var token string
	var pickleKey []byte
	var created int64
	err = db.QueryRow(ctx, `SELECT device_id, access_token, pickle_key, created_at FROM ssbot_session WHERE user_id=$1`, user).
		Scan(&deviceID, &token, &pickleKey, &created)
	switch {
	case err == nil:
		if h.cli.DeviceID != "" && h.cli.DeviceID != deviceID {
			return session{}, fmt.Errorf("bot: the database holds device %s of %s, not %s: use another database", deviceID, user, h.cli.DeviceID)
		}
		h.cli.UserID, h.cli.DeviceID = user, deviceID
		if h.cli.AccessToken == "" {
			h.cli.AccessToken = token
		} else if h.cli.AccessToken != token {
			// A new token for the same device: keep it for the next start.
			if _, err := db.Exec(ctx, `UPDATE ssbot_session SET access_token=$2 WHERE user_id=$1`, user, h.cli.AccessToken); err != nil {
				return session{}, fmt.Errorf("bot: store the access token: %w", err)
			}
		}
		zerolog.Ctx(ctx).Info().Stringer("device_id", deviceID).Msg("Using the stored session")
		return h.withPickleKey(session{pickleKey: pickleKey, created: time.UnixMilli(created)}), nil
	case !errors.Is(err, sql.ErrNoRows):
		return session{}, fmt.Errorf("bot: read the stored session: %w", err)
	}

	h.cli.UserID = user
	switch {
	case h.cli.AccessToken != "":
		if h.cli.DeviceID == "" {
			resp, err := h.cli.Whoami(ctx)
			if err != nil {
				return session{}, fmt.Errorf("bot: whoami: %w", err)
			}
			if resp.UserID != user {
				return session{}, fmt.Errorf("bot: the access token belongs to %s, not %s", resp.UserID, user)
			}
			h.cli.DeviceID = resp.DeviceID
		}
	case h.cfg.LoginAs != nil:
		req := *h.cfg.LoginAs
		req.StoreCredentials = true
		if _, err := h.cli.Login(ctx, &req); err != nil {
			return session{}, fmt.Errorf("bot: login: %w", err)
		}
		if h.cli.UserID != user {
			return session{}, fmt.Errorf("bot: logged in as %s, not %s", h.cli.UserID, user)
		}
	default:
		return session{}, errors.New("bot: no stored session: the client needs an access token, or Config.LoginAs a password")
	}
	pickleKey = make([]byte, 32)
	_, _ = rand.Read(pickleKey)
	now := time.Now()
	_, err = db.Exec(ctx, `INSERT INTO ssbot_session (user_id, device_id, access_token, pickle_key, created_at) VALUES ($1, $2, $3, $4, $5)`,
		h.cli.UserID, h.cli.DeviceID, h.cli.AccessToken, pickleKey, now.UnixMilli())
	if err != nil {
		return session{}, fmt.Errorf("bot: store the session: %w", err)
	}
	zerolog.Ctx(ctx).Info().Stringer("device_id", h.cli.DeviceID).Msg("No session in this database: logged in as a new device, whose session is now stored (Helper.Logout deletes the device)")
	return h.withPickleKey(session{pickleKey: pickleKey, created: now}), nil
}

func (h *Helper) withPickleKey(s session) session {
	if len(h.cfg.PickleKey) > 0 {
		s.pickleKey = h.cfg.PickleKey
	}
	return s
}

// PasswordLogin returns a password login for user, for Config.LoginAs.
func PasswordLogin(user id.UserID, password string) *mautrix.ReqLogin {
	return &mautrix.ReqLogin{
		Type:       mautrix.AuthTypePassword,
		Identifier: mautrix.UserIdentifier{Type: mautrix.IdentifierTypeUser, User: user.String()},
		Password:   password,
	}
}

// Logout deletes the stored session's device on the server (its keys go with it, so peers
// stop encrypting for it) and forgets the session with everything mautrix stored under its
// pickle key (the Olm account, its Olm and Megolm sessions, stored secrets), so that the next
// Run logs in as a new device with a new account. It waits for the device's lease, so it never pulls the
// device from under a running bot. Without a stored session it does nothing.
func (h *Helper) Logout(ctx context.Context) error {
	if !h.cfg.AllowInsecureHTTP {
		if err := slidingsync.CheckTransport(h.cli.HomeserverURL); err != nil {
			return fmt.Errorf("bot: homeserver: %w", err)
		}
	}
	db, botDB, closeDB, err := h.openDB(ctx)
	if err != nil {
		return err
	}
	defer closeDB()
	user, err := h.userOf()
	if err != nil {
		return err
	}
	var deviceID id.DeviceID
	var token string
	err = botDB.QueryRow(ctx, `SELECT device_id, access_token FROM ssbot_session WHERE user_id=$1`, user).Scan(&deviceID, &token)
	if errors.Is(err, sql.ErrNoRows) {
		return nil
	} else if err != nil {
		return fmt.Errorf("bot: read the stored session: %w", err)
	}
	store := sqlstore.New(db, nil)
	if err := store.Upgrade(ctx); err != nil {
		return fmt.Errorf("bot: upgrade the sliding sync store: %w", err)
	}
	cs := mcrypto.NewSQLCryptoStore(db, nil, user.String(), deviceID, nil)
	if err := cs.DB.Upgrade(ctx); err != nil {
		return fmt.Errorf("bot: upgrade the crypto store: %w", err)
	}
	return store.RunWithLease(ctx, user, deviceID, h.cfg.Lease, func(ctx context.Context, _ *sqlstore.Lease) error {
		h.cli.UserID, h.cli.DeviceID, h.cli.AccessToken = user, deviceID, token
		if _, err := h.cli.Logout(ctx); err != nil && !errors.Is(err, mautrix.MUnknownToken) {
			return fmt.Errorf("bot: log out device %s: %w", deviceID, err)
		}
		err := db.DoTxn(ctx, nil, func(ctx context.Context) error {
			// mautrix keys its crypto rows by user; the next device needs a new account.
			for _, table := range []string{"crypto_olm_session", "crypto_megolm_inbound_session", "crypto_megolm_outbound_session", "crypto_secrets", "crypto_account"} {
				if _, err := db.Exec(ctx, "DELETE FROM "+table+" WHERE account_id=$1", user); err != nil {
					return fmt.Errorf("forget %s: %w", table, err)
				}
			}
			_, err := botDB.Exec(ctx, `DELETE FROM ssbot_session WHERE user_id=$1`, user)
			return err
		})
		if err != nil {
			return fmt.Errorf("bot: forget the session: %w", err)
		}
		zerolog.Ctx(ctx).Info().Stringer("device_id", deviceID).Msg("Logged out; the device is deleted")
		return nil
	})
}
