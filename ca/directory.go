package ca

import (
	"cmp"
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"github.com/agentmesh/agentmesh/meshapi"
	"log/slog"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// registration is a validated register request: what a proxy claims, under the ID
// its certificate proves. Addresses are unmapped, zone-less, sorted and unique.
type registration struct {
	meshapi.HostRegistration
	// Serial is the serial of the certificate the proxy registered with, so that
	// revoking that certificate removes the entry. Not material: peers do not see it.
	Serial string
	// NotBefore is that certificate's, so that revoking the identity removes the
	// entry only when the certificate was issued before the revocation.
	NotBefore time.Time
}

// material reports whether r and o differ in what peers route by (not the bundle
// version, which only the CA reads).
func (r registration) material(o registration) bool {
	return !slices.Equal(r.Addresses, o.Addresses) || r.TunnelPort != o.TunnelPort ||
		!slices.Equal(r.Transports, o.Transports)
}

// dirEntry is a registration and when it was last refreshed.
type dirEntry struct {
	registration
	lastSeen time.Time
}

// conflictError refuses a registration claiming an address another live entry holds.
type conflictError struct {
	addr  netip.Addr
	owner spiffeid.ID
}

func (e *conflictError) Error() string {
	return fmt.Sprintf("address %s is registered by %s", e.addr, e.owner)
}

// registerResult says what a registration changed.
type registerResult int

const (
	regHeartbeat registerResult = iota // known entry, nothing material changed
	regNew                             // entry added
	regChanged                         // addresses, port or transports changed
)

// dirState is the registry's pure core: no clock, no lock, no I/O. An entry is live
// while now < lastSeen + ttl. Every material change increments version.
type dirState struct {
	ttl      time.Duration
	version  uint64
	entries  map[spiffeid.ID]*dirEntry
	owners   map[netip.Addr]spiffeid.ID
	earliest time.Time // no entry expires before this; zero when there are none
	// deny is the deny-list in force (nil: none) and revocations its signed form,
	// served with the directory. No entry it denies is kept or admitted.
	deny        *meshapi.DenyList
	revocations *meshapi.SignedDenyList
	// rotation is the latest fleet rotation (nil: none), served as is. Immutable.
	rotation *meshapi.FleetRotation
	// registered are the registration entries, sorted by ID. Immutable.
	registered []meshapi.Entry
	// bundle is the trust bundle (the CA's roots), nil: none. Immutable.
	bundle *meshapi.BundleDocument
	// anchor is the step of a trust-anchor rotation proxies converge to, nil: none.
	// Immutable.
	anchor *meshapi.AnchorRotation
}

// newDirState returns an empty registry at version seed. The caller seeds it from the
// wall clock in microseconds, so that versions keep increasing across CA restarts
// (each change takes far more than a microsecond) and proxies, which never accept an
// older version than the one they hold, accept the restarted CA's directory.
func newDirState(seed uint64, ttl time.Duration) *dirState {
	return &dirState{
		ttl:     ttl,
		version: max(seed, 1),
		entries: make(map[spiffeid.ID]*dirEntry),
		owners:  make(map[netip.Addr]spiffeid.ID),
	}
}

func (s *dirState) deadline(e *dirEntry) time.Time { return e.lastSeen.Add(s.ttl) }

// expire drops the entries not refreshed within ttl before now and returns them. Cheap
// when nothing can have expired yet.
func (s *dirState) expire(now time.Time) []dirEntry {
	if len(s.entries) == 0 || now.Before(s.earliest) {
		return nil
	}
	var removed []dirEntry
	s.earliest = time.Time{}
	for id, e := range s.entries {
		d := s.deadline(e)
		if !now.Before(d) {
			removed = append(removed, *e)
			delete(s.entries, id)
			for _, a := range e.Addresses {
				delete(s.owners, a)
			}
			continue
		}
		if s.earliest.IsZero() || d.Before(s.earliest) {
			s.earliest = d
		}
	}
	if len(removed) > 0 {
		s.version++
		slices.SortFunc(removed, func(a, b dirEntry) int { return cmp.Compare(a.ID.String(), b.ID.String()) })
	}
	return removed
}

// register upserts reg as refreshed at now, after dropping expired entries (so a dead
// proxy's addresses are free to claim). An address held by another live entry refuses
// the whole registration with a *conflictError and changes nothing but the expiry.
//
// A registration the deny-list denies (its ID or serial) is refused with an error
// wrapping ErrRevoked. Checking here, under the registry's lock, rather than only in
// the handler means a registration racing a revocation is either refused or removed by
// it, never left behind.
func (s *dirState) register(reg registration, now time.Time) (registerResult, []dirEntry, error) {
	removed := s.expire(now)
	if s.deny.Denies(reg.ID, reg.Serial, reg.NotBefore) {
		return regHeartbeat, removed, fmt.Errorf("%w: %s", ErrRevoked, reg.ID)
	}
	for _, a := range reg.Addresses {
		if owner, ok := s.owners[a]; ok && owner != reg.ID {
			return regHeartbeat, removed, &conflictError{addr: a, owner: owner}
		}
	}
	result := regNew
	if old, ok := s.entries[reg.ID]; ok {
		result = regHeartbeat
		if old.material(reg) {
			result = regChanged
		}
		for _, a := range old.Addresses {
			delete(s.owners, a)
		}
	}
	e := &dirEntry{registration: reg, lastSeen: now}
	s.entries[reg.ID] = e
	for _, a := range reg.Addresses {
		s.owners[a] = reg.ID
	}
	if d := s.deadline(e); s.earliest.IsZero() || d.Before(s.earliest) {
		s.earliest = d
	}
	if result != regHeartbeat {
		s.version++
	}
	return result, removed, nil
}

// setRevocations puts a new deny-list in force and drops the entries it denies (by ID,
// or by the serial they registered with), which it returns. The version always moves:
// the document carries the list.
func (s *dirState) setRevocations(signed *meshapi.SignedDenyList, deny *meshapi.DenyList) []dirEntry {
	s.deny, s.revocations = deny, signed
	s.version++
	var removed []dirEntry
	for id, e := range s.entries {
		if !deny.Denies(e.ID, e.Serial, e.NotBefore) {
			continue
		}
		removed = append(removed, *e)
		delete(s.entries, id)
		for _, a := range e.Addresses {
			delete(s.owners, a)
		}
	}
	// earliest may now be earlier than any remaining deadline: harmless, the next
	// expire recomputes it.
	slices.SortFunc(removed, func(a, b dirEntry) int { return cmp.Compare(a.ID.String(), b.ID.String()) })
	return removed
}

// setFleetRotation publishes a fleet rotation. The version always moves, so that
// every watcher hears of it at once.
func (s *dirState) setFleetRotation(fr *meshapi.FleetRotation) {
	s.rotation = fr
	s.version++
}

// setEntries publishes the registration entries (sorted by ID, immutable). The
// version always moves, so that every watcher hears of it at once.
func (s *dirState) setEntries(entries []meshapi.Entry) {
	s.registered = entries
	s.version++
}

// setBundle publishes the trust bundle; the version moves, as for every section.
func (s *dirState) setBundle(b *meshapi.BundleDocument) {
	s.bundle = b
	s.version++
}

// setAnchorRotation publishes the step of a trust-anchor rotation (nil: none); the
// version moves, as for every section.
func (s *dirState) setAnchorRotation(a *meshapi.AnchorRotation) {
	s.anchor = a
	s.version++
}

// snapshot returns the directory as served, sorted by SPIFFE ID. It shares nothing
// with the state but the signed deny-list, the fleet rotation and the anchor
// rotation step, which are immutable.
func (s *dirState) snapshot() meshapi.DirectoryDocument {
	doc := meshapi.DirectoryDocument{Version: s.version, Peers: make([]meshapi.DirectoryEntry, 0, len(s.entries)),
		Revocations: s.revocations, Rotation: s.rotation, Entries: slices.Clone(s.registered), Bundle: s.bundle,
		AnchorRotation: s.anchor}
	for _, e := range s.entries {
		doc.Peers = append(doc.Peers, meshapi.DirectoryEntry{
			SPIFFEID:      e.ID,
			Addresses:     slices.Clone(e.Addresses),
			TunnelPort:    e.TunnelPort,
			Transports:    slices.Clone(e.Transports),
			LastHeartbeat: e.lastSeen.Round(0), // wall clock only
			BundleVersion: e.BundleVersion,
		})
	}
	slices.SortFunc(doc.Peers, func(a, b meshapi.DirectoryEntry) int { return cmp.Compare(a.SPIFFEID.String(), b.SPIFFEID.String()) })
	return doc
}

// encodedDoc is one directory version as served, snapshotted once however many
// watchers a change wakes, and encoded once per caller (callerViews).
type encodedDoc struct {
	once  sync.Once
	doc   meshapi.DirectoryDocument
	views callerViews
}

// registry is the CA's live directory: dirState behind a mutex, with a broadcast
// channel that is closed and replaced on every version change to wake long-poll
// watchers. Safe for concurrent use.
type registry struct {
	log *slog.Logger

	mu      sync.Mutex
	state   *dirState
	changed chan struct{} // closed (and replaced, unless closed) when the version changes
	doc     *encodedDoc   // encoding of the current version, built on first use
	closed  bool          // shutting down: watchers answer at once
	// testHookWaiting, when set before Run, is called each time a watcher starts
	// blocking (tests use it to know a long-poll is parked without sleeping).
	testHookWaiting func()
}

func newRegistry(ttl time.Duration, log *slog.Logger, now time.Time) *registry {
	return &registry{
		log:     log,
		state:   newDirState(uint64(max(now.UnixMicro(), 1)), ttl),
		changed: make(chan struct{}),
		doc:     &encodedDoc{},
	}
}

// publishedLocked must be called with r.mu held after any state change: it wakes the
// watchers and drops the cached encoding when the version moved.
func (r *registry) publishedLocked(before uint64) {
	if r.state.version == before {
		return
	}
	r.doc = &encodedDoc{}
	if !r.closed {
		close(r.changed)
		r.changed = make(chan struct{})
	}
}

// register applies a registration at now and returns its result and the version
// after it. It logs additions, changes, expiries and conflicts (never under the lock).
func (r *registry) register(reg registration, now time.Time) (registerResult, uint64, error) {
	r.mu.Lock()
	before := r.state.version
	res, removed, err := r.state.register(reg, now)
	r.publishedLocked(before)
	version := r.state.version
	r.mu.Unlock()

	r.logExpired(removed, version)
	var ce *conflictError
	switch {
	case errors.Is(err, ErrRevoked):
		r.log.Warn("directory registration refused: revoked", keySPIFFEID, reg.ID.String(), keySerial, reg.Serial)
	case errors.As(err, &ce):
		r.log.Warn("directory registration refused: address already registered",
			keySPIFFEID, reg.ID.String(), keyAddress, ce.addr.String(), keyClaimedBy, ce.owner.String())
	case res == regNew:
		r.log.Info("directory peer registered", keySPIFFEID, reg.ID.String(),
			keyAddresses, reg.Addresses, keyTunnelPort, reg.TunnelPort, keyVersion, version)
	case res == regChanged:
		r.log.Info("directory peer updated", keySPIFFEID, reg.ID.String(),
			keyAddresses, reg.Addresses, keyTunnelPort, reg.TunnelPort, keyVersion, version)
	}
	return res, version, err
}

// setRevocations puts a new deny-list in force (and in the document), removing the
// entries it denies; the version bump wakes every watcher.
func (r *registry) setRevocations(signed *meshapi.SignedDenyList, deny *meshapi.DenyList) {
	r.mu.Lock()
	before := r.state.version
	removed := r.state.setRevocations(signed, deny)
	r.publishedLocked(before)
	version := r.state.version
	r.mu.Unlock()
	for _, e := range removed {
		r.log.Info("directory peer removed: revoked", keySPIFFEID, e.ID.String(), keySerial, e.Serial, keyVersion, version)
	}
}

// publish applies change to the document under the lock and returns the version
// after it; a version bump wakes every watcher.
func (r *registry) publish(change func(*dirState)) uint64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	before := r.state.version
	change(r.state)
	r.publishedLocked(before)
	return r.state.version
}

// setFleetRotation publishes a fleet rotation.
func (r *registry) setFleetRotation(fr *meshapi.FleetRotation) {
	r.publish(func(s *dirState) { s.setFleetRotation(fr) })
}

// setBundle publishes the trust bundle, the roots anchors.
func (r *registry) setBundle(anchors []*x509.Certificate) {
	r.publish(func(s *dirState) { s.setBundle(meshapi.NewBundleDocument(anchors)) })
}

// setAnchorRotation publishes the step of a trust-anchor rotation (nil: none).
func (r *registry) setAnchorRotation(a *meshapi.AnchorRotation) {
	r.publish(func(s *dirState) { s.setAnchorRotation(a) })
}

// setEntries publishes the registration entries and returns the version after it.
func (r *registry) setEntries(entries []meshapi.Entry) uint64 {
	return r.publish(func(s *dirState) { s.setEntries(entries) })
}

func (r *registry) expireLocked(now time.Time) []dirEntry {
	before := r.state.version
	removed := r.state.expire(now)
	r.publishedLocked(before)
	return removed
}

func (r *registry) logExpired(removed []dirEntry, version uint64) {
	for _, e := range removed {
		r.log.Info("directory peer expired", keySPIFFEID, e.ID.String(),
			keyLastHeartbeat, e.lastSeen, keyVersion, version)
	}
}

// snapshot returns the current directory, expiring first.
func (r *registry) snapshot(now time.Time) meshapi.DirectoryDocument {
	r.mu.Lock()
	removed := r.expireLocked(now)
	doc := r.state.snapshot()
	r.mu.Unlock()
	r.logExpired(removed, doc.Version)
	return doc
}

// watch is the long-poll: it returns the encoded directory, as caller may see it
// (entriesFor), at once when its version is not since, else when the version changes,
// wait has passed or the registry closes, whichever is first. It returns ctx's error
// when ctx ends first (the caller is gone).
func (r *registry) watch(ctx context.Context, caller spiffeid.ID, since uint64, wait time.Duration) ([]byte, error) {
	r.mu.Lock()
	removed := r.expireLocked(time.Now())
	version, ch, closed, hook := r.state.version, r.changed, r.closed, r.testHookWaiting
	r.mu.Unlock()
	r.logExpired(removed, version)

	if version == since && !closed && wait > 0 {
		if hook != nil {
			hook()
		}
		t := time.NewTimer(wait)
		select {
		case <-ch:
		case <-t.C:
		case <-ctx.Done():
		}
		t.Stop()
		if err := ctx.Err(); err != nil {
			return nil, err
		}
	}
	return r.encoded(caller)
}

// encoded returns the JSON of the current version as caller may see it, snapshotting
// it once per version and encoding it once per version and caller.
func (r *registry) encoded(caller spiffeid.ID) ([]byte, error) {
	r.mu.Lock()
	d := r.doc
	r.mu.Unlock()
	d.once.Do(func() {
		// The version may have moved on since d was current: then this takes a newer
		// one, which is as good an answer.
		r.mu.Lock()
		d.doc = r.state.snapshot()
		r.mu.Unlock()
	})
	return d.views.view(d.doc, caller)
}

// run is the janitor: it drops each entry when its TTL runs out (so watchers hear of
// it without anyone polling) until ctx is done or the registry closes.
func (r *registry) run(ctx context.Context) {
	for {
		r.mu.Lock()
		removed := r.expireLocked(time.Now())
		next, ch, closed, version := r.state.earliest, r.changed, r.closed, r.state.version
		r.mu.Unlock()
		r.logExpired(removed, version)
		if closed {
			return
		}
		// Deadlines only move later (a refresh extends one, a new entry expires after
		// every existing one), so sleeping until the earliest known one misses nothing;
		// with no entries, the next registration wakes the janitor.
		var timer *time.Timer
		var fire <-chan time.Time
		if !next.IsZero() {
			timer = time.NewTimer(time.Until(next))
			fire, ch = timer.C, nil
		}
		select {
		case <-ctx.Done():
		case <-fire:
		case <-ch:
		}
		if timer != nil {
			timer.Stop()
		}
		if ctx.Err() != nil {
			return
		}
	}
}

// close wakes every watcher for good: they answer at once so that the HTTPS server
// can shut down without waiting for long-polls.
func (r *registry) close() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.closed {
		r.closed = true
		close(r.changed)
	}
}
