package slidingsynctest

import (
	"bytes"
	"fmt"
	"io"
	"net/http"
	"strconv"

	"github.com/rs/zerolog"
	"maunium.net/go/mautrix"
)

// HandlerTransport returns an http.RoundTripper that serves every request with h, in the
// caller's goroutine, whatever the URL's host: a client of a fake homeserver built as an
// http.Handler needs no listener. It opens no sockets and starts no goroutines, so it works
// inside testing/synctest bubbles. The handler sees the request's context; if the context
// ends before the handler wrote a status, RoundTrip returns the context's error. An answer
// already written is returned even if the context ends afterwards, as a network transport
// returns received headers. The handler's panics are not recovered.
func HandlerTransport(h http.Handler) http.RoundTripper { return transport{h} }

type transport struct{ h http.Handler }

func (t transport) RoundTrip(req *http.Request) (*http.Response, error) {
	ctx := req.Context()
	var body []byte
	if req.Body != nil {
		var err error
		body, err = io.ReadAll(req.Body)
		req.Body.Close()
		if err != nil {
			return nil, fmt.Errorf("slidingsynctest: read request body: %w", err)
		}
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	// Shape the request as a server would see it.
	sreq := req.Clone(ctx)
	sreq.Body = io.NopCloser(bytes.NewReader(body))
	sreq.GetBody = nil
	sreq.ContentLength = int64(len(body))
	sreq.RequestURI = req.URL.RequestURI()
	sreq.Proto, sreq.ProtoMajor, sreq.ProtoMinor = "HTTP/1.1", 1, 1
	sreq.RemoteAddr = "192.0.2.1:1234"
	if sreq.Host == "" {
		sreq.Host = req.URL.Host
	}

	rec := &recorder{header: make(http.Header)}
	t.h.ServeHTTP(rec, sreq)
	if !rec.wrote && ctx.Err() != nil {
		return nil, ctx.Err()
	}
	if rec.status == 0 {
		rec.status = http.StatusOK
	}
	return &http.Response{
		Status:        strconv.Itoa(rec.status) + " " + http.StatusText(rec.status),
		StatusCode:    rec.status,
		Proto:         "HTTP/1.1",
		ProtoMajor:    1,
		ProtoMinor:    1,
		Header:        rec.header,
		Body:          io.NopCloser(bytes.NewReader(rec.body.Bytes())),
		ContentLength: int64(rec.body.Len()),
		Request:       req,
	}, nil
}

// recorder buffers one answer. The handler runs in RoundTrip's goroutine, so it needs no lock.
type recorder struct {
	header http.Header
	status int
	wrote  bool
	body   bytes.Buffer
}

func (r *recorder) Header() http.Header { return r.header }

func (r *recorder) WriteHeader(status int) {
	if r.wrote {
		return
	}
	r.wrote = true
	r.status = status
	// Later header changes must not show, as on a real connection.
	r.header = r.header.Clone()
}

func (r *recorder) Write(p []byte) (int, error) {
	if !r.wrote {
		r.WriteHeader(http.StatusOK)
	}
	return r.body.Write(p)
}

// NewClient returns a client logged in as Options.UserID and DeviceID with the access token,
// based at Options.HomeserverURL, sending through HandlerTransport(s). It logs nothing and never
// retries by itself (DefaultHTTPRetries 0), so every attempt shows in Requests.
func (s *Server) NewClient() *mautrix.Client {
	cli, err := mautrix.NewClient(s.opts.HomeserverURL, s.opts.UserID, s.opts.AccessToken)
	if err != nil {
		panic(fmt.Sprintf("slidingsynctest: new client: %v", err))
	}
	cli.DeviceID = s.opts.DeviceID
	// No Client.Timeout: callers bound requests with contexts, and a timeout would start a
	// timer goroutine per request.
	cli.Client = &http.Client{Transport: HandlerTransport(s)}
	cli.Log = zerolog.Nop()
	cli.DefaultHTTPRetries = 0
	return cli
}
