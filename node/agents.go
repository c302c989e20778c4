package node

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/policy"
	"github.com/agentmesh/agentmesh/proxy"
	"github.com/agentmesh/agentmesh/rotator"
)

// agents runs one rotator per agent registered to this host, as the CA's directory lists
// them, and answers the proxy's questions about them (proxy.Agents): which agent a local
// uid is, which agent listens on a local port. Each agent identity has its own keys,
// versions, overlap and audit trail, like the host's.
type agents struct {
	host     spiffeid.ID
	newRot   func(id spiffeid.ID, reg prometheus.Registerer, p policy.RotationPolicy) (*rotator.Rotator, error)
	rotation atomic.Pointer[policy.RotationPolicy] // the rotation policy in force, for new agents too
	denyList func() proxy.Denier
	reg      prometheus.Registerer
	logger   *slog.Logger

	changed  chan struct{} // entries arrived; buffered 1
	mu       sync.Mutex
	entries  []registration // the latest directory entries; guarded by mu
	received bool           // the directory answered once; guarded by mu
	running  map[spiffeid.ID]*agentRun
	snap     atomic.Pointer[agentSnapshot]
}

var (
	// errEntriesPending: the directory has not answered yet, so the agents this host must
	// hold are not known.
	errEntriesPending = errors.New("agents: registration entries not received from the directory yet")
	// errAgentPending: an agent is registered to this host and its rotator not started
	// (just registered, or it failed to start).
	errAgentPending = errors.New("identity not started")
)

// agentRun is one registered agent and its rotator.
type agentRun struct {
	entry  registration
	rot    *rotator.Rotator
	reg    *ownedMetrics
	cancel context.CancelFunc
	done   chan struct{}
}

// agentSnapshot is what the proxy's hot path reads; immutable once published.
type agentSnapshot struct {
	byID   map[spiffeid.ID]*agentRun
	byUID  map[uint32]*agentRun
	byPort map[uint16]spiffeid.ID
}

func newAgents(host spiffeid.ID, rotation policy.RotationPolicy, reg prometheus.Registerer, denyList func() proxy.Denier,
	logger *slog.Logger, newRot func(spiffeid.ID, prometheus.Registerer, policy.RotationPolicy) (*rotator.Rotator, error)) *agents {
	a := &agents{host: host, newRot: newRot, denyList: denyList, reg: reg, logger: logger,
		changed: make(chan struct{}, 1), running: map[spiffeid.ID]*agentRun{}}
	a.rotation.Store(&rotation)
	a.snap.Store(&agentSnapshot{byID: map[spiffeid.ID]*agentRun{}})
	return a
}

// ByUID implements proxy.Agents.
func (a *agents) ByUID(uid uint32) (spiffeid.ID, proxy.Credentials, bool) {
	r, ok := a.snap.Load().byUID[uid]
	if !ok {
		return spiffeid.ID{}, nil, false
	}
	return r.entry.ID, r.rot, true
}

// ByPort implements proxy.Agents.
func (a *agents) ByPort(port uint16) (spiffeid.ID, bool) {
	id, ok := a.snap.Load().byPort[port]
	return id, ok
}

// update takes the directory's entries (from its goroutine) for Run to apply.
func (a *agents) update(entries []registration) {
	a.mu.Lock()
	a.entries, a.received = entries, true
	a.mu.Unlock()
	select {
	case a.changed <- struct{}{}:
	default:
	}
}

// Run applies entry changes until ctx is done, then stops every agent's rotator.
func (a *agents) Run(ctx context.Context) error {
	for {
		select {
		case <-ctx.Done():
			for _, r := range a.running {
				r.cancel()
				<-r.done
			}
			return nil
		case <-a.changed:
			a.mu.Lock()
			entries := a.entries
			a.mu.Unlock()
			a.apply(ctx, entries)
		}
	}
}

// apply starts a rotator for each entry of this host that has none and stops those whose
// entry is gone: their SVIDs are dropped (their connections closed at once, their keys
// destroyed) before the rotator ends, so an unregistered agent holds nothing.
func (a *agents) apply(ctx context.Context, entries []registration) {
	want := map[spiffeid.ID]registration{}
	for _, e := range entries {
		if e.Host == a.host {
			want[e.ID] = e
		}
	}
	for id, r := range a.running {
		if _, ok := want[id]; ok {
			continue
		}
		r.rot.Revoke(func(spiffeid.ID, string, time.Time) bool { return true })
		r.cancel()
		<-r.done
		r.reg.unregister()
		delete(a.running, id)
		a.logger.Info("agent unregistered", "agent", id)
	}
	for id, e := range want {
		if r, ok := a.running[id]; ok {
			// A copy: published snapshots keep reading the one they hold.
			moved := *r
			moved.entry = e
			a.running[id] = &moved
			continue
		}
		if r := a.start(ctx, e); r != nil {
			a.running[id] = r
		}
	}
	snap := &agentSnapshot{byID: maps.Clone(a.running), byUID: map[uint32]*agentRun{}, byPort: map[uint16]spiffeid.ID{}}
	for _, r := range a.running {
		snap.byUID[r.entry.UID] = r
		if r.entry.Port != 0 {
			snap.byPort[r.entry.Port] = r.entry.ID
		}
	}
	a.snap.Store(snap)
}

// start makes and runs the rotator of a newly registered agent; nil when it could not
// be made (logged; the agent stays not ready).
func (a *agents) start(ctx context.Context, e registration) *agentRun {
	reg := &ownedMetrics{reg: a.reg}
	rot, err := a.newRot(e.ID, reg, *a.rotation.Load())
	if err != nil {
		reg.unregister()
		a.logger.Error("agent identity not started", "agent", e.ID, "err", err)
		return nil
	}
	if l := a.denyList(); l != nil {
		rot.Revoke(l.Denies)
	}
	rctx, cancel := context.WithCancel(ctx)
	r := &agentRun{entry: e, rot: rot, reg: reg, cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(r.done)
		_ = rot.Run(rctx)
	}()
	a.logger.Info("agent registered", "agent", e.ID, "uid", e.UID, "port", e.Port)
	return r
}

// ready returns nil once the directory has answered and every agent it registers to this
// host holds a valid SVID. It reads the latest entries, not those Run applied last, so an
// agent registered a moment ago makes the proxy not ready until its identity is enrolled:
// a client that waits for /readyz never races an enrolment.
func (a *agents) ready() error {
	a.mu.Lock()
	entries, received := a.entries, a.received
	a.mu.Unlock()
	if !received {
		return errEntriesPending
	}
	byID := a.snap.Load().byID
	var errs []error
	for _, e := range entries {
		if e.Host != a.host {
			continue
		}
		r, ok := byID[e.ID]
		if !ok {
			errs = append(errs, fmt.Errorf("agent %s: %w", e.ID, errAgentPending))
			continue
		}
		if err := r.rot.Ready(); err != nil {
			errs = append(errs, fmt.Errorf("agent %s: %w", e.ID, err))
		}
	}
	return errors.Join(errs...)
}

// revoke hands a deny-list to every agent's rotator and returns how many SVIDs they
// dropped.
func (a *agents) revoke(denied func(spiffeid.ID, string, time.Time) bool) int {
	n := 0
	for _, rot := range a.rotators() {
		n += rot.Revoke(denied)
	}
	return n
}

// setBundle makes b the trust bundle of every running agent's rotator; agents started
// later take the host's bundle in force (newAgentRotator).
func (a *agents) setBundle(b *x509bundle.Bundle) error {
	var errs []error
	for _, rot := range a.rotators() {
		errs = append(errs, rot.SetBundle(b))
	}
	return errors.Join(errs...)
}

// setRotation makes p the rotation policy of every agent, present and future.
func (a *agents) setRotation(p policy.RotationPolicy) error {
	a.rotation.Store(&p)
	var errs []error
	for _, rot := range a.rotators() {
		errs = append(errs, rot.SetPolicy(p))
	}
	return errors.Join(errs...)
}

// lookup returns the rotator of the local agent id.
func (a *agents) lookup(id spiffeid.ID) (*rotator.Rotator, bool) {
	r, ok := a.snap.Load().byID[id]
	if !ok {
		return nil, false
	}
	return r.rot, true
}

// rotators returns the agents' rotators, sorted by identity.
func (a *agents) rotators() []*rotator.Rotator {
	runs := slices.Collect(maps.Values(a.snap.Load().byID))
	slices.SortFunc(runs, func(x, y *agentRun) int { return strings.Compare(x.entry.ID.String(), y.entry.ID.String()) })
	out := make([]*rotator.Rotator, len(runs))
	for i, r := range runs {
		out[i] = r.rot
	}
	return out
}

// statuses lists the agents' rotator states, by identity.
func (a *agents) statuses() []rotator.Status {
	rots := a.rotators()
	out := make([]rotator.Status, len(rots))
	for i, rot := range rots {
		out[i] = rot.Status()
	}
	return out
}

// ownedMetrics registers with reg and remembers what it registered, so an agent's
// metrics go when the agent does.
type ownedMetrics struct {
	reg prometheus.Registerer
	mu  sync.Mutex
	cs  []prometheus.Collector
}

func (c *ownedMetrics) Register(col prometheus.Collector) error {
	if err := c.reg.Register(col); err != nil {
		return err
	}
	c.mu.Lock()
	c.cs = append(c.cs, col)
	c.mu.Unlock()
	return nil
}

func (c *ownedMetrics) MustRegister(cols ...prometheus.Collector) {
	for _, col := range cols {
		if err := c.Register(col); err != nil {
			panic(err)
		}
	}
}

func (c *ownedMetrics) Unregister(col prometheus.Collector) bool { return c.reg.Unregister(col) }

func (c *ownedMetrics) unregister() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, col := range c.cs {
		c.reg.Unregister(col)
	}
	c.cs = nil
}
