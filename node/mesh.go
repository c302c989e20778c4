package node

import (
	"context"
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"log/slog"
	"net/netip"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/meshapi"
	"github.com/agentmesh/agentmesh/meshclient"
	"github.com/agentmesh/agentmesh/proxy"
	"github.com/agentmesh/agentmesh/rotator"
)

// This file is the only one of the package that knows the mesh API's client: the rest
// of node sees it through the interfaces below, declared here by their consumer.

// meshDirectory is the node's view of the mesh client: its loop, the mesh states it
// publishes, the peer lookups the proxy makes, the deny-list's freshness, and enrolment
// tokens for local agents.
type meshDirectory interface {
	proxy.Directory
	meshStates
	Run(ctx context.Context) error
	CheckFresh(maxAge time.Duration) error
	// DenyList is the list in force, nil before the first one.
	DenyList() proxy.Denier
	AgentToken(ctx context.Context, id spiffeid.ID) (string, error)
	anchorAcker
	kicker
}

// lineageRevoker asks the CA to revoke every certificate of id's lineage but keep,
// authenticating with cert, and returns the serials revoked.
type lineageRevoker interface {
	RevokeLineage(ctx context.Context, cert tls.Certificate, id spiffeid.ID, keep, reason string) ([]string, error)
}

// registration is an agent registered to a host, as the directory lists it.
type registration struct {
	ID   spiffeid.ID
	Host spiffeid.ID
	UID  uint32 // the uid of the agent's processes on Host
	Port uint16 // where the agent listens on its host; 0: none
}

// caLink is how the proxy reaches agentmesh ca.
type caLink struct {
	url string
	// anchors verify the CA: the bundle in force, which the node keeps them set to, so
	// the proxy still reaches a CA that serves under a new root.
	anchors *meshclient.Anchors
	control func(network, address string, c syscall.RawConn) error // the proxy's mark, or nil
}

func newCALink(url string, roots []*x509.Certificate) caLink {
	return caLink{url: url, anchors: meshclient.NewAnchors(roots)}
}

func (l caLink) clientConfig(token func(context.Context) (string, error), logger *slog.Logger) meshclient.ClientConfig {
	return meshclient.ClientConfig{URL: l.url, Anchors: l.anchors, Token: token, Control: l.control, Logger: logger}
}

// issuer enrols with token and renews over mTLS.
func (l caLink) issuer(token func(context.Context) (string, error), logger *slog.Logger) (rotator.Issuer, error) {
	return meshclient.NewClient(l.clientConfig(token, logger))
}

// agentIssuer makes every renewal of an agent's SVID a fresh enrolment with a token the
// CA grants only while the agent is registered to this host: unregistering ends
// renewals.
func (l caLink) agentIssuer(token func(context.Context) (string, error), logger *slog.Logger) (rotator.Issuer, error) {
	c, err := meshclient.NewClient(l.clientConfig(token, logger))
	if err != nil {
		return nil, err
	}
	return enrolOnly{c}, nil
}

type enrolOnly struct{ c *meshclient.Client }

func (e enrolOnly) Enroll(ctx context.Context, id spiffeid.ID, key crypto.Signer) ([]*x509.Certificate, error) {
	return e.c.Enroll(ctx, id, key)
}

func (e enrolOnly) Renew(ctx context.Context, current *x509svid.SVID, key crypto.Signer) ([]*x509.Certificate, error) {
	return e.c.Enroll(ctx, current.ID, key)
}

// RevokeLineage implements lineageRevoker.
func (l caLink) RevokeLineage(ctx context.Context, cert tls.Certificate, id spiffeid.ID, keep, reason string) ([]string, error) {
	rr, err := meshclient.RevokeRemote(ctx, l.clientConfig(nil, nil), cert, meshapi.RevokeRequest{SPIFFEID: id.String(), Except: keep, Reason: reason})
	if err != nil {
		return nil, err
	}
	return rr.Serials, nil
}

// auditWitness is the CA as the audit log's witness, over the mesh API with the host
// SVID cert gives; ca witnesses the CA's log in turn.
func (l caLink) auditWitness(cert func() (*tls.Certificate, error), ca *caLog) (audit.Witness, error) {
	return meshclient.NewAuditWitness(meshclient.Config{URL: l.url, Anchors: l.anchors, Control: l.control,
		Certificate: cert}, caLogClient{ca})
}

// caLogClient adapts caLog to the mesh client's CALog.
type caLogClient struct{ *caLog }

func (c caLogClient) Observe(ctx context.Context, cp meshclient.CACheckpoint) {
	c.observe(ctx, caCheckpoint{witnessKey: cp.WitnessKey, note: cp.Checkpoint, proof: cp.Proof, hostKey: cp.HostKey})
}

// directorySettings is what the directory client needs besides the CA link.
type directorySettings struct {
	certificate   func() (*tls.Certificate, error)
	addresses     []netip.Addr
	tunnelPort    uint16
	transports    []string
	bundleVersion func() string
	status        func() *meshapi.ProxyStatus
	heartbeat     time.Duration
	poll          time.Duration
	audit         *audit.Log
	registerer    prometheus.Registerer
	logger        *slog.Logger
}

// directory starts nothing: Run does. States are published only once it runs.
func (l caLink) directory(s directorySettings) (meshDirectory, error) {
	m, err := meshclient.NewMember(meshclient.Config{
		URL: l.url, Anchors: l.anchors, Control: l.control,
		Certificate: s.certificate, Addresses: s.addresses, TunnelPort: s.tunnelPort, Transports: s.transports,
		BundleVersion: s.bundleVersion, Status: s.status, Heartbeat: s.heartbeat, PollInterval: s.poll,
		Audit: s.audit, Registerer: s.registerer, Logger: s.logger,
	})
	if err != nil {
		return nil, err
	}
	return member{m}, nil
}

// member adapts the mesh client to meshDirectory: lookups read the mesh state in force.
type member struct{ *meshclient.Member }

func (m member) PeerFor(a netip.Addr) (proxy.Peer, bool) {
	st := m.Watch.State()
	id, tunnel, ok := st.PeerFor(a)
	return proxy.Peer{ID: id, Tunnel: tunnel, Transports: st.TransportsFor(a), Agents: st.AgentsAt(a)}, ok
}

// Kick asks for a heartbeat now; a proxy that does not register has none.
func (m member) Kick() {
	if m.Heartbeat != nil {
		m.Heartbeat.Kick()
	}
}

func (m member) Updated() <-chan struct{} { return m.Watch.Updated() }

func (m member) State() *meshapi.State { return m.Watch.State() }

func (m member) CheckFresh(maxAge time.Duration) error { return m.Watch.CheckFresh(maxAge) }

func (m member) AgentToken(ctx context.Context, id spiffeid.ID) (string, error) {
	return m.Tokens.AgentToken(ctx, id)
}

func (m member) AckAnchor(ctx context.Context, ack meshapi.AnchorAck) error {
	return m.Watch.AckAnchor(ctx, ack)
}

func (member) StaleStep(err error) bool { return errors.Is(err, meshclient.ErrStaleStep) }

func (m member) DenyList() proxy.Denier {
	if l := m.Watch.State().DenyList(); l != nil {
		return l
	}
	return nil
}
