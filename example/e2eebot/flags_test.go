package main

import (
	"context"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestBadFlagsAreRefusedBeforeAnyRequest(t *testing.T) {
	var hits atomic.Int32
	hs := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		hits.Add(1)
		http.NotFound(w, nil)
	}))
	defer hs.Close()
	good := options{
		homeserver: hs.URL, user: "@bot:example.org", password: "secret", protocol: "auto",
		db: filepath.Join(t.TempDir(), "bot.db"), leaseDuration: 30 * time.Second,
	}
	for _, tc := range []struct {
		name string
		edit func(*options)
		want string
	}{
		{"a bare localpart", func(o *options) { o.user = "gbot" }, `-user "gbot"`},
		{"an unknown dialect", func(o *options) { o.protocol = "msc9999" }, "-protocol"},
		{"a conn_id over 16 characters", func(o *options) { o.connID = "a-very-long-connection-id" }, "-conn-id"},
		{"a homeserver without a scheme", func(o *options) { o.homeserver = "matrix.example.org:8448" }, `-homeserver "matrix.example.org:8448": give a URL with its scheme`},
		{"plain HTTP to a remote homeserver", func(o *options) { o.homeserver = "http://matrix.example.org" }, "-homeserver \"http://matrix.example.org\": plain HTTP"},
		{"plain HTTP to a remote proxy", func(o *options) { o.syncURL = "http://proxy.example.org" }, "-sliding-sync-url"},
		{"an access token without its device", func(o *options) { o.password, o.accessToken = "", "syt_x" }, "-access-token needs -device-id"},
		{"a negative lease", func(o *options) { o.leaseDuration = -time.Second }, "-lease"},
		{"a negative poll timeout", func(o *options) { o.pollTimeout = -time.Second }, "-poll-timeout"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := good
			tc.edit(&o)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			err := runBot(ctx, o)
			require.Error(t, err)
			assert.Contains(t, err.Error(), tc.want)
			assert.Zero(t, hits.Load(), "no request was made")
		})
	}
}
