package ca

import (
	"cmp"
	"fmt"
	"github.com/agentmesh/agentmesh/meshapi"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Address claims: which addresses the proxy of a host may advertise in the mesh
// directory. Without them any host SVID could claim another host's address and draw its
// traffic. A host's claim is set by an operator (`agentmesh register HOST --addr CIDR`)
// or learnt once, at the host's first registration, from the address its mTLS request
// came from; then it is fixed until an operator changes or removes it. Claims of two
// hosts never overlap. They are written to StateDir/claims.json before they take effect,
// so a restarted CA refuses the same foreign claims. See docs/directory.md.

// claimReason says why a claim or a claim change was refused: the audit record's
// reason and the refusal metric's label.
type claimReason string

const (
	reasonOutsideClaim   claimReason = "outside_claim"     // an address outside the host's claim
	reasonForeignAddress claimReason = "foreign_address"   // an address inside another host's claim
	reasonUnverified     claimReason = "unverified_source" // nothing to learn: the host connected from an address it does not advertise
	reasonOverlap        claimReason = "overlap"           // an operator's prefix overlapping another host's claim
	reasonInvalidClaim   claimReason = "invalid"           // a malformed host or prefix
	reasonNoClaim        claimReason = "not_found"         // removing a claim that does not exist
	reasonNotAdmin       claimReason = "not_admin"         // a caller of the admin socket neither root nor the CA's user
)

var claimReasons = []claimReason{reasonOutsideClaim, reasonForeignAddress, reasonUnverified,
	reasonOverlap, reasonInvalidClaim, reasonNoClaim}

// claimAction is the audit record's action.
type claimAction string

const (
	claimActionRegister   claimAction = "register"   // an operator set a host's claim
	claimActionUnregister claimAction = "unregister" // an operator removed it
	claimActionLearn      claimAction = "learn"      // learnt at the host's first registration
	claimActionClaim      claimAction = "claim"      // a registration's addresses checked (audited when refused)
)

// claimResult is the audit record's result.
type claimResult string

const (
	claimOK      claimResult = "ok"
	claimRefused claimResult = "refused"
	claimFailed  claimResult = "error"
)

// claimError is a refused claim. It wraps ErrClaimConflict, ErrClaimNotAllowed,
// ErrInvalidRequest or ErrEntryNotFound, which set the HTTP status.
type claimError struct {
	reason claimReason
	addr   string      // the address or prefix refused
	owner  spiffeid.ID // who holds it, for a conflict
	msg    string
	err    error
}

func (e *claimError) Error() string { return e.err.Error() + ": " + e.msg }
func (e *claimError) Unwrap() error { return e.err }

func invalidClaim(format string, a ...any) *claimError {
	return &claimError{reason: reasonInvalidClaim, msg: fmt.Sprintf(format, a...), err: ErrInvalidRequest}
}

// ParseClaimPrefix parses an address range a host may claim, as `agentmesh register
// HOST --addr` takes it: a CIDR prefix (10.0.0.0/24, fd00::/64) or one address
// (10.0.0.1, meaning 10.0.0.1/32). IPv4-mapped IPv6 is unmapped. Refused: host bits
// set (10.0.0.1/24 is ambiguous), a zone, /0, a multicast prefix, one unspecified
// address. Errors wrap ErrInvalidRequest.
func ParseClaimPrefix(s string) (netip.Prefix, error) {
	if !strings.Contains(s, "/") {
		a, err := netip.ParseAddr(s)
		if err != nil {
			return netip.Prefix{}, invalidClaim("address %q: %v", s, err)
		}
		if a.Zone() != "" {
			return netip.Prefix{}, invalidClaim("address %s has a zone", a)
		}
		return checkClaimPrefix(netip.PrefixFrom(a.Unmap(), a.Unmap().BitLen()))
	}
	p, err := netip.ParsePrefix(s)
	if err != nil {
		return netip.Prefix{}, invalidClaim("prefix %q: %v", s, err)
	}
	if p.Addr().Is4In6() {
		if p.Bits() < 96 {
			return netip.Prefix{}, invalidClaim("prefix %s mixes IPv4-mapped and IPv6 addresses", p)
		}
		p = netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96)
	}
	return checkClaimPrefix(p)
}

// checkClaimPrefix refuses what ParseClaimPrefix refuses, for prefixes already parsed
// (claims.json).
func checkClaimPrefix(p netip.Prefix) (netip.Prefix, error) {
	a := p.Addr()
	switch {
	case !p.IsValid():
		return netip.Prefix{}, invalidClaim("invalid prefix %q", p)
	case a.Zone() != "" || a.Is4In6():
		return netip.Prefix{}, invalidClaim("prefix %s is zoned or IPv4-mapped", p)
	case p.Bits() == 0:
		return netip.Prefix{}, invalidClaim("prefix %s would allow every address", p)
	case p != p.Masked():
		return netip.Prefix{}, invalidClaim("prefix %s has host bits set: %s or %s/%d", p, p.Masked(), a, a.BitLen())
	case a.IsMulticast():
		return netip.Prefix{}, invalidClaim("prefix %s is multicast", p)
	case a.IsUnspecified() && p.IsSingleIP():
		return netip.Prefix{}, invalidClaim("address %s is unspecified", a)
	}
	return p, nil
}

// hostPrefix is a's own prefix: /32 or /128.
func hostPrefix(a netip.Addr) netip.Prefix { return netip.PrefixFrom(a, a.BitLen()) }

// checkHostClaim validates c for trust domain td and normalises its prefixes (sorted,
// unique).
func checkHostClaim(td spiffeid.TrustDomain, c meshapi.HostClaim) (meshapi.HostClaim, error) {
	switch {
	case c.Host.IsZero() || !c.Host.MemberOf(td) || !oneSegment(c.Host.Path(), meshapi.HostPathPrefix):
		return c, invalidClaim("host %q is not spiffe://%s%sNAME", c.Host, td.Name(), meshapi.HostPathPrefix)
	case len(c.Prefixes) == 0 || len(c.Prefixes) > meshapi.MaxAddresses:
		return c, invalidClaim("prefixes: need 1 to %d, got %d", meshapi.MaxAddresses, len(c.Prefixes))
	case c.Source != meshapi.ClaimAdmin && c.Source != meshapi.ClaimLearnt:
		return c, invalidClaim("source %q is neither %s nor %s", c.Source, meshapi.ClaimAdmin, meshapi.ClaimLearnt)
	}
	for _, p := range c.Prefixes {
		if _, err := checkClaimPrefix(p); err != nil {
			return c, err
		}
	}
	c.Prefixes = slices.Clone(c.Prefixes)
	slices.SortFunc(c.Prefixes, comparePrefixes)
	c.Prefixes = slices.Compact(c.Prefixes)
	return c, nil
}

func comparePrefixes(a, b netip.Prefix) int {
	return cmp.Or(a.Addr().Compare(b.Addr()), cmp.Compare(a.Bits(), b.Bits()))
}

// claimSet is the claims in force, one per host, no two hosts' overlapping.
// Immutable: changes build a new set. Pure: no clock, no lock, no I/O.
type claimSet struct {
	sorted []meshapi.HostClaim // by host
	byHost map[spiffeid.ID]meshapi.HostClaim
}

// newClaimSet indexes claims, refusing a host listed twice or prefixes of two hosts
// that overlap. It does not validate them (checkHostClaim).
func newClaimSet(claims []meshapi.HostClaim) (*claimSet, error) {
	s, err := indexClaims(claims)
	if err != nil {
		return nil, err
	}
	return s, s.disjoint()
}

// indexClaims indexes claims, refusing a host listed twice, without the overlap check.
func indexClaims(claims []meshapi.HostClaim) (*claimSet, error) {
	s := &claimSet{byHost: make(map[spiffeid.ID]meshapi.HostClaim, len(claims))}
	for _, c := range claims {
		if _, dup := s.byHost[c.Host]; dup {
			return nil, invalidClaim("host %s listed twice", c.Host)
		}
		s.byHost[c.Host] = c
	}
	// Never nil, so that an empty set is written and listed as [] rather than null.
	s.sorted = append([]meshapi.HostClaim{}, slices.SortedFunc(slices.Values(claims), compareClaims)...)
	return s, nil
}

func compareClaims(a, b meshapi.HostClaim) int { return cmp.Compare(a.Host.String(), b.Host.String()) }

// disjoint refuses prefixes of two hosts that overlap, in O(n log n) for n prefixes:
// two prefixes overlap only when one contains the other, so in the order of their first
// address, q overlaps an earlier prefix exactly when the earlier one reaching furthest
// contains q's first address; with no overlap so far, every earlier prefix containing it
// is of one host, that one's.
func (s *claimSet) disjoint() error {
	type owned struct {
		p    netip.Prefix
		host spiffeid.ID
	}
	var all []owned
	for _, c := range s.sorted {
		for _, p := range c.Prefixes {
			all = append(all, owned{p, c.Host})
		}
	}
	slices.SortFunc(all, func(a, b owned) int { return comparePrefixes(a.p, b.p) })
	var reach owned // the earlier prefix whose last address is the highest
	for _, q := range all {
		if reach.p.IsValid() && reach.p.Contains(q.p.Addr()) {
			if reach.host != q.host {
				return overlapError(q.p, reach.p, reach.host)
			}
			continue // nested in reach, so it reaches no further
		}
		reach = q
	}
	return nil
}

func overlapError(p, q netip.Prefix, owner spiffeid.ID) *claimError {
	return &claimError{reason: reasonOverlap, addr: p.String(), owner: owner, err: ErrClaimConflict,
		msg: fmt.Sprintf("%s overlaps %s, which %s may claim", p, q, owner)}
}

// overlap refuses c when a prefix of it overlaps one of another host's claim: a pass
// over every claim, run only when a claim changes (an operator's command, a host's
// first registration), never on a heartbeat.
func (s *claimSet) overlap(c meshapi.HostClaim) error {
	for _, o := range s.sorted {
		if o.Host == c.Host {
			continue
		}
		for _, p := range c.Prefixes {
			for _, q := range o.Prefixes {
				if p.Overlaps(q) {
					return overlapError(p, q, o.Host)
				}
			}
		}
	}
	return nil
}

// with returns s with c as its host's claim (replacing any), or the overlap.
func (s *claimSet) with(c meshapi.HostClaim) (*claimSet, error) {
	if err := s.overlap(c); err != nil {
		return nil, err
	}
	next := slices.DeleteFunc(slices.Clone(s.sorted), func(o meshapi.HostClaim) bool { return o.Host == c.Host })
	return indexClaims(append(next, c))
}

// without returns s minus host's claim and that claim.
func (s *claimSet) without(host spiffeid.ID) (*claimSet, meshapi.HostClaim, error) {
	old, ok := s.byHost[host]
	if !ok {
		return nil, meshapi.HostClaim{}, &claimError{reason: reasonNoClaim, err: ErrEntryNotFound,
			msg: fmt.Sprintf("no address claim for %s", host)}
	}
	next, err := indexClaims(slices.DeleteFunc(slices.Clone(s.sorted), func(o meshapi.HostClaim) bool { return o.Host == host }))
	return next, old, err
}

// owner returns the claim allowing a, if any (at most one: claims do not overlap).
func (s *claimSet) owner(a netip.Addr) (meshapi.HostClaim, bool) {
	for _, c := range s.sorted {
		if c.Allows(a) {
			return c, true
		}
	}
	return meshapi.HostClaim{}, false
}

// check refuses addrs unless every one is inside c. It scans the other claims only to
// name the holder of a refused address, so an allowed heartbeat costs a few prefix
// comparisons.
func (s *claimSet) check(c meshapi.HostClaim, addrs []netip.Addr) error {
	for _, a := range addrs {
		if c.Allows(a) {
			continue
		}
		if o, ok := s.owner(a); ok {
			return foreignAddress(a, o.Host)
		}
		return &claimError{reason: reasonOutsideClaim, addr: a.String(), err: ErrClaimNotAllowed,
			msg: fmt.Sprintf("address %s is outside the addresses %s may claim (%v): an operator changes them with agentmesh register %s --addr CIDR",
				a, c.Host, c.PrefixStrings(), c.Host)}
	}
	return nil
}

// learn returns the claim host's first registration teaches, advertising addrs from
// the connection's source address from, or why there is nothing to learn:
//
//   - from a loopback address, the proxy runs on the CA's own machine, where every local
//     proxy connects from loopback whatever it advertises: the source tells them apart no
//     better than the advertised addresses do, so those are learnt (first come);
//   - from any other address, the claim is that address alone, and only when the host
//     advertises it and nothing else: a host reached at other addresses than the one it
//     reaches the CA from (several interfaces, NAT, a load balancer before the CA)
//     needs an operator's claim.
//
// An address another host may claim is never learnt.
func (s *claimSet) learn(host spiffeid.ID, from netip.Addr, addrs []netip.Addr, now time.Time) (meshapi.HostClaim, error) {
	c := meshapi.HostClaim{Host: host, Source: meshapi.ClaimLearnt, From: from, At: now.UTC().Round(0)}
	for _, a := range addrs {
		if o, ok := s.owner(a); ok {
			return c, foreignAddress(a, o.Host)
		}
	}
	switch {
	case from.IsLoopback():
		for _, a := range addrs {
			c.Prefixes = append(c.Prefixes, hostPrefix(a))
		}
	case len(addrs) > 0 && !slices.ContainsFunc(addrs, func(a netip.Addr) bool { return a != from }):
		c.Prefixes = []netip.Prefix{hostPrefix(from)}
	default:
		return c, &claimError{reason: reasonUnverified, addr: from.String(), err: ErrClaimNotAllowed,
			msg: fmt.Sprintf("%s has no address claim and registered from %s advertising %v: only the address it connects from is learnt; an operator sets others with agentmesh register %s --addr CIDR",
				host, from, addrs, host)}
	}
	slices.SortFunc(c.Prefixes, comparePrefixes)
	c.Prefixes = slices.Compact(c.Prefixes)
	return c, nil
}

func foreignAddress(a netip.Addr, owner spiffeid.ID) *claimError {
	return &claimError{reason: reasonForeignAddress, addr: a.String(), owner: owner, err: ErrClaimConflict,
		msg: fmt.Sprintf("address %s may be claimed only by %s", a, owner)}
}
