package ca

import (
	"cmp"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"slices"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/meshapi"
)

// The fleet status store: what each proxy last reported of itself with its heartbeat
// (meshapi.ProxyStatus), and a per-identity key timeline accumulated from successive
// reports. It feeds the status page only: nothing in it reaches the directory
// document, so peers never see another proxy's keys or readiness.

// Bounds of a proxy's status. It is untrusted input from any host SVID: every string
// and count is bounded before it is kept, and a status out of bounds is dropped whole
// (the registration stands; the page says why).
const (
	maxStatusVersion = meshapi.MaxStatusVersion
	maxStatusText    = meshapi.MaxStatusText // NotReady, an identity's Error
	maxStatusKeys    = meshapi.MaxStatusKeys // keys of one identity in one report
	// maxStatusCause bounds a key's Cause (rotator.Cause: a trigger or a short word).
	maxStatusCause = 64
	// maxTimelineKeys bounds the key versions the timeline keeps per identity (the
	// newest); maxTimelineIdentities the identities (those reported least recently go).
	maxTimelineKeys       = 16
	maxTimelineIdentities = 4096
	// maxStatusHosts bounds the hosts whose reports are kept between two views of the
	// page (each view forgets the hosts gone from the directory); the least recently
	// reported go first.
	maxStatusHosts = 1 << 14
)

// errInvalidStatus marks a ProxyStatus out of bounds.
var errInvalidStatus = errors.New("invalid status")

// keyPhases are the states a proxy may report for a key.
var keyPhases = []audit.KeyPhase{audit.PhasePreActivation, audit.PhaseActive, audit.PhaseOverlap,
	audit.PhaseCompromised, audit.PhaseDestroyed}

// validateProxyStatus checks st against the bounds above: identities in td, unique,
// at most meshapi.MaxProxyStatusIdentities; keys unique by version, in a known state,
// with a canonical serial; times that encode. Pure.
func validateProxyStatus(td spiffeid.TrustDomain, st *meshapi.ProxyStatus) error {
	switch {
	case !boundedText(st.Version, maxStatusVersion):
		return fmt.Errorf("%w: version: at most %d printable ASCII characters", errInvalidStatus, maxStatusVersion)
	case !boundedText(st.NotReady, maxStatusText):
		return fmt.Errorf("%w: not_ready: at most %d printable ASCII characters", errInvalidStatus, maxStatusText)
	case len(st.Identities) > meshapi.MaxProxyStatusIdentities:
		return fmt.Errorf("%w: %d identities, at most %d", errInvalidStatus, len(st.Identities), meshapi.MaxProxyStatusIdentities)
	}
	seen := make(map[string]struct{}, len(st.Identities))
	for i := range st.Identities {
		is := &st.Identities[i]
		id, err := spiffeid.FromString(is.SPIFFEID)
		if err != nil || !id.MemberOf(td) {
			return fmt.Errorf("%w: identity %d: not a SPIFFE ID of %s", errInvalidStatus, i, td.Name())
		}
		if _, dup := seen[is.SPIFFEID]; dup {
			return fmt.Errorf("%w: identity %s reported twice", errInvalidStatus, id)
		}
		seen[is.SPIFFEID] = struct{}{}
		if err := validateIdentityStatus(is); err != nil {
			return fmt.Errorf("%w: identity %s: %w", errInvalidStatus, id, err)
		}
	}
	return nil
}

func validateIdentityStatus(is *meshapi.IdentityStatus) error {
	switch {
	case !boundedText(is.Error, maxStatusText):
		return fmt.Errorf("error: at most %d printable ASCII characters", maxStatusText)
	case !encodableTime(is.RenewAt):
		return errors.New("renew_at out of range")
	case len(is.Keys) > maxStatusKeys:
		return fmt.Errorf("%d keys, at most %d", len(is.Keys), maxStatusKeys)
	}
	versions := make(map[uint64]struct{}, len(is.Keys))
	for _, k := range is.Keys {
		if _, dup := versions[k.Version]; dup {
			return fmt.Errorf("key version %d reported twice", k.Version)
		}
		versions[k.Version] = struct{}{}
		switch {
		case k.Serial != "" && !meshapi.CanonicalSerial(k.Serial):
			return fmt.Errorf("key %d: serial is not a decimal serial number", k.Version)
		case !slices.Contains(keyPhases, audit.KeyPhase(k.State)):
			return fmt.Errorf("key %d: unknown state", k.Version)
		case !boundedText(k.Cause, maxStatusCause):
			return fmt.Errorf("key %d: cause: at most %d printable ASCII characters", k.Version, maxStatusCause)
		case !encodableTime(k.Since) || !encodableTime(k.NotBefore) || !encodableTime(k.NotAfter):
			return fmt.Errorf("key %d: time out of range", k.Version)
		}
	}
	return nil
}

func boundedText(s string, n int) bool { return len(s) <= n && meshapi.Printable(s) }

// encodableTime reports whether t survives a JSON round trip (years 0 to 9999).
func encodableTime(t time.Time) bool { return t.IsZero() || (t.Year() >= 0 && t.Year() <= 9999) }

// hostStatus is what a host last reported.
type hostStatus struct {
	status  *meshapi.ProxyStatus // validated; nil: none, or the last was invalid
	invalid string               // why the last status was dropped ("" when it was not)
	at      time.Time            // when it was reported
}

// stateSince is a key state and when the key entered it, as first reported.
type stateSince struct {
	state audit.KeyPhase
	cause string
	since time.Time
}

// keyTrack is one key version of an identity through its states.
type keyTrack struct {
	serial              string
	notBefore, notAfter time.Time
	states              []stateSince // one per state, in the order first reported
}

// idTimeline is an identity's keys as reported over time.
type idTimeline struct {
	host    spiffeid.ID
	updated time.Time // last report, for eviction
	keys    map[uint64]*keyTrack
}

// fleetStatus is the store. Safe for concurrent use; every method is O(report) or
// O(store) under one mutex, with no I/O.
type fleetStatus struct {
	mu    sync.Mutex
	hosts map[spiffeid.ID]hostStatus
	ids   map[spiffeid.ID]*idTimeline
	// gen counts the changes the page shows; sum is the digest of the document it
	// counted last (statuspagedoc.go).
	gen uint64
	sum [32]byte
	// revokers are who revoked what ("id ID", "serial S"), oldest first in
	// revokerOrder; bounded by maxRevokers.
	revokers     map[string]string
	revokerOrder []string
}

func newFleetStatus() *fleetStatus {
	return &fleetStatus{hosts: map[spiffeid.ID]hostStatus{}, ids: map[spiffeid.ID]*idTimeline{},
		revokers: map[string]string{}}
}

// report stores host's status st (nil: an older proxy that reports none), reported
// at now, after validating it against td. An invalid status is dropped and its error
// returned (the caller logs it); the host's entry then says why.
func (f *fleetStatus) report(td spiffeid.TrustDomain, host spiffeid.ID, st *meshapi.ProxyStatus, now time.Time) error {
	var err error
	if st != nil {
		if err = validateProxyStatus(td, st); err != nil {
			st = nil
		}
	}
	hs := hostStatus{status: st, at: now}
	if err != nil {
		hs.invalid = err.Error()
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, known := f.hosts[host]; !known && len(f.hosts) >= maxStatusHosts {
		delete(f.hosts, oldest(f.hosts, func(h hostStatus) time.Time { return h.at }))
	}
	f.hosts[host] = hs
	if st != nil {
		for _, is := range st.Identities {
			f.track(host, is, now)
		}
	}
	return err
}

// track adds what is reports of its keys to its timeline: each (version, state) keeps
// the Since first reported, so a key's path stays drawn after the proxy stops
// reporting it.
func (f *fleetStatus) track(host spiffeid.ID, is meshapi.IdentityStatus, now time.Time) {
	id := spiffeid.RequireFromString(is.SPIFFEID) // validated
	tl := f.ids[id]
	if tl == nil {
		if len(f.ids) >= maxTimelineIdentities {
			delete(f.ids, oldest(f.ids, func(tl *idTimeline) time.Time { return tl.updated }))
		}
		tl = &idTimeline{keys: map[uint64]*keyTrack{}}
		f.ids[id] = tl
	}
	tl.host, tl.updated = host, now
	for _, k := range is.Keys {
		kt := tl.keys[k.Version]
		if kt == nil {
			kt = &keyTrack{}
			tl.keys[k.Version] = kt
		}
		// The latest certificate of the key, but the pre-activation of its first.
		kt.serial, kt.notAfter = k.Serial, k.NotAfter.UTC()
		if kt.notBefore.IsZero() {
			kt.notBefore = k.NotBefore.UTC()
		}
		if !slices.ContainsFunc(kt.states, func(s stateSince) bool { return s.state == audit.KeyPhase(k.State) }) {
			kt.states = append(kt.states, stateSince{state: audit.KeyPhase(k.State), cause: k.Cause, since: k.Since.UTC()})
		}
	}
	for len(tl.keys) > maxTimelineKeys {
		delete(tl.keys, slices.Min(mapKeys(tl.keys)))
	}
}

// oldest is the key of m whose value is the least recent by at. O(len(m)): called
// only when a bound is reached.
func oldest[V any](m map[spiffeid.ID]V, at func(V) time.Time) spiffeid.ID {
	var id spiffeid.ID
	var t time.Time
	for k, v := range m {
		if id.IsZero() || at(v).Before(t) {
			id, t = k, at(v)
		}
	}
	return id
}

func mapKeys[K cmp.Ordered, V any](m map[K]V) []K {
	out := make([]K, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	return out
}

// forget drops the reports of hosts that are no longer in the directory (expired or
// revoked): the store is never larger than the directory. Their identities' timelines
// stay, bounded by maxTimelineIdentities.
func (f *fleetStatus) forget(live func(spiffeid.ID) bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for h := range f.hosts {
		if !live(h) {
			delete(f.hosts, h)
		}
	}
}

// keySegment is one state of one key on the timeline: from Start to End (zero: still
// in it).
type keySegment struct {
	Version uint64    `json:"version"`
	Serial  string    `json:"serial,omitempty"`
	State   string    `json:"state"`
	Cause   string    `json:"cause,omitempty"`
	Start   time.Time `json:"start"`
	End     time.Time `json:"end,omitzero"`
}

// segments draws kt (version v) as consecutive segments: pre-activation from the
// certificate's NotBefore to the first reported state when it is earlier, then each
// state until the next; a terminal state (destroyed, compromised) is an instant.
// Pure.
func (kt *keyTrack) segments(v uint64) []keySegment {
	states := slices.Clone(kt.states)
	slices.SortStableFunc(states, func(a, b stateSince) int { return a.since.Compare(b.since) })
	var out []keySegment
	if len(states) > 0 && !kt.notBefore.IsZero() && kt.notBefore.Before(states[0].since) &&
		states[0].state != audit.PhasePreActivation {
		out = append(out, keySegment{Version: v, Serial: kt.serial, State: string(audit.PhasePreActivation),
			Start: kt.notBefore, End: states[0].since})
	}
	for i, s := range states {
		seg := keySegment{Version: v, Serial: kt.serial, State: string(s.state), Cause: s.cause, Start: s.since}
		switch {
		case i+1 < len(states):
			seg.End = states[i+1].since
		case s.state == audit.PhaseDestroyed || s.state == audit.PhaseCompromised:
			seg.End = s.since
		default:
			// Still in it: open-ended.
		}
		out = append(out, seg)
	}
	return out
}

// reportStatus stores what a registered host reported of itself; an invalid status
// is logged (at Warn: a proxy bug or a hostile host) and dropped, and the
// registration stands.
func (s *Server) reportStatus(r *http.Request, host spiffeid.ID, st *meshapi.ProxyStatus, now time.Time) {
	if err := s.status.report(s.cfg.TrustDomain, host, st, now); err != nil {
		s.log.LogAttrs(r.Context(), slog.LevelWarn, "proxy status dropped",
			slog.String(keySPIFFEID, host.String()), slog.String(keyErr, err.Error()))
	}
}
