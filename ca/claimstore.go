package ca

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/agentmesh/agentmesh/meshapi"
	"io/fs"
	"log/slog"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/internal/atomicfile"
)

// metricClaimsRefused counts refused address claims, by reason.
const (
	metricClaimsRefused = "agentmesh_ca_address_claims_refused_total"
	metricClaimsLearnt  = "agentmesh_ca_address_claims_learnt_total"
)

// claimsFile is the format of StateDir/claims.json.
type claimsFile struct {
	Hosts []meshapi.HostClaim `json:"hosts"`
}

// claimMetrics always exist, so that nothing checks for nil; New registers them only
// when Config.Registerer is set.
type claimMetrics struct {
	refused *prometheus.CounterVec
	learnt  prometheus.Counter
}

func newClaimMetrics() *claimMetrics {
	m := &claimMetrics{
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: metricClaimsRefused,
			Help: "Address claims refused: directory registrations claiming an address their host may not, and operators' claim changes, by reason.",
		}, []string{labelReason}),
		learnt: prometheus.NewCounter(prometheus.CounterOpts{
			Name: metricClaimsLearnt,
			Help: "Address claims learnt at a host's first directory registration.",
		}),
	}
	// Pre-create the series so dashboards see zeros instead of gaps.
	for _, r := range claimReasons {
		m.refused.WithLabelValues(string(r))
	}
	return m
}

// decodeClaims parses the content of StateDir/claims.json for trust domain td: strict
// JSON, every claim valid and in normal form, no host twice, no overlap.
func decodeClaims(td spiffeid.TrustDomain, b []byte) (*claimSet, error) {
	var f claimsFile
	if err := meshapi.DecodeStrict(bytes.NewReader(b), &f); err != nil {
		return nil, err
	}
	for _, c := range f.Hosts {
		n, err := checkHostClaim(td, c)
		if err != nil {
			return nil, err
		}
		if !slices.Equal(n.Prefixes, c.Prefixes) {
			return nil, invalidClaim("prefixes of %s are not sorted and unique", c.Host)
		}
	}
	return newClaimSet(f.Hosts)
}

// parseClaimsFile is decodeClaims for the claims file at path; its errors name path.
func parseClaimsFile(td spiffeid.TrustDomain, path string, b []byte) (*claimSet, error) {
	set, err := decodeClaims(td, b)
	if err != nil {
		return nil, fmt.Errorf("address claims %s: %w", path, err)
	}
	return set, nil
}

// loadClaims reads StateDir/claims.json (none: no claims yet). A file that does not
// parse or breaks the rules stops New, as entries.json does: it is written atomically,
// so it was edited by hand or tampered with, and starting without it would let any
// host claim any address.
func (s *Server) loadClaims() error {
	path := filepath.Join(s.cfg.StateDir, fileClaims)
	set := &claimSet{sorted: []meshapi.HostClaim{}, byHost: map[spiffeid.ID]meshapi.HostClaim{}}
	b, err := os.ReadFile(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
	case err != nil:
		return fmt.Errorf("read address claims: %w", err)
	default:
		if set, err = parseClaimsFile(s.cfg.TrustDomain, path, b); err != nil {
			return err
		}
	}
	s.claims.Store(set)
	s.log.Info("address claims loaded", keyHosts, len(set.sorted))
	return nil
}

// storeClaims persists next and puts it in force. The caller holds claimsMu for writing.
func (s *Server) storeClaims(next *claimSet) error {
	b, err := json.Marshal(claimsFile{Hosts: next.sorted})
	if err != nil {
		return fmt.Errorf("ca: address claims: %w", err)
	}
	// 0600, like entries.json: the map of hosts to addresses is the operator's business.
	if err := atomicfile.Write(filepath.Join(s.cfg.StateDir, fileClaims), b, 0o600); err != nil {
		return fmt.Errorf("ca: address claims: %w", err)
	}
	s.claims.Store(next)
	return nil
}

// registerClaimed puts reg, from a request whose source address was from, in the
// directory if every address it advertises is inside its host's claim, learning the
// claim first at the host's first registration (see claimSet.learn). A refusal is a
// *claimError; it changes nothing. Errors of the directory itself (ErrRevoked,
// *conflictError) are returned as they are. What it did to claims is audited (and a
// refusal counted) once the locks are released.
func (s *Server) registerClaimed(ctx context.Context, reg registration, from netip.Addr, now time.Time) (uint64, error) {
	version, out, err := s.applyClaimed(reg, from, now)
	// The registration's ID and serial are its mTLS caller's (handleRegister).
	rec := claimRecord(audit.Actor{Initiator: reg.ID.String(), CallerSerial: reg.Serial}, out.action, reg.ID, out.claim, from)
	switch {
	case out.err != nil:
		s.claimRefused(ctx, rec, out.err)
	case out.learnt:
		rec.Address = from.String()
		s.audit(rec)
		s.claims.metrics.learnt.Inc()
		s.log.LogAttrs(ctx, slog.LevelInfo, "address claim learnt", slog.String(keySPIFFEID, reg.ID.String()),
			slog.Any(keyPrefixes, rec.Allowed), slog.String(keyRemoteAddr, from.String()))
	}
	return version, err
}

// claimOutcome is what a registration did to claims: the claim checked or learnt,
// and the claim's error (a refusal, or a claim that could not be written).
type claimOutcome struct {
	action claimAction
	claim  meshapi.HostClaim
	learnt bool
	err    error
}

// applyClaimed is registerClaimed without the audit. The claim lock is held across the
// check and the directory update (for reading; for writing when a claim is learnt),
// so that an operator's change (write-locked, then dropping the entry outside the new
// claim) cannot slip between them and leave behind an entry the new claim refuses.
func (s *Server) applyClaimed(reg registration, from netip.Addr, now time.Time) (uint64, claimOutcome, error) {
	s.claims.mu.RLock()
	set := s.claims.Load()
	if c, ok := set.byHost[reg.ID]; ok {
		defer s.claims.mu.RUnlock()
		return s.registerWithin(set, c, reg, now)
	}
	s.claims.mu.RUnlock()

	s.claims.mu.Lock()
	defer s.claims.mu.Unlock()
	set = s.claims.Load()
	if c, ok := set.byHost[reg.ID]; ok { // learnt by a concurrent registration
		return s.registerWithin(set, c, reg, now)
	}
	c, err := set.learn(reg.ID, from, reg.Addresses, now)
	var next *claimSet
	if err == nil {
		next, err = set.with(c)
	}
	if err == nil {
		// Written under the lock, as entries are: each change builds on the last one
		// persisted. Learning happens once per host.
		err = s.storeClaims(next)
	}
	if err != nil {
		return 0, claimOutcome{action: claimActionLearn, err: err}, err
	}
	_, version, err := s.dir.register(reg, now)
	return version, claimOutcome{action: claimActionLearn, claim: c, learnt: true}, err
}

// registerWithin is applyClaimed for a host whose claim is c in set.
func (s *Server) registerWithin(set *claimSet, c meshapi.HostClaim, reg registration, now time.Time) (uint64, claimOutcome, error) {
	out := claimOutcome{action: claimActionClaim, claim: c}
	if out.err = set.check(c, reg.Addresses); out.err != nil {
		return 0, out, out.err
	}
	_, version, err := s.dir.register(reg, now)
	return version, out, err
}

// claimRecord is the audit record of a claim action on host, whose claim is c (zero:
// none), by actor; from is the caller's address on the mesh API.
func claimRecord(actor audit.Actor, action claimAction, host spiffeid.ID, c meshapi.HostClaim, from netip.Addr) audit.AddressClaim {
	rec := audit.AddressClaim{Actor: actor, Action: string(action), Result: string(claimOK)}
	if !host.IsZero() {
		rec.Host = host.String()
	}
	if len(c.Prefixes) > 0 {
		rec.Allowed = c.PrefixStrings()
	}
	if from.IsValid() {
		rec.PeerAddr = from.String()
	}
	return rec
}

// claimRefused audits, counts and logs a refused claim: rec completed with err's reason,
// address and holder. Errors that are not a *claimError are audited as failures.
func (s *Server) claimRefused(ctx context.Context, rec audit.AddressClaim, err error) {
	var ce *claimError
	if !errors.As(err, &ce) {
		rec.Result, rec.Error = string(claimFailed), err.Error()
		s.audit(rec)
		s.log.LogAttrs(ctx, slog.LevelError, "address claim failed", slog.String(keyHost, rec.Host), slog.String(keyErr, err.Error()))
		return
	}
	rec.Result, rec.Reason, rec.Error, rec.Address = string(claimRefused), string(ce.reason), err.Error(), ce.addr
	if !ce.owner.IsZero() {
		rec.Owner = ce.owner.String()
	}
	s.audit(rec)
	s.claims.metrics.refused.WithLabelValues(string(ce.reason)).Inc()
	s.log.LogAttrs(ctx, slog.LevelWarn, "address claim refused", slog.String(keyInitiator, rec.Initiator),
		slog.String(keyHost, rec.Host), slog.String(keyReason, rec.Reason), slog.String(keyAddress, ce.addr),
		slog.String(keyClaimedBy, rec.Owner), slog.String(keyRemoteAddr, rec.PeerAddr))
}

// dropOutside removes the live directory entry of c.Host when it advertises an address
// outside c, so that an operator's change takes effect at once rather than at the
// entry's expiry. Entries of other hosts are untouched: claims never overlap.
func (r *registry) dropOutside(c meshapi.HostClaim) {
	r.mu.Lock()
	before := r.state.version
	e, ok := r.state.entries[c.Host]
	drop := ok && slices.ContainsFunc(e.Addresses, func(a netip.Addr) bool { return !c.Allows(a) })
	if drop {
		delete(r.state.entries, c.Host)
		for _, a := range e.Addresses {
			delete(r.state.owners, a)
		}
		r.state.version++
	}
	r.publishedLocked(before)
	version := r.state.version
	r.mu.Unlock()
	if drop {
		r.log.Info("directory peer removed: address claim changed", keySPIFFEID, c.Host.String(),
			keyAddresses, e.Addresses, keyVersion, version)
	}
}

// remoteAddr is the address a request came from, unmapped; the zero Addr when the
// server cannot tell (it never learns from that: the zero Addr is not loopback and
// no proxy advertises it).
func remoteAddr(r *http.Request) netip.Addr {
	ap, err := netip.ParseAddrPort(r.RemoteAddr)
	if err != nil {
		return netip.Addr{}
	}
	return ap.Addr().Unmap()
}
