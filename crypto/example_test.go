package crypto_test

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"github.com/rs/zerolog"
	"maunium.net/go/mautrix"
	mcrypto "maunium.net/go/mautrix/crypto"

	"github.com/sliding-e2ee/sdk/crypto"
	"github.com/sliding-e2ee/sdk/e2ee"
	"github.com/sliding-e2ee/sdk/slidingsync"
	"github.com/sliding-e2ee/sdk/slidingsync/sqlstore"
	"github.com/sliding-e2ee/sdk/slidingsync/sqlstore/dbopen"
)

// runBot wires a bot that decrypts: one database holds the sliding sync store, mautrix's
// crypto store and the Machine's tables, so that device-list changes commit with pos.
func runBot(ctx context.Context, cli *mautrix.Client, dbPath string, pickleKey []byte) error {
	db, err := dbopen.Open(dbPath, dbopen.Config{})
	if err != nil {
		return err
	}
	defer db.Close()
	store := sqlstore.New(db, nil)
	if err := store.Upgrade(ctx); err != nil {
		return err
	}
	cryptoStore := mcrypto.NewSQLCryptoStore(db, nil, "", cli.DeviceID, pickleKey)
	if err := cryptoStore.DB.Upgrade(ctx); err != nil {
		return err
	}
	stateStore := mautrix.NewMemoryStateStore()
	log := zerolog.Ctx(ctx).With().Str("component", "crypto").Logger()
	olm := mcrypto.NewOlmMachine(cli, &log, cryptoStore, stateStore.(mcrypto.StateStore))
	if err := olm.Load(ctx); err != nil {
		return err
	}
	mach, err := crypto.New(cli, olm, crypto.Config{})
	if err != nil {
		return err
	}
	if err := mach.Upgrade(ctx); err != nil {
		return err
	}
	exts, release, err := e2ee.New(cli.UserID, cli.DeviceID, e2ee.Config{Consumer: mach, ToDevice: mach.HandleToDevice})
	if err != nil {
		return err
	}
	defer release()
	conn, err := slidingsync.New(cli, slidingsync.Config{
		Store:      store,
		Extensions: exts,
		Lists: map[string]slidingsync.List{"all": {
			Window: slidingsync.Grow(500),
			ListConfig: slidingsync.ListConfig{
				TimelineLimit: 10,
				RequiredState: crypto.RequiredState(true),
			},
		}},
		OnResponse: func(ctx context.Context, res *slidingsync.Result) (slidingsync.Step, error) {
			mach.HandleRooms(ctx, res) // room state into the OlmMachine's state store
			return slidingsync.Step{}, nil
		},
	})
	if err != nil {
		return err
	}

	machCtx, stop := context.WithCancel(ctx)
	var wg sync.WaitGroup
	var machErr error
	wg.Go(func() { machErr = mach.Run(machCtx) })
	connErr := conn.Run(ctx)
	stop()
	wg.Wait() // Run has stopped: nothing touches the account any more
	if errors.Is(machErr, context.Canceled) {
		machErr = nil
	}
	return errors.Join(connErr, machErr)
}

// The Machine sits between the e2ee and to_device extensions and mautrix's OlmMachine.
func Example() {
	_ = runBot // see runBot: it needs a homeserver
}

// A bot that sends encrypted messages asks for every member; one that only decrypts can load
// members lazily.
func ExampleRequiredState() {
	for _, all := range []bool{true, false} {
		rs := crypto.RequiredState(all)
		fmt.Printf("all members=%v: lazy members=%v, state:", all, rs.LazyMembers)
		for _, f := range rs.Include {
			fmt.Printf(" %s/%q", f.Type, f.StateKey)
		}
		fmt.Println()
	}
	// Output:
	// all members=true: lazy members=false, state: m.room.encryption/"" m.room.history_visibility/"" m.room.member/"*"
	// all members=false: lazy members=true, state: m.room.encryption/"" m.room.history_visibility/""
}
