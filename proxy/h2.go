package proxy

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http2"
)

// The h2 transport (docs/tunnel.md): on the TCP tunnel port, ALPN "h2", one
// HTTP/2 CONNECT stream per agent connection with :authority
// "127.0.0.1:<port>", answered 200 (or 403, 502, 400: the tls transport's
// status bytes), then a full-duplex stream. golang.org/x/net/http2 speaks
// HTTP/2 on connections this package dials and accepts itself (its
// Transport.NewClientConn and Server.ServeConn), so verification stays in
// our tls.Configs.

// HTTP/2 sizing. Frames larger than TLS records (16 KiB) cost nothing extra
// and carry a whole splice write. Flow-control windows bound what one peer
// may have in flight towards us, which is also what we may have to buffer:
// per stream enough for a fast stream on a high-latency path; per
// connection what all its streams share, so it takes 32 streams whose local
// side stopped reading (each holding its full window) to slow the others.
// Data only sits in them while a local agent or target is slower than the
// network.
const (
	h2MaxFrame     = 64 << 10
	h2StreamWindow = 4 << 20
	h2ConnWindow   = 128 << 20
	// h2PingAfter and h2PingTimeout find a dead peer on an idle
	// connection: a PING after this much silence, closed when it is not
	// answered in time.
	h2PingAfter   = 30 * time.Second
	h2PingTimeout = 15 * time.Second
	// h2StreamFinish bounds how long a stream that ended cleanly waits for
	// x/net to send its END_STREAM before it is reset instead.
	h2StreamFinish = 5 * time.Second
)

// goawayHeader, on a 200 answer, asks the client to open no new streams on
// that connection: HTTP/2's GOAWAY would also refuse the streams the client
// has opened meanwhile, which then fail, so this proxy sends GOAWAY only
// when it closes a connection whose streams it has closed (Drain).
const goawayHeader = "Agentmesh-Goaway"

// connectHost is the host part of every CONNECT :authority: the target is
// always on the peer's own host (its Config.TargetHost); other hosts are
// refused, reserved for later versions.
const connectHost = "127.0.0.1"

// newH2Transport configures the client side of HTTP/2 for every outbound
// pooled connection. Its own pool and dialing are unused.
func newH2Transport() *http2.Transport {
	return &http2.Transport{
		DisableCompression: true,
		MaxReadFrameSize:   h2MaxFrame,
		ReadIdleTimeout:    h2PingAfter,
		PingTimeout:        h2PingTimeout,
	}
}

// dialH2 dials an outbound h2 connection: TCP, the TLS handshake with the
// h2 client configuration, then the server's first byte (its SETTINGS),
// which it sends only once it has accepted us; a refusal arrives as a TLS
// alert instead. Waiting for it is what makes the handshake record true.
func (p *Proxy) dialH2(ctx context.Context, s *setup, l *localTLS, peer Peer) (muxImpl, error) {
	raw, err := p.dialer.DialContext(ctx, "tcp", peer.Tunnel)
	if err != nil {
		reason := ReasonPeerUnreachable
		if ctx.Err() != nil {
			reason = ReasonShutdown
		}
		return nil, &refusal{reason: reason, err: fmt.Errorf("dial peer %s: %w", peer.Tunnel, err)}
	}
	s.peerAddr = raw.RemoteAddr().String()
	s.start = time.Now()
	stop := context.AfterFunc(ctx, func() { _ = raw.Close() })
	defer stop()
	_ = raw.SetDeadline(s.start.Add(p.cfg.HandshakeTimeout))
	cfg := l.client(p, peer.ID, TransportH2)
	tc := tls.Client(raw, cfg)
	fail := func(err error) (muxImpl, error) {
		_ = raw.Close()
		// As for tls: a session that led to a failure is not offered again.
		if cfg.ClientSessionCache != nil {
			cfg.ClientSessionCache.Put(raw.RemoteAddr().String(), nil)
		}
		return nil, err
	}
	err = tc.HandshakeContext(withSetup(ctx, s))
	s.fill(tc.ConnectionState(), l)
	if err != nil {
		return fail(err)
	}
	var first [1]byte
	if _, err := io.ReadFull(tc, first[:]); err != nil {
		return fail(fmt.Errorf("read peer settings: %w", err))
	}
	_ = raw.SetDeadline(time.Time{})
	h := &h2Client{}
	h.conn = &h2Conn{Conn: tc, prefix: first[:], closed: h.gone}
	if h.cc, err = p.h2t.NewClientConn(h.conn); err != nil {
		return fail(fmt.Errorf("start http2: %w", err))
	}
	return h, nil
}

// h2Conn is the TLS connection of an outbound h2 connection as x/net sees
// it: the byte dialH2 read comes first, and the close (x/net closes it when
// the connection ends, for whatever reason) is reported.
type h2Conn struct {
	*tls.Conn
	prefix    []byte // only x/net's read loop reads
	closeOnce sync.Once
	closed    func()
}

func (c *h2Conn) Read(b []byte) (int, error) {
	if len(c.prefix) > 0 {
		n := copy(b, c.prefix)
		c.prefix = c.prefix[n:]
		return n, nil
	}
	return c.Conn.Read(b)
}

func (c *h2Conn) Close() error {
	err := c.Conn.Close()
	c.closeOnce.Do(c.closed)
	return err
}

// h2Client is the muxImpl of an outbound h2 connection.
type h2Client struct {
	cc   *http2.ClientConn
	conn *h2Conn

	mu   sync.Mutex
	m    *muxConn // set by bind
	dead bool     // the connection is gone
}

func (h *h2Client) bind(m *muxConn) {
	h.mu.Lock()
	h.m = m
	dead := h.dead
	h.mu.Unlock()
	if dead {
		m.closed()
	}
}

// gone is called once the TLS connection is closed.
func (h *h2Client) gone() {
	h.mu.Lock()
	h.dead = true
	m := h.m
	h.mu.Unlock()
	if m != nil {
		m.closed()
	}
}

func (h *h2Client) goaway() {}

// close: by the time an outbound connection closes gracefully its streams
// have ended (muxCloseLinger), so both ways are the same.
func (h *h2Client) close(bool) { _ = h.cc.Close() }

func (h *h2Client) open(ctx context.Context, port uint16) (outStream, error) {
	// Nothing is sent until status, so a connection that has become
	// unusable since (a GOAWAY in flight) fails there instead, and the
	// stream with it.
	if !h.cc.CanTakeNewRequest() {
		return nil, errMuxUnusable
	}
	sctx, cancel := context.WithCancel(ctx)
	pr, pw := io.Pipe()
	body := &h2Body{PipeReader: pr, done: make(chan struct{})}
	authority := net.JoinHostPort(connectHost, strconv.Itoa(int(port)))
	req, err := http.NewRequestWithContext(sctx, http.MethodConnect, "http://"+authority, body)
	if err != nil {
		cancel()
		return nil, fmt.Errorf("connect request: %w", err)
	}
	req.ContentLength = -1
	// An empty User-Agent keeps x/net from adding its own.
	req.Header.Set("User-Agent", "")
	req.Header.Set(framingHeader, "1")
	return &h2ClientStream{cc: h.cc, conn: h.conn, req: req, cancel: cancel, pw: pw, body: body, retire: h.retire}, nil
}

// retire stops the pool from opening streams here: the server asked.
func (h *h2Client) retire() {
	h.mu.Lock()
	m := h.m
	h.mu.Unlock()
	if m != nil {
		m.retire()
	}
}

// h2Body is a CONNECT request's body: what the agent sends. x/net closes it
// once it has sent all of it and END_STREAM (or gave up).
type h2Body struct {
	*io.PipeReader
	once sync.Once
	done chan struct{}
}

func (b *h2Body) Close() error {
	err := b.PipeReader.Close()
	b.once.Do(func() { close(b.done) })
	return err
}

// h2ClientStream is an outbound CONNECT stream: writes go into the request
// body, reads come from the response body.
type h2ClientStream struct {
	cc     *http2.ClientConn
	conn   net.Conn // for its addresses
	req    *http.Request
	cancel context.CancelFunc // resets the stream
	pw     *io.PipeWriter
	body   *h2Body
	retire func()                        // the server sent goawayHeader
	resp   atomic.Pointer[http.Response] // set by status on 200
	in     io.Reader                     // resp.Body, unframed if the server frames it; set before resp

	readEOF   atomic.Bool
	wroteEOF  atomic.Bool
	closeOnce sync.Once
}

func (s *h2ClientStream) status(timeout time.Duration) (status, error) {
	t := time.AfterFunc(timeout, s.cancel)
	resp, err := s.cc.RoundTrip(s.req)
	if !t.Stop() {
		if err == nil {
			_ = resp.Body.Close()
		}
		return 0, fmt.Errorf("%w: no answer within %s", os.ErrDeadlineExceeded, timeout)
	}
	if err != nil {
		if s.req.Context().Err() != nil {
			return 0, err // shutdown
		}
		// The peer or the connection to it went away before answering.
		return 0, &refusal{reason: ReasonPeerClosed, err: err}
	}
	if resp.Header.Get(goawayHeader) != "" {
		s.retire()
	}
	if resp.StatusCode == http.StatusOK {
		s.in = resp.Body
		if resp.Header.Get(framingHeader) == "1" {
			s.in = &frameReader{r: resp.Body}
		}
		s.resp.Store(resp)
		return statusOK, nil
	}
	_ = resp.Body.Close()
	return statusFromHTTP(resp.StatusCode), nil
}

func (s *h2ClientStream) Read(b []byte) (int, error) {
	resp := s.resp.Load() //nolint:bodyclose // its body is s.in, which Close closes
	if resp == nil {
		return 0, net.ErrClosed // no copier reads before the status
	}
	n, err := s.in.Read(b)
	if errors.Is(err, io.EOF) {
		s.readEOF.Store(true)
	}
	return n, err
}

func (s *h2ClientStream) Write(b []byte) (int, error) {
	n, err := s.pw.Write(b)
	if err != nil {
		// x/net stopped taking the body: the server answered in full
		// and reset our side (RFC 9113 section 8.1), or the stream or
		// connection failed, which the response side reports too.
		return n, fmt.Errorf("%w: %w", errStopSending, err)
	}
	return n, nil
}

// CloseWrite ends the request body: END_STREAM after the bytes before it.
func (s *h2ClientStream) CloseWrite() error {
	s.wroteEOF.Store(true)
	return s.pw.Close()
}

// Close resets the stream, unless both directions ended cleanly: then it
// lets x/net finish sending our END_STREAM (behind our last bytes), which
// a reset could overtake.
func (s *h2ClientStream) Close() error {
	s.closeOnce.Do(func() {
		if s.readEOF.Load() && s.wroteEOF.Load() {
			t := time.NewTimer(h2StreamFinish)
			select {
			case <-s.body.done:
			case <-t.C:
			}
			t.Stop()
		} else {
			_ = s.pw.CloseWithError(net.ErrClosed)
			if resp := s.resp.Load(); resp != nil {
				_ = resp.Body.Close()
			}
		}
		s.cancel()
	})
	return nil
}

func (s *h2ClientStream) LocalAddr() net.Addr                { return s.conn.LocalAddr() }
func (s *h2ClientStream) RemoteAddr() net.Addr               { return s.conn.RemoteAddr() }
func (s *h2ClientStream) SetDeadline(t time.Time) error      { return errors.ErrUnsupported }
func (s *h2ClientStream) SetReadDeadline(t time.Time) error  { return errors.ErrUnsupported }
func (s *h2ClientStream) SetWriteDeadline(t time.Time) error { return errors.ErrUnsupported }

// statusFromHTTP maps a CONNECT response to the tunnel status it stands for;
// anything else is a bad request, as an unknown status byte is.
func statusFromHTTP(code int) status {
	switch code {
	case http.StatusOK:
		return statusOK
	case http.StatusForbidden:
		return statusNotAllowed
	case http.StatusBadGateway:
		return statusUnreachable
	default:
		return statusBadRequest
	}
}

// connectStatus is statusFromHTTP's inverse.
func connectStatus(s status) int {
	switch s {
	case statusOK:
		return http.StatusOK
	case statusNotAllowed:
		return http.StatusForbidden
	case statusUnreachable:
		return http.StatusBadGateway
	default:
		return http.StatusBadRequest
	}
}
