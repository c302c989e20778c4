package meshclient

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/http"
	"sync/atomic"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/agentmesh/agentmesh/meshapi"
)

// conn sends mesh API requests to the CA over mTLS with the proxy's current SVID, and
// remembers the ID it last presented: how a client knows its own directory entry and
// trust domain.
type conn struct {
	base    string
	anchors *Anchors
	cert    func() (*tls.Certificate, error)
	hc      *http.Client
	tr      *http.Transport
	self    atomic.Pointer[spiffeid.ID]
}

func newConn(cfg Config) (*conn, error) {
	ep, err := cfg.check()
	if err != nil {
		return nil, err
	}
	c := &conn{base: ep.base, anchors: ep.anchors, cert: cfg.Certificate}
	tc := ep.anchors.tlsConfig(ep.host)
	tc.MinVersion, tc.GetClientCertificate = tls.VersionTLS13, c.clientCertificate
	c.tr = &http.Transport{
		// Never through HTTP(S)_PROXY: on a meshed host that is the agentmesh proxy.
		Proxy:           nil,
		DialContext:     (&net.Dialer{Timeout: defaultTimeout, Control: cfg.Control}).DialContext,
		TLSClientConfig: tc,
		// A new connection, hence a fresh call to Certificate, for every request: a
		// rotated SVID is presented at the next heartbeat, and the CA never sees a
		// connection outlive the certificate that opened it. At one heartbeat and
		// one long-poll per interval, the handshakes cost little.
		DisableKeepAlives:   true,
		TLSHandshakeTimeout: defaultTimeout,
	}
	c.hc = &http.Client{Transport: c.tr}
	return c, nil
}

// clientCertificate presents the current SVID and remembers its ID.
func (c *conn) clientCertificate(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
	crt, err := c.cert()
	if err != nil {
		return nil, fmt.Errorf("current svid: %w", err)
	}
	id, err := certificateID(crt)
	if err != nil {
		return nil, err
	}
	c.self.Store(&id)
	return crt, nil
}

// selfID is the ID of the certificate last presented, zero before the first request.
func (c *conn) selfID() spiffeid.ID {
	if p := c.self.Load(); p != nil {
		return *p
	}
	return spiffeid.ID{}
}

// trustDomain is the trust domain of this proxy's certificate, whose deny-list it
// follows: the one last presented to the CA, or else the current one.
func (c *conn) trustDomain() (spiffeid.TrustDomain, error) {
	if p := c.self.Load(); p != nil {
		return p.TrustDomain(), nil
	}
	crt, err := c.cert()
	if err != nil {
		return spiffeid.TrustDomain{}, fmt.Errorf("current svid: %w", err)
	}
	id, err := certificateID(crt)
	if err != nil {
		return spiffeid.TrustDomain{}, err
	}
	return id.TrustDomain(), nil
}

// do sends one request to the mesh API path and returns the body of a 200 answer, at
// most limit bytes. Any other status is a *meshapi.ResponseError.
func (c *conn) do(ctx context.Context, op, method, path string, body []byte, limit int64) ([]byte, error) {
	status, b, err := c.send(ctx, op, method, path, body, limit)
	if err != nil {
		return nil, err
	}
	if status != http.StatusOK {
		return nil, &meshapi.ResponseError{Op: op, Status: status, Message: meshapi.ErrorMessage(b)}
	}
	return b, nil
}

// send sends one request to the mesh API path and returns the status and body of the
// answer, whatever the status, at most limit bytes.
func (c *conn) send(ctx context.Context, op, method, path string, body []byte, limit int64) (int, []byte, error) {
	var rd *bytes.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := newRequest(ctx, method, c.base+meshapi.Prefix+path, rd)
	if err != nil {
		return 0, nil, fmt.Errorf("ca: %s: %w", op, err)
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return 0, nil, fmt.Errorf("ca: %s: %w", op, err)
	}
	defer func() { _ = resp.Body.Close() }()
	b, err := meshapi.ReadLimited(resp.Body, limit)
	if err != nil {
		return 0, nil, fmt.Errorf("ca: %s: read answer: %w", op, err)
	}
	return resp.StatusCode, b, nil
}

// newRequest builds a request, with a JSON body when body is not nil.
func newRequest(ctx context.Context, method, u string, body *bytes.Reader) (*http.Request, error) {
	if body == nil {
		return http.NewRequestWithContext(ctx, method, u, nil)
	}
	req, err := http.NewRequestWithContext(ctx, method, u, body)
	if err == nil {
		req.Header.Set("Content-Type", "application/json")
	}
	return req, err
}

func (c *conn) close() { c.tr.CloseIdleConnections() }

// certificateID is the SPIFFE ID of the leaf of c.
func certificateID(c *tls.Certificate) (spiffeid.ID, error) {
	if c == nil || len(c.Certificate) == 0 {
		return spiffeid.ID{}, errors.New("current svid: no certificate")
	}
	leaf := c.Leaf
	if leaf == nil {
		var err error
		if leaf, err = x509.ParseCertificate(c.Certificate[0]); err != nil {
			return spiffeid.ID{}, fmt.Errorf("current svid: %w", err)
		}
	}
	id, err := x509svid.IDFromCert(leaf)
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("current svid: %w", err)
	}
	return id, nil
}
