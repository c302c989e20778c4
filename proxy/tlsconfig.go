package proxy

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"fmt"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/agentmesh/agentmesh/internal/svidrules"
)

// The tls.Configs are built once per local certificate, for each local
// identity (the host's, and each local agent's that outbound tunnels
// present): a rotation of an SVID (or SetDenyList) makes the next handshake
// of that identity build a new set, and nothing is cloned per handshake. Trust comes from Credentials in
// VerifyConnection, so nothing in a config ever goes stale.
//
// Why per local certificate: crypto/tls gives WrapSession, UnwrapSession
// and ClientSessionCache no way to tell which connection they serve, and a
// resumed handshake presents no certificate. Short of a tls.Config per
// handshake (GetConfigForClient), the way to know which of our SVIDs a
// resumed connection rests on (ConnInfo.LocalSerial, and closing it when
// that SVID is revoked) is that the configuration itself belongs to one
// SVID: the server only resumes tickets it issued under that certificate
// (a digest in SessionState.Extra), and each client session cache only
// holds sessions established with it. A rotation therefore costs each peer
// one full handshake.
//
// Resumption and revocation: VerifyConnection runs on resumed sessions too,
// on both sides (crypto/tls calls it with the peer certificates stored in
// the ticket or the cached session), so the chain, the deny-list and the
// policy are re-checked on every resumption with the current bundle, list
// and time. crypto/tls itself refuses to resume past the peer leaf's
// NotAfter (the server checks the client's, the client the server's) but
// not past our own; unwrapSession and sessionCache.Get close that gap.

// sessionExtraPrefix tags our entry in SessionState.Extra (other layers may
// append theirs); the digest of our leaf and the issue time follow.
const sessionExtraPrefix = "agentmesh/local/1\x00"

// sessionCacheSize bounds each client session cache. A cache serves one peer
// identity, keyed by its tunnel address, which is normally one.
const sessionCacheSize = 8

// setupKey carries the *setup of a handshake to the TLS callbacks through
// the handshake's context (ClientHelloInfo.Context,
// CertificateRequestInfo.Context).
type setupKey struct{}

func withSetup(ctx context.Context, s *setup) context.Context {
	return context.WithValue(ctx, setupKey{}, s)
}

func setupFrom(ctx context.Context) *setup {
	s, _ := ctx.Value(setupKey{}).(*setup)
	return s
}

// localTLS is everything that depends on one SVID this proxy presents. It is
// immutable once built, except for the lazily filled map of client configs.
type localTLS struct {
	id       spiffeid.ID // the identity cert belongs to: the host's or an agent's
	cert     *tls.Certificate
	leaf     *x509.Certificate
	serial   string
	digest   [sha256.Size]byte // of the leaf DER, bound into our tickets
	server   *tls.Config       // the TCP tunnel port: tls, and h2 when offered; host identity only
	clientMu sync.Mutex
	clients  map[clientKey]*tls.Config // guarded by clientMu
	quic     *tls.Config               // guarded by clientMu; built on first use
}

// clientKey names one client configuration of a localTLS: the peer identity
// it accepts and the transport (ALPN) it offers.
type clientKey struct {
	peer      spiffeid.ID
	transport string
}

// holds reports whether cert is the certificate l was built for.
func (l *localTLS) holds(cert *tls.Certificate) bool {
	if cert == l.cert {
		return true
	}
	return len(cert.Certificate) > 0 && bytes.Equal(cert.Certificate[0], l.leaf.Raw)
}

// validAt reports whether our certificate may still be relied on at now.
func (l *localTLS) validAt(now time.Time) bool {
	return !now.Before(l.leaf.NotBefore) && !now.After(l.leaf.NotAfter)
}

// serverTLSConfig terminates inbound tunnels on the TCP port with l's
// certificate: the tls transport, and h2 when the proxy offers it.
func (p *Proxy) serverTLSConfig(l *localTLS) *tls.Config {
	return &tls.Config{
		NextProtos:             p.tcpProtocols(),
		SessionTicketsDisabled: p.cfg.DisableResumption,
		MinVersion:             tls.VersionTLS13,
		MaxVersion:             tls.VersionTLS13,
		// Not called on a resumed handshake, which presents no
		// certificate; the setup then learns the serial from DidResume.
		GetCertificate: func(chi *tls.ClientHelloInfo) (*tls.Certificate, error) {
			if s := setupFrom(chi.Context()); s != nil {
				s.localSerial, s.localNotBefore = l.serial, l.leaf.NotBefore
			}
			return l.cert, nil
		},
		// The chain is verified in VerifyConnection against the trust
		// bundle of the peer's own trust domain (x509svid rules), which
		// ClientCAs cannot express; RequireAnyClientCert only makes sure
		// there is a certificate to verify.
		ClientAuth: tls.RequireAnyClientCert,
		VerifyConnection: func(cs tls.ConnectionState) error {
			return p.verifyInbound(cs, l)
		},
		Time: p.cfg.Now,
		WrapSession: func(cs tls.ConnectionState, ss *tls.SessionState) ([]byte, error) {
			return p.wrapSession(l, cs, ss)
		},
		UnwrapSession: func(identity []byte, cs tls.ConnectionState) (*tls.SessionState, error) {
			return p.unwrapSession(l, identity, cs)
		},
	}
}

// tcpProtocols are the application protocols of the TCP tunnel port: tls,
// and h2 when offered. Each client offers exactly one, so the order does not
// matter.
func (p *Proxy) tcpProtocols() []string {
	if p.cfg.offers(TransportH2) {
		return []string{ALPN, ALPNH2}
	}
	return []string{ALPN}
}

// noSVIDTLSConfig runs the inbound handshake when there is no SVID to
// present: the peer gets a TLS alert, as from any refusal, and the setup
// records why (setup.localErr).
func (p *Proxy) noSVIDTLSConfig() *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		MaxVersion: tls.VersionTLS13,
		GetCertificate: func(chi *tls.ClientHelloInfo) (*tls.Certificate, error) {
			if s := setupFrom(chi.Context()); s != nil && s.localErr != nil {
				return nil, s.localErr
			}
			return nil, &refusal{reason: ReasonNoSVID, err: ErrNoSVID}
		},
		NextProtos:             p.tcpProtocols(),
		SessionTicketsDisabled: true,
	}
}

// wrapSession seals a ticket for a connection served with l's certificate,
// binding it to that certificate and to its issue time.
func (p *Proxy) wrapSession(l *localTLS, cs tls.ConnectionState, ss *tls.SessionState) ([]byte, error) {
	now := p.cfg.Now()
	p.tickets.check(now, p.ticketPeriod(l.leaf))
	ss.Extra = append(ss.Extra, l.sessionExtra(now))
	return p.tickets.engine.EncryptTicket(cs, ss)
}

// unwrapSession opens a ticket. It declines (nil, nil: a full handshake
// follows) rather than fails, so a ticket that cannot resume never costs
// the connection: one sealed with a dropped key, one issued under another
// of our certificates (a rotation happened), one older than two ticket
// periods, or any ticket once our certificate has expired. Refusing the
// peer is VerifyConnection's job, which runs on the resumed session.
func (p *Proxy) unwrapSession(l *localTLS, identity []byte, cs tls.ConnectionState) (*tls.SessionState, error) {
	now := p.cfg.Now()
	period := p.ticketPeriod(l.leaf)
	p.tickets.check(now, period)
	if !l.validAt(now) {
		return nil, nil
	}
	ss, err := p.tickets.engine.DecryptTicket(identity, cs)
	if err != nil || ss == nil {
		return nil, nil //nolint:nilerr // an unreadable ticket is declined, not fatal
	}
	for _, e := range ss.Extra {
		if issued, ok := l.issuedAt(e); ok && live(issued, now, period) {
			return ss, nil
		}
	}
	return nil, nil
}

// sessionExtra is our SessionState.Extra entry: prefix, leaf digest, issue
// time (Unix seconds).
func (l *localTLS) sessionExtra(now time.Time) []byte {
	e := make([]byte, 0, len(sessionExtraPrefix)+sha256.Size+8)
	e = append(e, sessionExtraPrefix...)
	e = append(e, l.digest[:]...)
	return binary.BigEndian.AppendUint64(e, uint64(now.Unix())) //nolint:gosec // decoded by issuedAt as int64
}

// issuedAt parses e as our entry for l's certificate; ok is false for
// another layer's entry or another certificate's.
func (l *localTLS) issuedAt(e []byte) (time.Time, bool) {
	rest, ok := bytes.CutPrefix(e, []byte(sessionExtraPrefix))
	if !ok || len(rest) != sha256.Size+8 || !bytes.Equal(rest[:sha256.Size], l.digest[:]) {
		return time.Time{}, false
	}
	return time.Unix(int64(binary.BigEndian.Uint64(rest[sha256.Size:])), 0), true //nolint:gosec // our own encoding of a Unix time
}

// quicServer returns the configuration that terminates inbound quic
// connections with l's certificate, built on first use: the TCP port's,
// with the quic protocol and without session tickets (a pooled connection
// lives long, so resumption would save little; 0-RTT stays off either way).
func (l *localTLS) quicServer() *tls.Config {
	l.clientMu.Lock()
	defer l.clientMu.Unlock()
	if l.quic == nil {
		cfg := l.server.Clone()
		cfg.NextProtos = []string{ALPNQUIC}
		cfg.SessionTicketsDisabled = true
		l.quic = cfg
	}
	return l.quic
}

// client returns the tls.Config that originates tunnels of transport t with
// l's certificate to peers that must present id, built once per
// (certificate, identity, transport): Routes and captures to the same peer
// share it and its session cache. The map grows with the number of peer
// identities, which the Directory bounds, and is dropped with l.
func (l *localTLS) client(p *Proxy, id spiffeid.ID, t string) *tls.Config {
	l.clientMu.Lock()
	defer l.clientMu.Unlock()
	k := clientKey{peer: id, transport: t}
	if cfg, ok := l.clients[k]; ok {
		return cfg
	}
	cfg := p.clientTLSConfig(l, id, t)
	l.clients[k] = cfg
	return cfg
}

// clientTLSConfig originates tunnels of transport t with l's certificate to
// one peer identity; peerID is the only identity it accepts. It offers the
// transport's protocol only, so the peer cannot pick another.
func (p *Proxy) clientTLSConfig(l *localTLS, peerID spiffeid.ID, t string) *tls.Config {
	alpn := ALPN
	switch t {
	case TransportH2:
		alpn = ALPNH2
	case TransportQUIC:
		alpn = ALPNQUIC
	}
	var cache tls.ClientSessionCache
	// quic: see quicServer.
	if !p.cfg.DisableResumption && t != TransportQUIC {
		cache = &sessionCache{now: p.cfg.Now, local: l, lru: tls.NewLRUClientSessionCache(sessionCacheSize)}
	}
	return &tls.Config{
		MinVersion: tls.VersionTLS13,
		MaxVersion: tls.VersionTLS13,
		// Not called on a resumed handshake; see serverTLSConfig.
		GetClientCertificate: func(cri *tls.CertificateRequestInfo) (*tls.Certificate, error) {
			if s := setupFrom(cri.Context()); s != nil {
				s.localSerial, s.localNotBefore = l.serial, l.leaf.NotBefore
			}
			return l.cert, nil
		},
		// InsecureSkipVerify turns off only the WebPKI hostname and chain
		// check, which cannot work here: SVIDs carry no DNS names and chain
		// to per-trust-domain bundles. VerifyConnection replaces it: it
		// verifies the x509svid chain against the current bundle and
		// requires the exact Route.PeerID or Peer.ID, and it runs on every
		// handshake, resumed ones included.
		InsecureSkipVerify: true, //nolint:gosec,forbidigo // replaced by VerifyConnection, see above
		VerifyConnection: func(cs tls.ConnectionState) error {
			return p.verifyOutbound(cs, peerID, l)
		},
		NextProtos:         []string{alpn},
		Time:               p.cfg.Now,
		ClientSessionCache: cache,
	}
}

// sessionCache is a client session cache for one (local certificate, peer
// identity). crypto/tls checks that the server's leaf is still valid before
// resuming, not that ours is; Get closes that gap. Safe for concurrent use.
type sessionCache struct {
	now   func() time.Time
	local *localTLS
	lru   tls.ClientSessionCache
}

func (c *sessionCache) Get(key string) (*tls.ClientSessionState, bool) {
	if !c.local.validAt(c.now()) {
		return nil, false
	}
	return c.lru.Get(key)
}

func (c *sessionCache) Put(key string, cs *tls.ClientSessionState) { c.lru.Put(key, cs) }

// verifyPeer checks that the peer negotiated a tunnel protocol and
// presented a valid X509-SVID chaining to the bundle of its trust domain,
// then that the revocation state may be trusted and denies neither the peer
// nor our own certificate l. x509svid.Verify rejects foreign CAs, expired
// chains, leaves with zero or several URI SANs and CA leaves; svidrules adds
// what it ignores: the extended key usage of the peer's role (a client
// leaf needs clientAuth, a server leaf serverAuth), the chain's depth and
// the SPIFFE ID's length.
func (p *Proxy) verifyPeer(cs tls.ConnectionState, l *localTLS, role svidrules.Role) (spiffeid.ID, string, error) {
	// crypto/tls only lets a protocol through that this side offered.
	if transportOf(cs.NegotiatedProtocol) == "" {
		return spiffeid.ID{}, "", &refusal{reason: ReasonALPN,
			err: fmt.Errorf("%w: got %q", ErrALPN, cs.NegotiatedProtocol)}
	}
	if len(cs.PeerCertificates) == 0 {
		return spiffeid.ID{}, "", &refusal{reason: ReasonBadCertificate,
			err: fmt.Errorf("%w: no certificate", ErrBadCertificate)}
	}
	leaf := cs.PeerCertificates[0]
	serial := leaf.SerialNumber.String()
	// The rules go-spiffe leaves out come first: they are cheap, and an
	// over-long ID must not travel further than this.
	if err := svidrules.CheckLeaf(leaf, role); err != nil {
		return spiffeid.ID{}, serial, ruleRefusal(err, "", serial)
	}
	id, err := x509svid.IDFromCert(leaf)
	if err != nil {
		return spiffeid.ID{}, serial, &refusal{reason: ReasonBadCertificate, peerSerial: serial,
			err: fmt.Errorf("%w: %w", ErrBadCertificate, err)}
	}
	if err := p.checkDepth(cs.PeerCertificates, id); err != nil {
		return id, serial, ruleRefusal(err, id.String(), serial)
	}
	if err := p.chains.verify(cs.PeerCertificates, p.cfg.Credentials, p.cfg.Now()); err != nil {
		reason := classifyVerify(err)
		// A trust domain without a bundle fails inside Verify with the
		// source's own error; name it for what it is.
		if _, berr := p.cfg.Credentials.GetX509BundleForTrustDomain(id.TrustDomain()); berr != nil {
			reason = ReasonUnknownAuthority
		}
		return id, serial, &refusal{reason: reason, peerID: id.String(), peerSerial: serial,
			err: fmt.Errorf("%w: %w", ErrBadCertificate, err)}
	}
	// Freshness first: with a stale list, "not denied" means nothing.
	if p.cfg.Revocation != nil {
		if err := p.cfg.Revocation(); err != nil {
			return id, serial, &refusal{reason: ReasonRevocationStale, peerID: id.String(), peerSerial: serial,
				err: fmt.Errorf("%w: %w", ErrRevocationStale, err)}
		}
	}
	if p.denies(id, serial, leaf.NotBefore) {
		return id, serial, &refusal{reason: ReasonRevoked, peerID: id.String(), peerSerial: serial,
			err: fmt.Errorf("%w: peer %s serial %s", ErrRevoked, id, serial)}
	}
	if p.deniesIssuer(cs.PeerCertificates) {
		return id, serial, &refusal{reason: ReasonRevoked, peerID: id.String(), peerSerial: serial,
			err: fmt.Errorf("%w: peer %s: its issuer was retired", ErrRevoked, id)}
	}
	// Checked here too, not only when l is picked: a resumed session rests
	// on the certificate of its original handshake, which may have been
	// denied since.
	if p.denies(l.id, l.serial, l.leaf.NotBefore) {
		return id, serial, &refusal{reason: ReasonRevoked, peerID: id.String(), peerSerial: serial,
			err: fmt.Errorf("%w: our own SVID (serial %s)", ErrRevoked, l.serial)}
	}
	return id, serial, nil
}

// verifyInbound admits a peer that at least one Service or the policy in
// force allows somewhere. The per-port check follows once the header names
// the port. Resumed sessions come here too, so a policy change applies to
// them at once.
func (p *Proxy) verifyInbound(cs tls.ConnectionState, l *localTLS) error {
	id, serial, err := p.verifyPeer(cs, l, svidrules.Client)
	if err != nil {
		return err
	}
	if st := p.authz.Load(); !p.admits(st, id) {
		err := fmt.Errorf("%w: %s", ErrPeerNotAllowed, id)
		// Denied before it names a port: the record names the host as the
		// destination.
		p.metrics.authzDenied.WithLabelValues(string(Inbound), defaultRule).Inc()
		p.auditAuthz(context.Background(), ConnInfo{Direction: Inbound, PeerID: id}, authzDenied,
			verdict{rule: defaultRule, version: st.version, reason: ReasonPeerNotAllowed, err: err})
		return &refusal{reason: ReasonPeerNotAllowed, peerID: id.String(), peerSerial: serial, err: err}
	}
	return nil
}

// verifyOutbound admits only the route's peer identity.
func (p *Proxy) verifyOutbound(cs tls.ConnectionState, want spiffeid.ID, l *localTLS) error {
	id, serial, err := p.verifyPeer(cs, l, svidrules.Server)
	if err != nil {
		return err
	}
	if id != want {
		return &refusal{reason: ReasonPeerMismatch, peerID: id.String(), peerSerial: serial,
			err: fmt.Errorf("%w: got %s, want %s", ErrPeerMismatch, id, want)}
	}
	return nil
}
