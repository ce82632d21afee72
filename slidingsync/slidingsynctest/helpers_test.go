package slidingsynctest_test

import (
	"context"
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"maunium.net/go/mautrix/id"

	"github.com/sliding-e2ee/sdk/slidingsync"
	"github.com/sliding-e2ee/sdk/slidingsync/slidingsynctest"
)

// A user's own fake endpoint served through HandlerTransport: the handler sees the request
// as a server would (method, path, body, headers) and its answer comes back whole, without a
// socket; a request whose context ended before an answer gets the context's error.
func TestHandlerTransportServesAnyHandler(t *testing.T) {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /_matrix/client/v3/keys/upload", func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusAccepted)
		_, _ = io.WriteString(w, `{"got":`+string(body)+`,"auth":"`+r.Header.Get("Authorization")+`"}`)
	})
	mux.HandleFunc("GET /slow", func(w http.ResponseWriter, r *http.Request) { <-r.Context().Done() })
	cli := &http.Client{Transport: slidingsynctest.HandlerTransport(mux)}

	req, err := http.NewRequest(http.MethodPost, "https://any.invalid/_matrix/client/v3/keys/upload", strings.NewReader(`{"n":1}`))
	require.NoError(t, err)
	req.Header.Set("Authorization", "Bearer t")
	resp, err := cli.Do(req)
	require.NoError(t, err)
	body, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	assert.Equal(t, http.StatusAccepted, resp.StatusCode)
	assert.Equal(t, "application/json", resp.Header.Get("Content-Type"))
	assert.JSONEq(t, `{"got":{"n":1},"auth":"Bearer t"}`, string(body))

	resp, err = cli.Get("https://any.invalid/nothing")
	require.NoError(t, err)
	assert.Equal(t, http.StatusNotFound, resp.StatusCode)

	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	req, err = http.NewRequestWithContext(ctx, http.MethodGet, "https://any.invalid/slow", nil)
	require.NoError(t, err)
	_, err = cli.Do(req)
	assert.ErrorIs(t, err, context.Canceled)
}

func TestWantsStateReadsRequiredStateAsSynapse(t *testing.T) {
	const me = id.UserID("@bot:example.org")
	f := func(typ, key string) slidingsync.StateFilter {
		return slidingsync.StateFilter{Type: typ, StateKey: key}
	}
	senders := map[id.UserID]bool{"@alice:example.org": true}
	for _, tc := range []struct {
		name     string
		rs       slidingsync.RequiredState
		typ, key string
		want     bool
	}{
		{"nothing asked", slidingsync.RequiredState{}, "m.room.name", "", false},
		{"exact type and key", slidingsync.RequiredState{Include: []slidingsync.StateFilter{f("m.room.name", "")}}, "m.room.name", "", true},
		{"other key", slidingsync.RequiredState{Include: []slidingsync.StateFilter{f("m.room.member", "@x:y")}}, "m.room.member", "@z:y", false},
		{"any key", slidingsync.RequiredState{Include: []slidingsync.StateFilter{f("m.room.member", "*")}}, "m.room.member", "@z:y", true},
		{"any type", slidingsync.RequiredState{Include: []slidingsync.StateFilter{f("*", "*")}}, "m.room.topic", "", true},
		{"$ME is the user", slidingsync.RequiredState{Include: []slidingsync.StateFilter{f("m.room.member", "$ME")}}, "m.room.member", me.String(), true},
		{"$ME is nobody else", slidingsync.RequiredState{Include: []slidingsync.StateFilter{f("m.room.member", "$ME")}}, "m.room.member", "@alice:example.org", false},
		{"lazy members: a sender", slidingsync.RequiredState{LazyMembers: true}, "m.room.member", "@alice:example.org", true},
		{"lazy members: not a sender", slidingsync.RequiredState{LazyMembers: true}, "m.room.member", "@bob:example.org", false},
		{"$LAZY filter", slidingsync.RequiredState{Include: []slidingsync.StateFilter{f("m.room.member", "$LAZY")}}, "m.room.member", "@alice:example.org", true},
		{"senders without lazy members", slidingsync.RequiredState{}, "m.room.member", "@alice:example.org", false},
		{"excluded from a wildcard", slidingsync.RequiredState{Include: []slidingsync.StateFilter{f("*", "*")}, Exclude: []slidingsync.StateFilter{f("m.room.topic", "*")}}, "m.room.topic", "", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			assert.Equal(t, tc.want, slidingsynctest.WantsState(tc.rs, me, tc.typ, tc.key, senders))
		})
	}
}
