package node

import (
	"context"
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"log/slog"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/internal/testca"
	"github.com/agentmesh/agentmesh/meshclient"
	"github.com/agentmesh/agentmesh/policy"
	"github.com/agentmesh/agentmesh/proxy"
	"github.com/agentmesh/agentmesh/rotator"
)

var (
	testHost  = spiffeid.RequireFromString("spiffe://example.org/host/a")
	otherHost = spiffeid.RequireFromString("spiffe://example.org/host/b")
	planner   = spiffeid.RequireFromString("spiffe://example.org/agent/planner")
	search    = spiffeid.RequireFromString("spiffe://example.org/agent/search")
)

// testIssuer issues from an in-memory CA, as agentmesh ca would; use switches it to
// another, as a rotation of the CA's anchors does.
type testIssuer struct {
	t  *testing.T
	mu sync.Mutex
	ca *testca.CA
}

func (i *testIssuer) current() *testca.CA {
	i.mu.Lock()
	defer i.mu.Unlock()
	return i.ca
}

func (i *testIssuer) use(ca *testca.CA) {
	i.mu.Lock()
	defer i.mu.Unlock()
	i.ca = ca
}

func (i *testIssuer) Enroll(_ context.Context, id spiffeid.ID, key crypto.Signer) ([]*x509.Certificate, error) {
	return i.current().Issue(i.t, id, key.Public()), nil
}

func (i *testIssuer) Renew(_ context.Context, cur *x509svid.SVID, key crypto.Signer) ([]*x509.Certificate, error) {
	return i.current().Issue(i.t, cur.ID, key.Public()), nil
}

// auditRecords keeps every record appended.
type auditRecords struct {
	mu   sync.Mutex
	list []audit.Event
}

func (r *auditRecords) Append(e audit.Event) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.list = append(r.list, e)
	return nil
}

// policies returns the policy records, in order.
func (r *auditRecords) policies() []*audit.Policy {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []*audit.Policy
	for _, e := range r.list {
		switch p := e.(type) {
		case audit.Policy:
			out = append(out, &p)
		case *audit.Policy:
			out = append(out, p)
		}
	}
	return out
}

// configChanges returns the config records, in order.
func (r *auditRecords) configChanges() []audit.ConfigChange {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []audit.ConfigChange
	for _, e := range r.list {
		if c, ok := e.(audit.ConfigChange); ok {
			out = append(out, c)
		}
	}
	return out
}

// listeners returns the routes and services sets applied, in order.
func (p *proxyRecorder) listeners() ([][]proxy.Route, [][]proxy.Service) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return slices.Clone(p.routes), slices.Clone(p.services)
}

// proxyRecorder stands for the running proxy at the boundary node drives: it keeps what
// it was given.
type proxyRecorder struct {
	mu           sync.Mutex
	denyLists    []proxy.Denier
	authz        []*policy.Authz
	routes       [][]proxy.Route
	services     [][]proxy.Service
	ticketResets []string
}

func (p *proxyRecorder) SetDenyList(l proxy.Denier) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.denyLists = append(p.denyLists, l)
	return 0
}

func (p *proxyRecorder) SetPolicy(a *policy.Authz) (uint64, int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.authz = append(p.authz, a)
	return uint64(len(p.authz)) + 1, 0 // version 1 is the policy at start
}

func (p *proxyRecorder) SetRoutes(r []proxy.Route) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.routes = append(p.routes, r)
	return nil
}

func (p *proxyRecorder) SetServices(s []proxy.Service) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.services = append(p.services, s)
	return 0, nil
}

func (p *proxyRecorder) SetDrainGrace(time.Duration) {}

func (p *proxyRecorder) ResetTicketKeys(cause string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.ticketResets = append(p.ticketResets, cause)
}

func (p *proxyRecorder) resets() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]string(nil), p.ticketResets...)
}

func (p *proxyRecorder) policies() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.authz)
}

// revokeCall is one lineage revocation asked of the CA.
type revokeCall struct {
	id           spiffeid.ID
	keep, reason string
	presented    string // the serial of the certificate that authenticated the call
}

// revokerRecorder stands for the CA's revocation API.
type revokerRecorder struct {
	mu    sync.Mutex
	calls []revokeCall
	err   error
}

func (r *revokerRecorder) RevokeLineage(_ context.Context, cert tls.Certificate, id spiffeid.ID, keep, reason string) ([]string, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	leaf, err := x509.ParseCertificate(cert.Certificate[0])
	if err != nil {
		return nil, err
	}
	r.calls = append(r.calls, revokeCall{id: id, keep: keep, reason: reason, presented: leaf.SerialNumber.String()})
	return []string{"1"}, r.err
}

// fixture is a node's applier over real rotators and a real agents supervisor, with the
// proxy and the CA's revocation API recorded.
type fixture struct {
	ca      *testca.CA
	issuer  *testIssuer
	rot     *rotator.Rotator
	agents  *agents
	px      *proxyRecorder
	revoker *revokerRecorder
	acker   *ackRecorder
	// caAnchors are what the mesh client verifies the CA with.
	caAnchors *meshclient.Anchors
	audit     *auditRecords
	applier   *applier
	kicks     kickCounter // the heartbeat's
}

// newFixture builds the fixture and runs the host's rotator and the agents' supervisor
// until the test ends; call it inside a synctest bubble.
func newFixture(t *testing.T) *fixture {
	t.Helper()
	f := &fixture{ca: testca.New(t), px: &proxyRecorder{}, revoker: &revokerRecorder{}, acker: &ackRecorder{},
		audit: &auditRecords{}}
	f.issuer = &testIssuer{t: t, ca: f.ca}
	logger := slog.New(slog.DiscardHandler)
	f.rot = f.newRotator(t, testHost, prometheus.NewRegistry(), policy.RotationPolicy{}, f.ca.Bundle())
	f.agents = newAgents(testHost, policy.RotationPolicy{}, prometheus.NewRegistry(), func() proxy.Denier { return nil }, logger,
		func(id spiffeid.ID, reg prometheus.Registerer, p policy.RotationPolicy) (*rotator.Rotator, error) {
			// The bundle in force, as the node gives an agent's rotator.
			return f.newRotator(t, id, reg, p, f.applier.bundleInForce()), nil
		})
	f.applier = &applier{rot: f.rot, agents: f.agents, live: f.px, auditor: f.audit, log: logger, fleetCtx: t.Context(),
		rotation: rotation{tickets: f.px, revoker: f.revoker, logger: logger}, started: time.Now(),
		bundles: bundleSources{file: f.ca.Roots()}, anchor: newAnchorFollower(prometheus.NewRegistry())}
	f.applier.anchor.acker = f.acker
	f.applier.heartbeat = &f.kicks
	f.caAnchors = meshclient.NewAnchors(f.ca.Roots())
	f.applier.caAnchors = f.caAnchors
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() { _ = f.rot.Run(ctx) })
	wg.Go(func() { _ = f.agents.Run(ctx) })
	t.Cleanup(func() { cancel(); wg.Wait() })
	synctest.Wait() // the host has enrolled
	return f
}

func (f *fixture) newRotator(t *testing.T, id spiffeid.ID, reg prometheus.Registerer, p policy.RotationPolicy,
	bundle *x509bundle.Bundle) *rotator.Rotator {
	t.Helper()
	r, err := rotator.New(rotator.Config{ID: id, Issuer: f.issuer, Bundle: bundle, Policy: p, Keys: rotator.MemoryKeys{},
		Audit: f.audit, Registerer: reg, Logger: slog.New(slog.DiscardHandler),
		OnRotate: func() { f.applier.onRotate() },
		Drain:    func(context.Context, string, time.Duration) int { return 0 }})
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// register delivers a mesh state with these registration entries and lets the agents'
// supervisor apply it.
func (f *fixture) register(entries ...registration) {
	f.applier.onEntries(entries)
	synctest.Wait()
}

// kickCounter counts the heartbeats asked for.
type kickCounter struct{ n atomic.Int64 }

func (k *kickCounter) Kick() { k.n.Add(1) }

// take returns the kicks since the last call.
func (k *kickCounter) take() int64 { return k.n.Swap(0) }
