package meshclient

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"sync/atomic"

	"github.com/agentmesh/agentmesh/meshapi"
)

// Anchors are the trust anchors the mesh clients verify the CA with: its TLS serving
// certificate at every handshake, and the deny-list's signature. The proxy replaces
// them (Set) when its bundle in force changes: after a rotation of the CA's root, the
// CA serves a certificate under the new root, which the root file the proxy started
// with does not hold. Safe for concurrent use.
type Anchors struct {
	cur atomic.Pointer[anchorSet]
}

// anchorSet is one set of anchors and its pool; immutable once published.
type anchorSet struct {
	roots []*x509.Certificate
	pool  *x509.CertPool
}

// NewAnchors holds roots.
func NewAnchors(roots []*x509.Certificate) *Anchors {
	a := &Anchors{}
	a.Set(roots)
	return a
}

// Set makes roots the anchors from the next handshake and the next deny-list on.
func (a *Anchors) Set(roots []*x509.Certificate) {
	pool := x509.NewCertPool()
	for _, r := range roots {
		pool.AddCert(r)
	}
	a.cur.Store(&anchorSet{roots: slices.Clone(roots), pool: pool})
}

// Roots are the anchors held; the caller must not modify them.
func (a *Anchors) Roots() []*x509.Certificate { return a.cur.Load().roots }

// anchorsOf is a's anchors, or fixed roots when a is nil.
func anchorsOf(a *Anchors, roots []*x509.Certificate) *Anchors {
	if a != nil {
		return a
	}
	return NewAnchors(roots)
}

// tlsConfig is a client configuration that verifies the CA at host against the
// anchors held at each handshake.
func (a *Anchors) tlsConfig(host string) *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS12,
		// The standard verification would use a pool fixed when the configuration was
		// built: VerifyConnection verifies the chain and the name instead, against the
		// anchors held at this handshake.
		InsecureSkipVerify: true, //nolint:gosec // G402: VerifyConnection verifies chain and host name
		VerifyConnection:   func(cs tls.ConnectionState) error { return a.verifyServer(cs, host) },
	}
}

// verifyServer does what the standard verification of a server does, against the
// anchors held now.
func (a *Anchors) verifyServer(cs tls.ConnectionState, host string) error {
	if len(cs.PeerCertificates) == 0 {
		return errors.New("ca: server presented no certificate")
	}
	inter := x509.NewCertPool()
	for _, c := range cs.PeerCertificates[1:] {
		inter.AddCert(c)
	}
	_, err := cs.PeerCertificates[0].Verify(x509.VerifyOptions{DNSName: host, Roots: a.cur.Load().pool,
		Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}})
	if err != nil {
		return fmt.Errorf("ca: verify server certificate: %w", err)
	}
	return nil
}

// ErrStaleStep is wrapped by AckAnchor's error when the CA answers that the step
// acknowledged is not its current one: acknowledging it again cannot succeed.
var ErrStaleStep = errors.New("ca: anchor rotation step is not current")

// AckAnchor acknowledges a step of a rotation of the CA's trust anchors with the host
// SVID (Config.Certificate): POST /mesh/v1/rotation/ack. A 409 answer wraps
// ErrStaleStep; any other refusal is a *meshapi.ResponseError with Op "rotation ack".
// It does not retry. Safe for concurrent use.
func (w *Watch) AckAnchor(ctx context.Context, ack meshapi.AnchorAck) error {
	body, err := json.Marshal(ack)
	if err != nil {
		return fmt.Errorf("ca: rotation ack: %w", err)
	}
	ctx, cancel := context.WithTimeout(ctx, defaultTimeout)
	defer cancel()
	_, err = w.conn.do(ctx, "rotation ack", http.MethodPost, meshapi.AnchorAckPath, body, meshapi.MaxResponse)
	if re, ok := errors.AsType[*meshapi.ResponseError](err); ok && re.Status == http.StatusConflict {
		return fmt.Errorf("%w: %w", ErrStaleStep, err)
	}
	return err
}
