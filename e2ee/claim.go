package e2ee

import (
	"errors"
	"fmt"
	"sync"

	"maunium.net/go/mautrix/id"
)

// ErrDeviceAlreadyClaimed is returned by New when an extension of the same
// kind for the same device exists in this process and was not closed: two connections that
// both carry e2ee or to_device steal each other's device-list changes and to-device messages.
var ErrDeviceAlreadyClaimed = errors.New("e2ee: the device already has this extension in this process")

type claimKey struct {
	userID   id.UserID
	deviceID id.DeviceID
	ext      string
}

var claims = struct {
	sync.Mutex
	held map[claimKey]struct{}
}{held: make(map[claimKey]struct{})}

// claim is one extension's hold on its device. release is idempotent.
type claim struct {
	key  claimKey
	once sync.Once
}

func newClaim(userID id.UserID, deviceID id.DeviceID, ext string) (*claim, error) {
	if userID == "" || deviceID == "" {
		return nil, fmt.Errorf("e2ee: %s extension needs a user ID and a device ID", ext)
	}
	key := claimKey{userID: userID, deviceID: deviceID, ext: ext}
	claims.Lock()
	defer claims.Unlock()
	if _, held := claims.held[key]; held {
		return nil, fmt.Errorf("%w: %s for %s/%s", ErrDeviceAlreadyClaimed, ext, userID, deviceID)
	}
	claims.held[key] = struct{}{}
	return &claim{key: key}, nil
}

func (c *claim) release() {
	c.once.Do(func() {
		claims.Lock()
		delete(claims.held, c.key)
		claims.Unlock()
	})
}
