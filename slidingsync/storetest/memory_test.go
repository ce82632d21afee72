package storetest_test

import (
	"testing"

	"github.com/sliding-e2ee/sdk/slidingsync"
	"github.com/sliding-e2ee/sdk/slidingsync/storetest"
)

func TestMemoryStore(t *testing.T) {
	storetest.Run(t, func(t *testing.T) storetest.Opener {
		s := slidingsync.NewMemoryStore()
		return func(t *testing.T) storetest.Opened {
			return storetest.Opened{Store: s}
		}
	})
}
