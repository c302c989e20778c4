package proxy

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/net/http2"
)

// The server side of the h2 transport (h2.go): one x/net http2 server per
// inbound connection, one handler run per CONNECT stream.

// newH2Server configures the server side of one inbound connection. Each
// connection gets its own, so that a GOAWAY (hs.Shutdown) reaches exactly
// that connection. countError receives x/net's name of each protocol error
// it handles itself (a stream past maxStreams: "over_max_streams").
func newH2Server(maxStreams int, countError func(string)) (*http2.Server, *http.Server, error) {
	h2s := &http2.Server{
		CountError:                   countError,
		MaxConcurrentStreams:         uint32(maxStreams), //nolint:gosec // validated: 0..65535
		MaxReadFrameSize:             h2MaxFrame,
		MaxUploadBufferPerConnection: h2ConnWindow,
		MaxUploadBufferPerStream:     h2StreamWindow,
		ReadIdleTimeout:              h2PingAfter,
		PingTimeout:                  h2PingTimeout,
	}
	hs := &http.Server{} //nolint:gosec // G112: never listens; ServeConn gets TLS connections past their handshake, and idle streams are capped by the ping timeouts above
	if err := http2.ConfigureServer(hs, h2s); err != nil {
		return nil, nil, fmt.Errorf("configure http2 server: %w", err)
	}
	return h2s, hs, nil
}

// serveH2 serves an inbound h2 connection whose handshake has succeeded: it
// records the handshake (transport h2), registers the pooled connection
// and serves its streams until it ends, then waits for them.
func (p *Proxy) serveH2(ctx context.Context, tc *tls.Conn, raw net.Conn, s *setup, peerID spiffeid.ID) {
	s.connID = newConnID()
	if err := p.record(ctx, s, "", nil); err != nil {
		return // the caller closes raw
	}
	_ = raw.SetDeadline(time.Time{}) // x/net keeps its own
	// m is set before x/net serves, hence before countError runs.
	var m *muxConn
	h2s, hs, err := newH2Server(p.cfg.PoolMaxStreams, func(errType string) {
		if strings.HasSuffix(errType, h2OverMaxStreams) {
			p.refusedOverMax(ctx, m)
		}
	})
	if err != nil {
		p.cfg.Logger.LogAttrs(ctx, slog.LevelError, "http2 server", slog.Any(keyErr, err))
		return
	}
	impl := &h2Server{raw: raw, hs: hs}
	m = p.newMux(impl, s, peerID)
	if m.register() == "" {
		h2s.ServeConn(tc, &http2.ServeConnOpts{
			Context:    ctx,
			BaseConfig: hs,
			Handler:    &h2Handler{p: p, ctx: ctx, m: m, srv: impl, conn: tc},
		})
	}
	// x/net returns without waiting for its handlers; they all end now
	// that the connection is gone.
	m.close(false)
	m.waitStreams()
	m.closed()
}

// h2Server is the muxImpl of an inbound h2 connection.
type h2Server struct {
	raw       net.Conn
	hs        *http.Server
	shutdown  sync.Once
	goingAway atomic.Bool // answers carry goawayHeader
}

func (h *h2Server) bind(*muxConn) {}

func (h *h2Server) open(context.Context, uint16) (outStream, error) {
	return nil, errMuxUnusable
}

// goaway asks the client, on the answer to its next stream, to open no new
// streams here (goawayHeader); that stream, and any it opens before it reads
// the answer, are served.
func (h *h2Server) goaway() { h.goingAway.Store(true) }

// close ends the connection: graceful sends GOAWAY, and x/net closes the
// connection once the streams still open are done.
func (h *h2Server) close(graceful bool) {
	if !graceful {
		_ = h.raw.Close()
		return
	}
	h.shutdown.Do(func() {
		// With no connection tracked by hs itself, Shutdown only starts
		// the HTTP/2 graceful shutdown and returns.
		_ = h.hs.Shutdown(context.Background())
	})
}

// h2Handler serves the streams of one inbound h2 connection.
type h2Handler struct {
	p    *Proxy
	ctx  context.Context // Run's: shutdown ends the streams
	m    *muxConn
	srv  *h2Server
	conn net.Conn
}

func (h *h2Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	st := &h2ServerStream{w: w, rc: http.NewResponseController(w), body: r.Body, conn: h.conn, srv: h.srv,
		framed: r.Header.Get(framingHeader) == "1"}
	defer st.detach()
	if !h.m.acquire() {
		_ = st.Close() // closing: reset
		return
	}
	defer h.m.release()
	port, perr := connectPort(r)
	h.p.serveStream(h.ctx, h.m, st, port, perr)
}

// connectPort reads the target port of a CONNECT request to
// "127.0.0.1:<port>". Errors wrap ErrBadHeader.
func connectPort(r *http.Request) (uint16, error) {
	if r.Method != http.MethodConnect {
		return 0, fmt.Errorf("%w: method %s, want CONNECT", ErrBadHeader, r.Method)
	}
	host, portStr, err := net.SplitHostPort(r.Host)
	if err != nil || host != connectHost {
		return 0, fmt.Errorf("%w: authority %q, want %s:<port>", ErrBadHeader, r.Host, connectHost)
	}
	port, err := strconv.ParseUint(portStr, 10, 16)
	if err != nil || port == 0 {
		return 0, fmt.Errorf("%w: authority %q: bad port", ErrBadHeader, r.Host)
	}
	return uint16(port), nil
}

// h2ServerStream is an inbound CONNECT stream: reads come from the request
// body, writes go to the response, flushed each time.
//
// HTTP/2 in x/net ends a response only when its handler returns, and then
// resets a request the client is still sending (RFC 9113 section 8.1). So
// the target's half-close is an empty frame on a framed response
// (h2frame.go), after which the handler keeps reading until the agent's
// END_STREAM. On an unframed response (a client that did not ask) it ends
// the stream both ways: CloseWrite stops the reading side, which ends the
// splice and the handler; what the agent sends after that is discarded.
type h2ServerStream struct {
	w      http.ResponseWriter
	rc     *http.ResponseController
	body   io.ReadCloser
	conn   net.Conn // for its addresses
	srv    *h2Server
	framed bool // the client asked for framingHeader

	readEOF  atomic.Bool
	wroteEOF atomic.Bool

	mu       sync.Mutex
	detached bool // the handler returned: w is not ours any more
	reset    bool
}

func (s *h2ServerStream) answer(st status) error {
	if s.srv.goingAway.Load() {
		s.w.Header().Set(goawayHeader, "1")
	}
	if s.framed && st == statusOK {
		s.w.Header().Set(framingHeader, "1")
	}
	s.w.WriteHeader(connectStatus(st))
	return s.rc.Flush()
}

func (s *h2ServerStream) Read(b []byte) (int, error) {
	n, err := s.body.Read(b)
	switch {
	case errors.Is(err, io.EOF):
		s.readEOF.Store(true)
	case err != nil && s.wroteEOF.Load() && !s.framed:
		// CloseWrite closed the body: this direction ends too.
		s.readEOF.Store(true)
		err = io.EOF
	}
	return n, err
}

func (s *h2ServerStream) Write(b []byte) (int, error) {
	if s.framed && len(b) > 0 {
		var hdr [frameHeaderLen]byte
		putFrameHeader(hdr[:], len(b))
		if _, err := s.w.Write(hdr[:]); err != nil {
			return 0, err
		}
	}
	return s.flushed(s.w.Write(b))
}

// writeFrame is Write without the copy of b behind a header (framedWriter).
func (s *h2ServerStream) writeFrame(frame []byte) (int, error) {
	if !s.framed {
		return s.Write(frame[frameHeaderLen:])
	}
	putFrameHeader(frame, len(frame)-frameHeaderLen)
	n, err := s.flushed(s.w.Write(frame))
	return max(n-frameHeaderLen, 0), err
}

func (s *h2ServerStream) flushed(n int, err error) (int, error) {
	if err == nil {
		err = s.rc.Flush()
	}
	return n, err
}

// CloseWrite ends the response: the empty frame on a framed one, the
// whole stream (once the handler returns) on a raw one.
func (s *h2ServerStream) CloseWrite() error {
	s.wroteEOF.Store(true)
	if s.framed {
		var end [frameHeaderLen]byte
		_, err := s.flushed(s.w.Write(end[:]))
		return err
	}
	return s.body.Close()
}

// Close resets the stream unless both directions have ended: then the
// handler's return ends it cleanly.
func (s *h2ServerStream) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.detached || s.reset || (s.readEOF.Load() && s.wroteEOF.Load()) {
		return nil
	}
	s.reset = true
	// A write deadline in the past makes x/net reset the stream at once,
	// which also ends a Write waiting for flow control; closing the body
	// ends a Read.
	_ = s.rc.SetWriteDeadline(time.Unix(1, 0))
	return s.body.Close()
}

func (s *h2ServerStream) detach() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.detached = true
}

func (s *h2ServerStream) LocalAddr() net.Addr                { return s.conn.LocalAddr() }
func (s *h2ServerStream) RemoteAddr() net.Addr               { return s.conn.RemoteAddr() }
func (s *h2ServerStream) SetDeadline(t time.Time) error      { return errors.ErrUnsupported }
func (s *h2ServerStream) SetReadDeadline(t time.Time) error  { return errors.ErrUnsupported }
func (s *h2ServerStream) SetWriteDeadline(t time.Time) error { return errors.ErrUnsupported }
