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
	"maunium.net/go/mautrix/id"
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
	zerolog.Ctx(ctx).Info().Stringer("device_id", h.cli.DeviceID).Msg("New device; session stored")
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
