package proxy

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/quic-go/quic-go"
	"github.com/quic-go/quic-go/qlog"
	"github.com/quic-go/quic-go/qlogwriter"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// The quic transport (docs/tunnel.md): quic-go on the UDP port with the
// tunnel port's number, ALPN "agentmesh-quic/1", TLS 1.3 with the same
// certificates and VerifyConnection as the TCP port, 0-RTT off. Each agent
// connection is one bidirectional stream that starts exactly like a tls
// tunnel: the 8-byte header, then the status byte. Once it has accepted a
// connection the server opens one unidirectional control stream and writes
// quicReady; later it may write quicGoaway there.

// QUIC sizing: flow-control windows start at quic-go's defaults and may grow
// (quic-go auto-tunes them) up to these bounds, which cap what one peer can
// have in flight towards us on one stream and one connection; as for h2
// (h2StreamWindow), 32 stalled streams are needed to slow the others.
const (
	quicStreamWindow = 4 << 20
	quicConnWindow   = 128 << 20
	// quicIdleTimeout closes a connection that has heard nothing from its
	// peer for this long; the dialing side sends keep-alives well within
	// it, so only a vanished peer hits it.
	quicIdleTimeout = time.Minute
	quicKeepAlive   = 15 * time.Second
)

// Control stream messages (server to client).
const (
	quicReady  byte = 0x00 // the connection is accepted: open streams
	quicGoaway byte = 0x01 // open no new streams here; the open ones go on
)

// QUIC error codes this package sends.
const (
	quicCloseNoError quic.ApplicationErrorCode = 0x0 // no longer needed: idle, retired, drained
	quicCloseRevoked quic.ApplicationErrorCode = 0x1 // closed at once: a credential denied, shutdown, a failed setup
	quicStreamClosed quic.StreamErrorCode      = 0x1 // the stream was closed (CloseWhere, drain, ...)
	quicStreamRefuse quic.StreamErrorCode      = 0x2 // the stream was refused: its payload is discarded
)

// listenQUIC opens the UDP socket of the quic transport on tunnelAddr's
// host and port, with the Mark, and starts quic-go on it.
func (p *Proxy) listenQUIC(tunnelAddr net.Addr) error {
	host, _, err := net.SplitHostPort(p.cfg.TunnelListen)
	if err != nil {
		return err
	}
	lc := net.ListenConfig{}
	if p.cfg.Mark != 0 {
		lc.Control = markControl(p.cfg.Mark)
	}
	addr := net.JoinHostPort(host, strconv.Itoa(int(addrPortOf(tunnelAddr).Port())))
	if p.udp, err = lc.ListenPacket(context.Background(), "udp", addr); err != nil {
		return fmt.Errorf("listen udp %s: %w", addr, err)
	}
	if n := p.cfg.QUICKeyUpdateInterval; n > 0 {
		quicSetKeyUpdateInterval(n)
	}
	p.quicJunk = &junkTrace{p: p}
	p.quicTr = &quic.Transport{
		Conn:        p.udp,
		ConnContext: p.quicConnContext,
		Tracer:      p.quicJunk,
		// Every peer speaks QUIC v1. Answering other versions would send
		// packets to unauthenticated, spoofable sources, and quic-go drops
		// what overflows its answer queue without telling (quicjunk.go).
		DisableVersionNegotiationPackets: true,
	}
	trace := &keyUpdateTrace{p: p}
	tracer := func(ctx context.Context, isClient bool, _ quic.ConnectionID) qlogwriter.Trace {
		if !isClient {
			p.watchQUICHandshake(ctx)
		}
		if p.cfg.DisableQUICKeyUpdateCount {
			return nil // no trace: quic-go then describes no packet
		}
		return trace
	}
	base := quic.Config{
		// quic-go aborts a handshake after twice this without completion.
		HandshakeIdleTimeout:       p.cfg.HandshakeTimeout / 2,
		MaxIdleTimeout:             quicIdleTimeout,
		MaxStreamReceiveWindow:     quicStreamWindow,
		MaxConnectionReceiveWindow: quicConnWindow,
		Tracer:                     tracer,
	}
	server := base
	server.MaxIncomingStreams = int64(p.cfg.PoolMaxStreams)
	server.MaxIncomingUniStreams = -1 // the client opens none
	server.Allow0RTT = false          // replayable data would bypass the per-stream checks' freshness
	client := base
	client.MaxIncomingStreams = -1 // streams are the client's to open
	client.MaxIncomingUniStreams = 1
	client.KeepAlivePeriod = quicKeepAlive
	p.quicClient = &client
	// Each connection gets the configuration of the certificate current
	// when its ClientHello arrives (GetConfigForClient).
	if p.quicLn, err = p.quicTr.Listen(&tls.Config{
		MinVersion:         tls.VersionTLS13,
		NextProtos:         []string{ALPNQUIC},
		GetConfigForClient: p.quicServerConfig,
	}, &server); err != nil {
		return fmt.Errorf("listen quic %s: %w", addr, err)
	}
	p.queueNonQUIC()
	return nil
}

// closeQUIC closes the quic transport and its socket: every connection
// still open ends at once (Run has closed them properly before).
func (p *Proxy) closeQUIC() error {
	if p.quicTr == nil {
		return nil
	}
	return errors.Join(p.quicTr.Close(), p.udp.Close())
}

// quicConnContext gives each inbound connection the setup its handshake
// record is made from.
func (p *Proxy) quicConnContext(ctx context.Context, ci *quic.ClientInfo) (context.Context, error) {
	slots, err := p.quicAdmit(ci.RemoteAddr)
	if err != nil {
		return nil, err
	}
	s := &setup{dir: Inbound, start: time.Now(), peerAddr: ci.RemoteAddr.String(), transport: TransportQUIC, connID: newConnID(), slots: slots}
	return withSetup(ctx, s), nil
}

// watchQUICHandshake records the failure of an inbound handshake. quic-go
// reports one only by ending the connection's context (the one its Tracer
// gets, and Conn.Context returns), with the failure as its cause: a refusal
// of ours among it. A connection that was accepted has been recorded by
// then (claim).
func (p *Proxy) watchQUICHandshake(ctx context.Context) {
	s := setupFrom(ctx)
	if s == nil {
		return
	}
	s.slots.hold(ctx)
	context.AfterFunc(ctx, func() {
		if !s.claim() {
			return
		}
		cause := context.Cause(ctx)
		reason := classify(context.Background(), cause)
		if errors.Is(cause, quic.ErrTransportClosed) || errors.Is(cause, quic.ErrServerClosed) {
			reason = ReasonShutdown
		}
		_ = p.record(context.Background(), s, reason, cause)
	})
}

// quicServerConfig picks the configuration of the current certificate for
// an inbound connection.
func (p *Proxy) quicServerConfig(chi *tls.ClientHelloInfo) (*tls.Config, error) {
	s := setupFrom(chi.Context())
	if s == nil {
		return nil, errors.New("quic connection without setup")
	}
	if err := p.auditErr(); err != nil {
		return nil, &refusal{reason: ReasonAuditUnavailable, err: err}
	}
	l, err := p.local()
	if err != nil {
		return nil, err
	}
	s.local = l
	return l.quicServer(), nil
}

// acceptQUIC accepts inbound quic connections until ctx is done.
func (p *Proxy) acceptQUIC(ctx context.Context) error {
	for {
		conn, err := p.quicLn.Accept(ctx)
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, quic.ErrServerClosed) {
				return nil
			}
			return fmt.Errorf("proxy: accept quic: %w", err)
		}
		p.handlers.Go(func() { p.serveQUICConn(ctx, conn) })
	}
}

// serveQUICConn serves an accepted connection: its handshake record
// (transport quic), registration, the control stream, then its streams,
// each on its own goroutine, until the connection ends.
func (p *Proxy) serveQUICConn(ctx context.Context, conn *quic.Conn) {
	s := setupFrom(conn.Context())
	if s != nil {
		s.slots.handshake() // accepted: the handshake is over
	}
	if s == nil || !s.claim() {
		// Already recorded: it failed between handshake and accept.
		_ = conn.CloseWithError(quicCloseRevoked, "")
		return
	}
	cs := conn.ConnectionState().TLS
	s.fill(cs, s.local)
	if len(cs.PeerCertificates) == 0 {
		_ = p.record(ctx, s, ReasonBadCertificate, ErrBadCertificate)
		_ = conn.CloseWithError(quicCloseRevoked, "")
		return
	}
	// VerifyConnection has checked this leaf; it cannot fail here.
	peerID, err := x509svid.IDFromCert(cs.PeerCertificates[0])
	if err != nil {
		_ = p.record(ctx, s, ReasonBadCertificate, err)
		_ = conn.CloseWithError(quicCloseRevoked, "")
		return
	}
	if err := p.record(ctx, s, "", nil); err != nil {
		_ = conn.CloseWithError(quicCloseRevoked, "")
		return
	}
	q := &quicConn{conn: conn}
	m := p.newMux(q, s, peerID)
	q.bind(m)
	if m.register() != "" {
		return
	}
	stop := context.AfterFunc(ctx, func() { m.close(false) })
	defer stop()
	ctrl, err := conn.OpenUniStream()
	if err == nil {
		_, err = ctrl.Write([]byte{quicReady})
	}
	if err != nil {
		m.close(false)
		return
	}
	q.setControl(ctrl)
	for {
		st, err := conn.AcceptStream(ctx)
		if err != nil {
			return
		}
		if !m.acquire() {
			st.CancelRead(quicStreamRefuse)
			st.CancelWrite(quicStreamRefuse)
			continue
		}
		p.handlers.Go(func() {
			defer m.release()
			p.serveQUICStream(ctx, m, q, st)
		})
	}
}

// serveQUICStream reads a stream's header, with the handshake deadline, and
// serves it.
func (p *Proxy) serveQUICStream(ctx context.Context, m *muxConn, q *quicConn, st *quic.Stream) {
	qs := &quicStream{st: st, conn: q.conn, mux: q}
	_ = st.SetReadDeadline(time.Now().Add(p.cfg.HandshakeTimeout))
	var hb [headerLen]byte
	if _, err := io.ReadFull(st, hb[:]); err != nil {
		p.serveStream(ctx, m, qs, 0, fmt.Errorf("read stream header: %w", err))
		return
	}
	_ = st.SetReadDeadline(time.Time{})
	h, err := parseHeader(hb[:])
	p.serveStream(ctx, m, qs, h.Port, err)
}

// dialQUIC dials an outbound quic connection and waits for the server's
// quicReady, which it sends only once it has accepted us: in TLS 1.3 the
// client's handshake completes before the server has checked its
// certificate, and a refusal arrives as the connection's close instead.
func (p *Proxy) dialQUIC(ctx context.Context, s *setup, l *localTLS, peer Peer) (muxImpl, error) {
	addr, err := net.ResolveUDPAddr("udp", peer.Tunnel)
	if err != nil {
		return nil, &refusal{reason: ReasonPeerUnreachable, err: fmt.Errorf("resolve peer %s: %w", peer.Tunnel, err)}
	}
	s.peerAddr = addr.String()
	s.start = time.Now()
	dctx, cancel := context.WithTimeout(withSetup(ctx, s), p.cfg.HandshakeTimeout)
	defer cancel()
	conn, err := p.quicTr.Dial(dctx, addr, l.client(p, peer.ID, TransportQUIC), p.quicClient)
	if err != nil {
		return nil, err
	}
	s.fill(conn.ConnectionState().TLS, l)
	ctrl, err := conn.AcceptUniStream(dctx)
	var b [1]byte
	if err == nil {
		_, err = io.ReadFull(ctrl, b[:])
	}
	if err == nil && b[0] != quicReady {
		err = fmt.Errorf("%w: control message %#02x, want ready", ErrBadHeader, b[0])
	}
	if err != nil {
		_ = conn.CloseWithError(quicCloseNoError, "")
		if dctx.Err() != nil && ctx.Err() == nil {
			err = fmt.Errorf("wait for the peer to accept: %w", dctx.Err())
		}
		return nil, err
	}
	return &quicConn{conn: conn, ctrlIn: ctrl, tasks: &p.pool.tasks}, nil
}

// quicConn is the muxImpl of a quic connection, either direction.
type quicConn struct {
	conn   *quic.Conn
	ctrlIn *quic.ReceiveStream // outbound: the server's control stream
	tasks  *sync.WaitGroup     // outbound: owns the control stream's reader

	m       atomic.Pointer[muxConn]
	mu      sync.Mutex
	ctrlOut *quic.SendStream // inbound: our control stream; guarded by mu
	goneOut bool             // inbound: quicGoaway sent; guarded by mu
}

// bind reports the connection's end to m, and (outbound) follows the
// server's control stream.
func (q *quicConn) bind(m *muxConn) {
	q.m.Store(m)
	context.AfterFunc(q.conn.Context(), m.closed)
	if q.ctrlIn != nil {
		q.tasks.Go(func() {
			var b [1]byte
			for {
				if _, err := io.ReadFull(q.ctrlIn, b[:]); err != nil {
					return // the connection ended
				}
				if b[0] == quicGoaway {
					m.retire()
				}
			}
		})
	}
}

func (q *quicConn) setControl(s *quic.SendStream) {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.ctrlOut = s
}

// goaway asks the client to open no new streams on this connection. Unlike
// HTTP/2's GOAWAY it refuses nothing: a stream opened meanwhile is served.
func (q *quicConn) goaway() {
	q.mu.Lock()
	ctrl := q.ctrlOut
	send := ctrl != nil && !q.goneOut
	if send {
		q.goneOut = true
	}
	q.mu.Unlock()
	if send {
		_, _ = ctrl.Write([]byte{quicGoaway})
	}
}

// gone reports whether goaway has been sent.
func (q *quicConn) gone() bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.goneOut
}

// close: QUIC has no graceful close of its own; muxCloseLinger gave the
// peer time to acknowledge what the last stream sent.
func (q *quicConn) close(graceful bool) {
	code := quicCloseRevoked
	if graceful {
		code = quicCloseNoError
	}
	_ = q.conn.CloseWithError(code, "")
	// CloseWithError returns once the connection is gone; report it now
	// rather than when the AfterFunc in bind gets to run.
	if m := q.m.Load(); m != nil {
		m.closed()
	}
}

func (q *quicConn) open(ctx context.Context, port uint16) (outStream, error) {
	if q.conn.Context().Err() != nil {
		return nil, errMuxUnusable
	}
	// The pool keeps at most PoolMaxStreams open, which is also the
	// peer's limit when both use the same settings, but the peer's credit
	// for a stream that just ended may still be on its way.
	st, err := q.conn.OpenStreamSync(ctx)
	if err != nil {
		if q.conn.Context().Err() != nil {
			return nil, fmt.Errorf("%w: %w", errMuxUnusable, err)
		}
		return nil, err
	}
	if _, err := st.Write(appendHeader(make([]byte, 0, headerLen), port)); err != nil {
		st.CancelWrite(quicStreamClosed)
		st.CancelRead(quicStreamClosed)
		return nil, fmt.Errorf("%w: %w", errMuxUnusable, err)
	}
	return &quicStream{st: st, conn: q.conn, mux: q}, nil
}

// quicStream is one stream, either direction.
type quicStream struct {
	st       *quic.Stream
	conn     *quic.Conn
	mux      *quicConn
	readEOF  atomic.Bool
	wroteEOF atomic.Bool
}

func (s *quicStream) status(timeout time.Duration) (status, error) {
	_ = s.st.SetReadDeadline(time.Now().Add(timeout))
	var b [1]byte
	if _, err := io.ReadFull(s.st, b[:]); err != nil {
		return 0, err
	}
	_ = s.st.SetReadDeadline(time.Time{})
	st := status(b[0])
	if st&statusGoaway != 0 {
		// Retired before the agent sees the answer, so its next connection is
		// never opened here, whatever the control stream's delivery order.
		if m := s.mux.m.Load(); m != nil {
			m.retire()
		}
		st &^= statusGoaway
	}
	return st, nil
}

func (s *quicStream) answer(st status) error {
	b := byte(st)
	if st == statusOK && s.mux.gone() {
		b |= byte(statusGoaway)
	}
	if _, err := s.st.Write([]byte{b}); err != nil {
		return err
	}
	if st == statusOK {
		return nil
	}
	// The status, then the end of the stream; STOP_SENDING discards the
	// client's early payload. Unlike TCP, nothing here can destroy the
	// status in flight.
	s.wroteEOF.Store(true)
	s.readEOF.Store(true)
	s.st.CancelRead(quicStreamRefuse)
	return s.st.Close()
}

func (s *quicStream) Read(b []byte) (int, error) {
	n, err := s.st.Read(b)
	if errors.Is(err, io.EOF) {
		s.readEOF.Store(true)
	}
	return n, err
}

func (s *quicStream) Write(b []byte) (int, error) { return s.st.Write(b) }

// CloseWrite sends FIN; the stream can still be read.
func (s *quicStream) CloseWrite() error {
	s.wroteEOF.Store(true)
	return s.st.Close()
}

// Close resets whichever direction has not ended (a clean end leaves
// nothing to do: quic-go delivers and frees the stream by itself).
func (s *quicStream) Close() error {
	if !s.readEOF.Load() {
		s.st.CancelRead(quicStreamClosed)
	}
	if !s.wroteEOF.Load() {
		s.st.CancelWrite(quicStreamClosed)
	}
	return nil
}

func (s *quicStream) LocalAddr() net.Addr                { return s.conn.LocalAddr() }
func (s *quicStream) RemoteAddr() net.Addr               { return s.conn.RemoteAddr() }
func (s *quicStream) SetDeadline(t time.Time) error      { return s.st.SetDeadline(t) }
func (s *quicStream) SetReadDeadline(t time.Time) error  { return s.st.SetReadDeadline(t) }
func (s *quicStream) SetWriteDeadline(t time.Time) error { return s.st.SetWriteDeadline(t) }

// keyUpdateTrace counts QUIC key updates (RFC 9001 section 6) from quic-go's
// qlog events, the only place quic-go reports them. One trace serves every
// connection; it records nothing else.
type keyUpdateTrace struct{ p *Proxy }

func (t *keyUpdateTrace) AddProducer() qlogwriter.Recorder { return t }

// RecordEvent counts one update per key phase: quic-go reports the client
// and the server key of each, and the handshake's keys as trigger "tls".
func (t *keyUpdateTrace) RecordEvent(e qlogwriter.Event) {
	ku, ok := e.(qlog.KeyUpdated)
	if !ok || ku.KeyType != qlog.KeyTypeClient1RTT {
		return
	}
	switch ku.Trigger {
	case qlog.KeyUpdateLocal:
		t.p.metrics.keyUpdates.WithLabelValues(initiatorLocal).Inc()
	case qlog.KeyUpdateRemote:
		t.p.metrics.keyUpdates.WithLabelValues(initiatorPeer).Inc()
	case qlog.KeyUpdateTLS:
		// The handshake installing the first 1-RTT keys: not an update.
	}
}

func (t *keyUpdateTrace) Close() error { return nil }
