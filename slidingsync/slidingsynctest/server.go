package slidingsynctest

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"sync"
	"time"

	"maunium.net/go/mautrix"
	"maunium.net/go/mautrix/id"

	"github.com/sliding-e2ee/sdk/slidingsync"
)

// Defaults for the zero values of Options (documented there; Server.Options returns them).
const (
	defaultUserID        id.UserID   = "@bot:example.org"
	defaultDeviceID      id.DeviceID = "BOTDEVICE"
	defaultAccessToken               = "token"
	defaultHomeserverURL             = "https://slidingsynctest.invalid"
)

// msc3575Timeout is the long-poll time of an MSC3575 request without a timeout parameter:
// the proxy waits 10 s even on a connection's first request.
const msc3575Timeout = 10 * time.Second

// Paths of the discovery endpoints the server answers, and what they advertise.
const (
	versionsPath      = "/_matrix/client/versions"
	wellKnownPath     = "/.well-known/matrix/client"
	simplifiedFeature = "org.matrix.simplified_msc3575" // in /versions' unstable_features
	wellKnownProxyKey = "org.matrix.msc3575.proxy"      // in .well-known, names an MSC3575 proxy
)

// Options configures a Server. Zero values are usable.
type Options struct {
	// Protocol is the dialect served; zero means slidingsync.ProtocolMSC4186. Only its sync
	// path is served.
	Protocol slidingsync.Protocol
	// UserID is who NewClient logs in as; default "@bot:example.org".
	UserID id.UserID
	// DeviceID is the device NewClient logs in as; default "BOTDEVICE".
	DeviceID id.DeviceID
	// AccessToken is the only token accepted; default "token". A sync request
	// without "Authorization: Bearer <token>" gets 401 M_UNKNOWN_TOKEN, as does a /versions
	// request carrying a different token (Synapse checks a token when one is sent).
	AccessToken string
	// ProxyURL, if set, is named by /.well-known/matrix/client under
	// "org.matrix.msc3575.proxy": {"url": ...}.
	ProxyURL string
	// AdvertiseSimplified says whether /versions lists the unstable feature
	// org.matrix.simplified_msc3575. Nil means true iff Protocol is MSC4186.
	AdvertiseSimplified *bool
	// HomeserverURL is the base URL NewClient uses and .well-known names as m.homeserver;
	// default "https://slidingsynctest.invalid". The server ignores hosts, so any URL
	// reaches it.
	HomeserverURL string
	// Personality is how the server behaves beyond the dialect; zero means PersonalityAuto:
	// PersonalitySynapse on MSC4186, PersonalityPolite on MSC3575 and v4. Set
	// PersonalityPolite for a test that needs every answer to carry a fresh pos or a server
	// that accepts any pos and any list.
	Personality Personality
}

// RecordedRequest is one request to the sync path, as the server received it.
type RecordedRequest struct {
	// Method is the HTTP method; only POST is served.
	Method string
	// Host is the request's host, which shows whether a client used a proxy URL.
	Host string
	// Path is the URL path.
	Path string
	// Query is the parsed query string.
	Query url.Values
	// Header holds the request headers, the access token included.
	Header http.Header
	// Body is the raw request body.
	Body []byte
	// Parsed is slidingsync.DecodeRequest(Query, Body); nil if that failed. It must not be
	// modified.
	Parsed *slidingsync.Request
	// ParseErr is why Parsed is nil.
	ParseErr error
	// Timeout is the long-poll time the server read for the request's dialect.
	Timeout time.Duration
	// Received is when the request arrived (fake time inside a synctest bubble).
	Received time.Time
	// Answered is false if the request was cancelled before an answer was written.
	Answered bool
	// Status is the HTTP status of the answer, 0 if not answered.
	Status int
	// AnsweredAt is when the answer was handed over (fake time inside a synctest bubble),
	// zero if not answered. The gap to the next request's Received is the time the client
	// took before asking again.
	AnsweredAt time.Time
	// AnswerPos is the pos of a 200 answer, empty for other answers.
	AnswerPos string
}

// Server is a fake sliding sync server that answers sync requests from a script. It is safe
// for concurrent use. See the package documentation for its guarantees.
type Server struct {
	opts      Options
	advertise bool
	synapse   bool // PersonalitySynapse is in effect

	mu          sync.Mutex
	queue       []*item
	waiters     []*waiter // requests long-polling on an empty queue, oldest first
	lastPos     uint64
	closed      bool
	reqs        []RecordedRequest
	watchers    []chan struct{} // WaitRequests calls to wake on the next arrival
	inFlight    int
	maxInFlight int
	responder   func(req *slidingsync.Request) *slidingsync.Response // SetResponder

	// State of the Synapse personality.
	issued       map[string]map[string]bool // pos → conn_ids it was served on
	expired      map[string]bool            // positions forgotten by ExpirePositions
	e2ee         E2EEState                  // what computed answers report about the keys
	lists        map[string]knownList       // lists as last served, by name
	toDeviceNext string                     // the last to-device next_batch served
}

// item is one scripted answer.
type item struct {
	status int
	body   []byte
	// fields is set for a Push whose response had no pos: the pos is added when the item is
	// served, so positions follow the order in which answers go out.
	fields map[string]json.RawMessage
	// pos is the explicit pos of a pushed response, kept so assigned ones never repeat it.
	pos string
	// keepPos serves fields with the pos of the request answered (PushIdle with a response).
	keepPos bool
	// idle is computed when served: the answer to a long-poll that ran out (PushIdle).
	idle bool
}

// waiter is a request long-polling on an empty queue. Push hands it an item, Close wakes it.
// Both happen under Server.mu and close ready.
type waiter struct {
	ready  chan struct{}
	item   *item
	closed bool
}

// NewServer returns a server with an empty script. It panics on an unknown protocol or
// personality, PersonalitySynapse with another dialect than MSC4186, or an invalid
// HomeserverURL, which are mistakes in the test itself.
func NewServer(opts Options) *Server {
	if opts.Protocol == slidingsync.ProtocolAuto {
		opts.Protocol = slidingsync.ProtocolMSC4186
	}
	if opts.Protocol.Path() == "" {
		panic(fmt.Sprintf("slidingsynctest: unknown protocol %q", opts.Protocol))
	}
	switch opts.Personality {
	case PersonalityAuto:
		opts.Personality = PersonalityPolite
		if opts.Protocol == slidingsync.ProtocolMSC4186 {
			opts.Personality = PersonalitySynapse
		}
	case PersonalityPolite:
	case PersonalitySynapse:
		if opts.Protocol != slidingsync.ProtocolMSC4186 {
			panic(fmt.Sprintf("slidingsynctest: the Synapse personality speaks MSC4186, not %s", opts.Protocol))
		}
	default:
		panic(fmt.Sprintf("slidingsynctest: unknown personality %q", opts.Personality))
	}
	if opts.UserID == "" {
		opts.UserID = defaultUserID
	}
	if opts.DeviceID == "" {
		opts.DeviceID = defaultDeviceID
	}
	if opts.AccessToken == "" {
		opts.AccessToken = defaultAccessToken
	}
	if opts.HomeserverURL == "" {
		opts.HomeserverURL = defaultHomeserverURL
	}
	if u, err := url.Parse(opts.HomeserverURL); err != nil || u.Scheme == "" || u.Host == "" {
		panic(fmt.Sprintf("slidingsynctest: invalid HomeserverURL %q", opts.HomeserverURL))
	}
	advertise := opts.Protocol == slidingsync.ProtocolMSC4186
	if opts.AdvertiseSimplified != nil {
		advertise = *opts.AdvertiseSimplified
	}
	return &Server{
		opts:      opts,
		advertise: advertise,
		synapse:   opts.Personality == PersonalitySynapse,
		issued:    map[string]map[string]bool{},
		expired:   map[string]bool{},
		lists:     map[string]knownList{},
	}
}

// Options returns the options in effect, with defaults filled in.
func (s *Server) Options() Options { return s.opts }

// Push queues a 200 response. If resp.Pos is empty the server assigns the next pos when the
// response is served: "1", "2", ... from a per-server counter shared with empty long-poll
// answers. A numeric explicit pos moves the counter forward so an assigned pos never repeats
// it. A nil resp queues a response with only a pos. resp is encoded at once, so changing it
// afterwards has no effect; Push panics if it cannot be encoded. The response is not
// validated, so a test can serve one that a client must reject.
func (s *Server) Push(resp *slidingsync.Response) {
	s.enqueue(itemFor(resp))
}

func itemFor(resp *slidingsync.Response) *item {
	if resp == nil {
		resp = &slidingsync.Response{}
	}
	raw, err := json.Marshal(resp)
	if err != nil {
		panic(fmt.Sprintf("slidingsynctest: encode response: %v", err))
	}
	it := &item{status: http.StatusOK, body: raw, pos: resp.Pos}
	if resp.Pos == "" {
		if err := json.Unmarshal(raw, &it.fields); err != nil {
			panic(fmt.Sprintf("slidingsynctest: encode response: %v", err))
		}
		delete(it.fields, "pos")
	}
	return it
}

// SetResponder installs a responder, fn (nil removes it): it computes an answer from a
// request when nothing is queued (queued answers still go first), which turns the scripted
// server into a small dynamic one (the demo homeserver honours ranges this way). It returns
// nil to fall back to the long-poll. It is called with the server's lock held, so it must not
// call the Server's methods; Push from another goroutine to wake a long-poll. A response
// without pos gets a fresh one. Under the Synapse personality the answer is shaped as
// Synapse's encoder would send it (see the package documentation), and a responder with
// nothing new sets Pos to req.Pos, as Synapse keeps the pos then.
func (s *Server) SetResponder(fn func(req *slidingsync.Request) *slidingsync.Response) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.responder = fn
}

// PushJSON queues a raw body served verbatim with the given status, for malformed bodies,
// arbitrary shapes and 200s with bad JSON. The Content-Type is application/json.
func (s *Server) PushJSON(status int, body string) {
	s.enqueue(&item{status: status, body: []byte(body)})
}

// PushError queues a Matrix error with e.StatusCode (zero means 500) and the body
// {"errcode": e.ErrCode, "error": e.Err} plus e.ExtraData, as mautrix's sentinels build it:
// for example slidingsync.MUnknownPos.WithMessage("Unknown position") for a pos the server
// has forgotten, or mautrix.MLimitExceeded.WithExtraField("retry_after_ms", 1500). An empty
// ErrCode is left out, as some servers do. ErrCode and Err win over the same keys in
// ExtraData. It panics if ExtraData cannot be encoded.
func (s *Server) PushError(e mautrix.RespError) {
	status := e.StatusCode
	if status == 0 {
		status = http.StatusInternalServerError
	}
	s.enqueue(&item{status: status, body: errorBody(e.ErrCode, e.Err, e.ExtraData)})
}

// Pending returns how many scripted answers are queued and not yet served.
func (s *Server) Pending() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.queue)
}

func (s *Server) enqueue(it *item) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.queue = append(s.queue, it)
	s.dispatch()
}

// dispatch hands queued items to waiting requests, oldest first. Caller holds s.mu.
func (s *Server) dispatch() {
	for len(s.queue) > 0 && len(s.waiters) > 0 && !s.closed {
		w := s.waiters[0]
		s.waiters = s.waiters[1:]
		w.item = s.queue[0]
		s.queue = s.queue[1:]
		close(w.ready)
	}
}

// Requests returns a copy of the recorded sync requests, in arrival order.
func (s *Server) Requests() []RecordedRequest {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.copyRequests()
}

func (s *Server) copyRequests() []RecordedRequest {
	out := make([]RecordedRequest, len(s.reqs))
	for i, r := range s.reqs {
		r.Query = maps.Clone(r.Query)
		r.Header = r.Header.Clone()
		r.Body = bytes.Clone(r.Body)
		out[i] = r
	}
	return out
}

// WaitRequests blocks until at least n sync requests have arrived and returns them all. If
// ctx ends first it returns those that arrived so far with ctx's error.
func (s *Server) WaitRequests(ctx context.Context, n int) ([]RecordedRequest, error) {
	for {
		s.mu.Lock()
		if len(s.reqs) >= n {
			out := s.copyRequests()
			s.mu.Unlock()
			return out, nil
		}
		// Made here, not in NewServer, so that it belongs to the caller's synctest bubble.
		ch := make(chan struct{})
		s.watchers = append(s.watchers, ch)
		s.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			s.mu.Lock()
			s.watchers = slices.DeleteFunc(s.watchers, func(c chan struct{}) bool { return c == ch })
			out := s.copyRequests()
			s.mu.Unlock()
			return out, ctx.Err()
		}
	}
}

// InFlight returns how many sync requests are being handled: arrived, not yet answered or
// cancelled.
func (s *Server) InFlight() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.inFlight
}

// MaxInFlight returns the highest InFlight ever observed.
func (s *Server) MaxInFlight() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.maxInFlight
}

// Close answers every waiting request with 503 and makes the server answer every later sync
// request with 503. Queued items stay unserved. Close is idempotent.
func (s *Server) Close() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return
	}
	s.closed = true
	for _, w := range s.waiters {
		w.closed = true
		close(w.ready)
	}
	s.waiters = nil
}

// ServeHTTP serves the sync path of the configured protocol, GET /_matrix/client/versions
// and GET /.well-known/matrix/client. Other paths get 404 M_UNRECOGNIZED.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	switch r.URL.Path {
	case s.opts.Protocol.Path():
		s.serveSync(w, r)
	case versionsPath:
		s.serveVersions(w, r)
	case wellKnownPath:
		s.serveWellKnown(w, r)
	default:
		writeJSON(w, http.StatusNotFound, errorBody("M_UNRECOGNIZED", "Unrecognized request", nil))
	}
}

func (s *Server) serveVersions(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		writeJSON(w, http.StatusMethodNotAllowed, errorBody("M_UNRECOGNIZED", "Unrecognized request", nil))
		return
	}
	if r.Header.Get("Authorization") != "" && !s.authorized(r) {
		writeJSON(w, http.StatusUnauthorized, errorBody("M_UNKNOWN_TOKEN", "Invalid access token passed.", nil))
		return
	}
	features := map[string]bool{}
	if s.advertise {
		features[simplifiedFeature] = true
	}
	writeJSON(w, http.StatusOK, mustJSON(map[string]any{
		"versions":          []string{"v1.1", "v1.2", "v1.3", "v1.4", "v1.5", "v1.6", "v1.7", "v1.8", "v1.9", "v1.10", "v1.11", "v1.12"},
		"unstable_features": features,
	}))
}

func (s *Server) serveWellKnown(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		writeJSON(w, http.StatusMethodNotAllowed, errorBody("M_UNRECOGNIZED", "Unrecognized request", nil))
		return
	}
	body := map[string]any{"m.homeserver": map[string]string{"base_url": s.opts.HomeserverURL}}
	if s.opts.ProxyURL != "" {
		body[wellKnownProxyKey] = map[string]string{"url": s.opts.ProxyURL}
	}
	writeJSON(w, http.StatusOK, mustJSON(body))
}

func (s *Server) authorized(r *http.Request) bool {
	return r.Header.Get("Authorization") == "Bearer "+s.opts.AccessToken
}

func (s *Server) serveSync(w http.ResponseWriter, r *http.Request) {
	body, readErr := io.ReadAll(r.Body)
	rec := RecordedRequest{
		Method:   r.Method,
		Host:     r.Host,
		Path:     r.URL.Path,
		Query:    r.URL.Query(),
		Header:   r.Header.Clone(),
		Body:     body,
		Received: time.Now(),
	}
	if readErr != nil {
		rec.ParseErr = readErr
	} else {
		rec.Parsed, rec.ParseErr = slidingsync.DecodeRequest(rec.Query, body)
	}
	timeout, timeoutErr := s.requestTimeout(rec.Query, body)
	rec.Timeout = timeout

	var status int
	var out []byte
	switch {
	case r.Method != http.MethodPost:
		status, out = http.StatusMethodNotAllowed, errorBody("M_UNRECOGNIZED", "Unrecognized request", nil)
	case !s.authorized(r):
		status, out = http.StatusUnauthorized, errorBody("M_UNKNOWN_TOKEN", "Invalid access token passed.", nil)
	case readErr != nil:
		status, out = http.StatusBadRequest, errorBody("M_BAD_JSON", readErr.Error(), nil)
	case timeoutErr != nil:
		status, out = http.StatusBadRequest, errorBody("M_INVALID_PARAM", timeoutErr.Error(), nil)
	case s.synapse:
		// Checked below, with the positions the server issued.
	default:
		// Only the body decides: a v4 server ignores the query, which DecodeRequest reads.
		if _, err := slidingsync.DecodeRequest(nil, body); err != nil {
			status, out = http.StatusBadRequest, errorBody("M_BAD_JSON", err.Error(), nil)
		}
	}

	s.mu.Lock()
	idx := len(s.reqs)
	s.reqs = append(s.reqs, rec)
	for _, ch := range s.watchers {
		close(ch)
	}
	s.watchers = nil
	s.inFlight++
	s.maxInFlight = max(s.maxInFlight, s.inFlight)
	if status == 0 && s.closed {
		status, out = closedAnswer()
	}
	if status == 0 && s.synapse {
		status, out = s.synapseRefusal(&s.reqs[idx])
	}
	if status != 0 {
		s.finish(idx, status, out)
		s.mu.Unlock()
		writeJSON(w, status, out)
		return
	}
	status, out, ok := s.answer(r.Context(), idx, timeout)
	if ok {
		writeJSON(w, status, out)
	}
}

// answer picks the scripted answer for request idx, long-polling up to timeout on an empty
// queue. It is entered with s.mu held and returns with it released. ok is false when the
// request was cancelled: nothing may be written then, and no item was consumed.
func (s *Server) answer(ctx context.Context, idx int, timeout time.Duration) (status int, out []byte, ok bool) {
	if ctx.Err() != nil {
		s.abandon()
		s.mu.Unlock()
		return 0, nil, false
	}
	if len(s.queue) > 0 {
		it := s.queue[0]
		s.queue = s.queue[1:]
		status, out = s.render(it, idx)
		s.finish(idx, status, out)
		s.mu.Unlock()
		return status, out, true
	}
	if s.responder != nil && s.reqs[idx].Parsed != nil {
		if resp := s.responder(s.reqs[idx].Parsed); resp != nil {
			it := itemFor(resp)
			if s.synapse {
				it = &item{status: http.StatusOK, fields: s.shapeResponse(resp, readSynapseRequest(&s.reqs[idx])), pos: resp.Pos}
			}
			status, out = s.render(it, idx)
			s.finish(idx, status, out)
			s.mu.Unlock()
			return status, out, true
		}
	}
	if timeout <= 0 {
		status, out = http.StatusOK, s.emptyResponse(idx)
		s.finish(idx, status, out)
		s.mu.Unlock()
		return status, out, true
	}
	// Made by the request's goroutine so that it belongs to the caller's synctest bubble.
	w := &waiter{ready: make(chan struct{})}
	s.waiters = append(s.waiters, w)
	s.mu.Unlock()

	timer := time.NewTimer(timeout)
	defer timer.Stop()
	select {
	case <-w.ready:
	case <-timer.C:
	case <-ctx.Done():
	}

	s.mu.Lock()
	defer s.mu.Unlock()
	if w.item == nil && !w.closed {
		s.waiters = slices.DeleteFunc(s.waiters, func(o *waiter) bool { return o == w })
	}
	if ctx.Err() != nil {
		// Cancelled, even if an item arrived at the same moment: give it back, first in line.
		if w.item != nil {
			s.queue = slices.Insert(s.queue, 0, w.item)
			s.dispatch()
		}
		s.abandon()
		return 0, nil, false
	}
	switch {
	case w.item != nil:
		status, out = s.render(w.item, idx)
	case w.closed:
		status, out = closedAnswer()
	default:
		status, out = http.StatusOK, s.emptyResponse(idx)
	}
	s.finish(idx, status, out)
	return status, out, true
}

// finish marks request idx answered with body. It runs before the answer is written so that
// a client that sends its next request as soon as it reads this answer never sees two in
// flight. Caller holds s.mu.
func (s *Server) finish(idx, status int, body []byte) {
	rec := &s.reqs[idx]
	rec.Answered = true
	rec.Status = status
	rec.AnsweredAt = time.Now()
	if status == http.StatusOK {
		var p struct {
			Pos string `json:"pos"`
		}
		if json.Unmarshal(body, &p) == nil {
			rec.AnswerPos = p.Pos
		}
	}
	s.inFlight--
}

// abandon records that a request was cancelled: it stays recorded, unanswered. Caller holds
// s.mu.
func (s *Server) abandon() {
	s.inFlight--
}

// render returns an item's status and body as the answer to request idx, assigning a pos if
// it needs one. Caller holds s.mu.
func (s *Server) render(it *item, idx int) (int, []byte) {
	if it.idle {
		return http.StatusOK, s.emptyResponse(idx)
	}
	out := it.body
	if it.fields == nil {
		if it.pos != "" {
			s.notePos(it.pos)
		}
	} else {
		fields := maps.Clone(it.fields)
		pos := it.pos
		switch {
		case pos != "":
			s.notePos(pos)
		case it.keepPos:
			if pos = s.requestPos(idx); pos == "" {
				pos = s.nextPos()
			}
		default:
			pos = s.nextPos()
		}
		fields["pos"] = mustJSON(pos)
		out = mustJSON(fields)
	}
	if s.synapse && it.status == http.StatusOK {
		s.learn(readSynapseRequest(&s.reqs[idx]), out, true)
	}
	return it.status, out
}

// emptyResponse is the answer computed when nothing happened (an idle long-poll). Caller
// holds s.mu.
func (s *Server) emptyResponse(idx int) []byte {
	if !s.synapse {
		return mustJSON(map[string]string{"pos": s.nextPos()})
	}
	sr := readSynapseRequest(&s.reqs[idx])
	out := s.idleAnswer(sr)
	s.learn(sr, out, false)
	return out
}

// requestPos returns the pos request idx carries where its dialect puts it. Caller holds
// s.mu.
func (s *Server) requestPos(idx int) string {
	rec := &s.reqs[idx]
	if s.opts.Protocol != slidingsync.ProtocolV4 {
		return rec.Query.Get("pos")
	}
	if rec.Parsed != nil {
		return rec.Parsed.Pos
	}
	return ""
}

// nextPos returns a fresh pos. Caller holds s.mu.
func (s *Server) nextPos() string {
	s.lastPos++
	return strconv.FormatUint(s.lastPos, 10)
}

// notePos moves the counter past an explicit numeric pos. Caller holds s.mu.
func (s *Server) notePos(pos string) {
	if n, err := strconv.ParseUint(pos, 10, 64); err == nil && n > s.lastPos {
		s.lastPos = n
	}
}

// requestTimeout reads the long-poll time where the dialect carries it. Absent means 0,
// except on MSC3575 where the proxy defaults to 10 s.
func (s *Server) requestTimeout(query url.Values, body []byte) (time.Duration, error) {
	var ms int64
	if s.opts.Protocol != slidingsync.ProtocolV4 {
		raw := query.Get("timeout")
		if raw == "" {
			if s.opts.Protocol == slidingsync.ProtocolMSC3575 {
				return msc3575Timeout, nil
			}
			return 0, nil
		}
		var err error
		if ms, err = strconv.ParseInt(raw, 10, 64); err != nil {
			return 0, fmt.Errorf("invalid timeout %q", raw)
		}
	} else {
		var w struct {
			Timeout *int64 `json:"timeout"`
		}
		if len(body) == 0 || json.Unmarshal(body, &w) != nil || w.Timeout == nil {
			// A bad body is reported by the caller.
			return 0, nil
		}
		ms = *w.Timeout
	}
	if ms < 0 {
		ms = 0
	}
	return time.Duration(ms) * time.Millisecond, nil
}

func closedAnswer() (int, []byte) {
	return http.StatusServiceUnavailable, errorBody("M_UNKNOWN", "Server closed", nil)
}

func errorBody(errcode, msg string, extra map[string]any) []byte {
	body := make(map[string]any, len(extra)+2)
	maps.Copy(body, extra)
	if errcode != "" {
		body["errcode"] = errcode
	} else {
		delete(body, "errcode")
	}
	body["error"] = msg
	return mustJSON(body)
}

func mustJSON(v any) []byte {
	raw, err := json.Marshal(v)
	if err != nil {
		panic(fmt.Sprintf("slidingsynctest: encode JSON: %v", err))
	}
	return raw
}

func writeJSON(w http.ResponseWriter, status int, body []byte) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(status)
	_, _ = w.Write(body)
}
