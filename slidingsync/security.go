package slidingsync

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
)

// CheckTransport returns an error wrapping ErrInsecureHTTP when u is plain http:// to a host
// that is not a loopback address: the access token, a password and every message would cross
// the network in clear. Call it before any request that carries a credential (a login, say);
// [New] and [Conn.Run] call it for the homeserver and the sliding sync endpoint unless
// Config.AllowInsecureHTTP is set.
func CheckTransport(u *url.URL) error {
	if u == nil || !strings.EqualFold(u.Scheme, "http") {
		return nil
	}
	host := u.Hostname()
	if strings.EqualFold(host, "localhost") {
		return nil
	}
	if ip := net.ParseIP(host); ip != nil && ip.IsLoopback() {
		return nil
	}
	return fmt.Errorf("%w: %s", ErrInsecureHTTP, u.Redacted())
}

// RefuseInsecureHTTP wraps an http.RoundTripper (nil means http.DefaultTransport) so that a
// request to plain http:// on a host that is not a loopback address fails before anything is
// sent, whatever sends it (a login, a key upload, a redirect). Put it in the client before
// the first request: cli.Client.Transport = slidingsync.RefuseInsecureHTTP(cli.Client.Transport).
func RefuseInsecureHTTP(next http.RoundTripper) http.RoundTripper {
	if next == nil {
		next = http.DefaultTransport
	}
	return refuseInsecure{next}
}

type refuseInsecure struct{ next http.RoundTripper }

func (r refuseInsecure) RoundTrip(req *http.Request) (*http.Response, error) {
	if err := CheckTransport(req.URL); err != nil {
		if req.Body != nil {
			_ = req.Body.Close()
		}
		return nil, err
	}
	return r.next.RoundTrip(req)
}

// RedactRequestBodies wraps the writer of a zerolog logger so that no log line carries a
// request body: mautrix logs the JSON body of every request it sends (req_body, at debug
// level, and at error level when the request fails), which for a message sent to an
// unencrypted room is its plain text. Lines are rewritten only when they carry req_body
// (their fields are then re-encoded in key order); others pass unchanged. Use it for the
// logger of a mautrix.Client: zerolog.New(slidingsync.RedactRequestBodies(os.Stderr)).
func RedactRequestBodies(w io.Writer) io.Writer { return redactor{w} }

type redactor struct{ w io.Writer }

var reqBodyKey = []byte(`"req_body"`)

func (r redactor) Write(p []byte) (int, error) {
	if !bytes.Contains(p, reqBodyKey) {
		return r.w.Write(p)
	}
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(p, &fields); err != nil {
		// Not one JSON object: drop the line rather than risk leaking it.
		return len(p), nil
	}
	delete(fields, "req_body")
	out, err := json.Marshal(fields)
	if err != nil {
		return len(p), nil
	}
	if _, err := r.w.Write(append(out, '\n')); err != nil {
		return 0, err
	}
	return len(p), nil
}
