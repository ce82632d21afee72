// Package dendritetest runs a real homeserver, Dendrite v0.13.8 (github.com/matrix-org/dendrite,
// Apache-2.0), for integration tests.
//
// [Start] starts a fresh Dendrite per test and stops it (SIGTERM, then SIGKILL) when the test
// ends: server name "localhost", SQLite databases and an in-memory JetStream in the test's
// temporary directory, the client API on a free 127.0.0.1 port and nothing else, federation,
// presence, server notices, search, metrics and rate limiting off, open registration without
// captcha. [Server.Register] registers a user with the m.login.dummy flow and returns a
// logged-in mautrix client. With [WithSlidingSyncProxy] the server's
// /.well-known/matrix/client names a sliding sync proxy (internal/proxytest runs the real
// one).
//
// The binary is the one named by SLIDINGSYNC_DENDRITE_BIN, else a cached build in the user
// cache directory ([CachedBinaryPath], $HOME/.cache/sliding-e2ee/dendrite-v0.13.8), else one
// that [Build] compiles there from the Go module proxy in a throwaway module, so that
// Dendrite's dependencies stay out of this module's go.mod. When none of that works the test
// is skipped with a message that starts with "DENDRITE NOT TESTED", or fails if
// SLIDINGSYNC_REQUIRE_DENDRITE=1 (as CI sets it). .ci/run builds the binary before the tests.
//
// # Costs (2-core machine)
//
// Building Dendrite with cgo (mattn's SQLite) takes 2.5 to 3.5 minutes with a cold Go build
// cache, and a few seconds when it is warm; without a C compiler it builds with modernc's
// SQLite instead (about as long). Once cached, the binary is reused. A started server answers /_matrix/client/versions
// after 0.4 to 2 s; TestEncryptedRoomKeysAndSync takes about 2 s after that.
//
// # Observed end-to-end encryption behaviour of Dendrite v0.13.8
//
// Recorded by TestEncryptedRoomKeysAndSync, which fails if any of it changes:
//
//   - Writes reach /sync asynchronously (through JetStream): a room just joined may be missing
//     from a /sync sent right after the join returned. Tests must poll with a bounded wait.
//   - device_one_time_keys_count is present only while the device has one-time keys: it is
//     absent before the first upload and again once every key is claimed, never
//     {"signed_curve25519": 0}. So on Dendrite an absent count means zero, unlike Synapse,
//     which always sends the map with an explicit 0; a client that reads absence as
//     "unchanged" never tops its keys up after exhaustion. After an upload of 50 keys it says
//     50; a /keys/claim makes it 49 in the next /sync.
//   - device_unused_fallback_key_types is never sent. Dendrite does not implement fallback
//     keys: a fallback_keys upload is accepted and ignored (not counted as a one-time key, and
//     not served by /keys/claim once the one-time keys are gone).
//   - device_lists.changed is sent in v2 /sync: a user's own key upload appears in her own
//     next /sync, and in the next /sync of every user who shares a room with her. In one run
//     Bob, who uploaded no keys, also found his own user ID in changed after joining her room
//     (not reproducible: a client must tolerate its own ID there).
//   - /keys/query and /keys/claim work for local users as specified.
package dendritetest
