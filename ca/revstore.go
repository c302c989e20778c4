package ca

import (
	"crypto/x509"
	"encoding/json"
	"fmt"
	"github.com/agentmesh/agentmesh/meshapi"
	"maps"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/smallstep/certificates/db"
	"github.com/smallstep/nosql/database"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// Buckets of the CA's own in step-ca's bbolt database.
var (
	// bucketRevocations holds one revocationMark per revoked identity ("id " + ID) or
	// serial ("serial " + serial).
	bucketRevocations = []byte("agentmesh_revocations")
	// bucketIDSerials maps a SPIFFE ID to the serials issued for it that have not
	// expired yet (JSON []issuedSerial), so that revoking an identity finds every live
	// certificate of it with one read.
	bucketIDSerials = []byte("agentmesh_id_serials")
)

// revocationMark is a revocation as the CA records it in its database, before
// anything else happens: from then on it refuses tokens, issuance and registration
// for the target, whatever fails later. The deny-list is built from the marks.
//
// An identity's mark keeps its cutoff for good: a reinstated identity may enrol
// again, but no certificate of it issued before the cutoff is renewed or registered,
// and none is issued with an earlier NotBefore (see storeIssued).
type revocationMark struct {
	SPIFFEID  spiffeid.ID `json:"spiffe_id,omitzero"`
	Serial    string      `json:"serial,omitempty"`
	Reason    string      `json:"reason"`
	RevokedAt time.Time   `json:"revoked_at"`
	NotAfter  time.Time   `json:"not_after,omitzero"`
	// Cutoff is the NotBefore cutoff of an identity's revocation (see
	// DeniedID.NotBefore); zero on marks recorded before cutoffs existed, which
	// cover every certificate.
	Cutoff time.Time `json:"cutoff,omitzero"`
	// ReinstatedAt is when an operator reinstated the identity (zero: it is not).
	ReinstatedAt    time.Time `json:"reinstated_at,omitzero"`
	ReinstateReason string    `json:"reinstate_reason,omitempty"`
}

// reinstated reports whether m's identity may enrol again.
func (m revocationMark) reinstated() bool { return !m.ReinstatedAt.IsZero() }

// covers reports whether m refuses a certificate of its identity with this NotBefore:
// every one until reinstated, afterwards those issued before the cutoff.
func (m revocationMark) covers(notBefore time.Time) bool {
	return !m.reinstated() || meshapi.CoveredBy(notBefore, m.Cutoff)
}

func (m revocationMark) key() []byte {
	if m.Serial != "" {
		return []byte("serial " + m.Serial)
	}
	return []byte("id " + m.SPIFFEID.String())
}

// issuedSerial is one certificate in the serial index. NotBefore is zero in entries
// written before it was recorded: such a certificate counts as issued before any
// cutoff.
type issuedSerial struct {
	Serial    string    `json:"serial"`
	NotBefore time.Time `json:"not_before,omitzero"`
	NotAfter  time.Time `json:"not_after"`
}

// revokedSet is an immutable snapshot of the marks.
type revokedSet struct {
	ids     map[spiffeid.ID]revocationMark
	serials map[string]revocationMark
}

// revocationStore is the revocation state in the database: the marks, and the serial
// index kept up to date by authDB's certificate store hooks. Reads of the marks are
// lock-free; writes (marks, index updates) are serialised by mu, which is what makes
// "mark an identity, then list its serials" see every certificate ever stored for it:
// a store that comes later checks the mark under mu and refuses.
type revocationStore struct {
	db    *db.DB
	mu    sync.Mutex
	marks atomic.Pointer[revokedSet]
	// backdate is step-ca's: a certificate's NotBefore is at most its issue time
	// minus backdate (storeIssued refuses any other), which is what makes a cutoff
	// of revocation time minus backdate exact. Set once by New.
	backdate time.Duration
}

// openRevocationStore creates the buckets when missing and loads the marks.
func openRevocationStore(d *db.DB) (*revocationStore, error) {
	for _, b := range [][]byte{bucketRevocations, bucketIDSerials} {
		if err := d.CreateTable(b); err != nil {
			return nil, fmt.Errorf("create database bucket %s: %w", b, err)
		}
	}
	entries, err := d.List(bucketRevocations)
	if err != nil && !database.IsErrNotFound(err) {
		return nil, fmt.Errorf("read revocations: %w", err)
	}
	set := &revokedSet{ids: map[spiffeid.ID]revocationMark{}, serials: map[string]revocationMark{}}
	for _, e := range entries {
		var m revocationMark
		if err := json.Unmarshal(e.Value, &m); err != nil {
			return nil, fmt.Errorf("read revocation %q: %w", e.Key, err)
		}
		if m.Serial != "" {
			set.serials[m.Serial] = m
		} else if !m.SPIFFEID.IsZero() {
			set.ids[m.SPIFFEID] = m
		}
	}
	s := &revocationStore{db: d}
	s.marks.Store(set)
	return s, nil
}

// idRevoked reports whether id is revoked and not reinstated: no token, enrolment or
// registration entry for it. Lock-free.
func (s *revocationStore) idRevoked(id spiffeid.ID) bool {
	m, ok := s.marks.Load().ids[id]
	return ok && !m.reinstated()
}

// revoked reports whether the certificate of id with this serial and NotBefore is
// revoked: its serial is, or its identity is and the certificate was issued before
// the cutoff (any certificate, until the identity is reinstated). Lock-free.
func (s *revocationStore) revoked(id spiffeid.ID, serial string, notBefore time.Time) bool {
	set := s.marks.Load()
	if m, ok := set.ids[id]; ok && m.covers(notBefore) {
		return true
	}
	_, ok := set.serials[serial]
	return ok
}

// all returns the marks.
func (s *revocationStore) all() *revokedSet { return s.marks.Load() }

// mark records m; it reports false (and changes nothing) when the identity or serial
// is already marked, unless the identity was reinstated: revoking it again replaces
// the mark with m and its later cutoff.
func (s *revocationStore) mark(m revocationMark) (bool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	cur := s.marks.Load()
	if m.Serial != "" {
		if _, ok := cur.serials[m.Serial]; ok {
			return false, nil
		}
	} else if old, ok := cur.ids[m.SPIFFEID]; ok && !old.reinstated() {
		return false, nil
	}
	if err := s.put(cur, m); err != nil {
		return false, err
	}
	return true, nil
}

// reinstate marks id's revocation reinstated at now for reason and returns the mark;
// ok is false when id is not revoked (or reinstated already: nothing changes).
func (s *revocationStore) reinstate(id spiffeid.ID, reason string, now time.Time) (revocationMark, bool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	cur := s.marks.Load()
	m, ok := cur.ids[id]
	if !ok || m.reinstated() {
		return m, false, nil
	}
	m.ReinstatedAt, m.ReinstateReason = now.UTC().Round(0), reason
	if err := s.put(cur, m); err != nil {
		return m, false, err
	}
	return m, true, nil
}

// put writes m and publishes the marks with it. The caller holds mu.
func (s *revocationStore) put(cur *revokedSet, m revocationMark) error {
	b, err := json.Marshal(m)
	if err != nil {
		return fmt.Errorf("encode revocation: %w", err)
	}
	if err := s.db.Set(bucketRevocations, m.key(), b); err != nil {
		return fmt.Errorf("record revocation: %w", err)
	}
	next := &revokedSet{ids: cur.ids, serials: cur.serials}
	if m.Serial != "" {
		next.serials = maps.Clone(cur.serials)
		next.serials[m.Serial] = m
	} else {
		next.ids = maps.Clone(cur.ids)
		next.ids[m.SPIFFEID] = m
	}
	s.marks.Store(next)
	return nil
}

// liveSerials returns the serials issued for id before cutoff (zero: any) that are
// valid at now, sorted. Called after marking id, it returns every certificate of id
// the mark covers that can still be used.
func (s *revocationStore) liveSerials(id spiffeid.ID, cutoff, now time.Time) ([]issuedSerial, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	list, err := s.readSerials(id)
	if err != nil {
		return nil, err
	}
	return slices.DeleteFunc(list, func(e issuedSerial) bool {
		return !now.Before(e.NotAfter) || (!e.NotBefore.IsZero() && !meshapi.CoveredBy(e.NotBefore, cutoff))
	}), nil
}

func (s *revocationStore) readSerials(id spiffeid.ID) ([]issuedSerial, error) {
	b, err := s.db.Get(bucketIDSerials, []byte(id.String()))
	if database.IsErrNotFound(err) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read serial index of %s: %w", id, err)
	}
	var list []issuedSerial
	if err := json.Unmarshal(b, &list); err != nil {
		return nil, fmt.Errorf("read serial index of %s: %w", id, err)
	}
	return list, nil
}

// storeIssued records a newly issued leaf in the serial index and then has step-ca
// store it (store). It refuses (ErrRevoked) a leaf for a revoked identity, or for a
// reinstated one with a NotBefore before the cutoff, and (ErrInvalidRequest) a leaf
// whose NotBefore is later than now minus the backdate (a client may ask step-ca for
// its NotBefore): step-ca then answers with an error instead of the certificate. Both
// hold the cutoff exact: every certificate stored before a revocation has a NotBefore
// before it, none stored after has. This also closes the race between an issuance
// already past step-ca's checks and a revocation of its identity.
//
// The index is written first: a certificate that reaches its holder is always
// indexed (an indexed serial whose store failed is harmless). Holding mu across the
// writes costs little: bbolt serialises writers anyway.
func (s *revocationStore) storeIssued(leaf *x509.Certificate, store func() error) error {
	id, err := x509svid.IDFromCert(leaf)
	if err != nil {
		// Not an SVID (the CA's own TLS serving certificate): nothing to index.
		return store()
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	now := time.Now()
	if m, ok := s.marks.Load().ids[id]; ok && m.covers(leaf.NotBefore) {
		return fmt.Errorf("%w: %s (not before %v, cutoff %v)", ErrRevoked, id, leaf.NotBefore, m.Cutoff)
	}
	if leaf.NotBefore.After(now.Add(-s.backdate)) {
		return fmt.Errorf("%w: not before %v is later than the issue time minus the backdate %v",
			ErrInvalidRequest, leaf.NotBefore, s.backdate)
	}
	list, err := s.readSerials(id)
	if err != nil {
		return err
	}
	list = slices.DeleteFunc(list, func(e issuedSerial) bool { return !now.Before(e.NotAfter) })
	list = append(list, issuedSerial{Serial: leaf.SerialNumber.String(), NotBefore: leaf.NotBefore, NotAfter: leaf.NotAfter})
	slices.SortFunc(list, func(a, b issuedSerial) int { return meshapi.CompareSerials(a.Serial, b.Serial) })
	b, err := json.Marshal(list)
	if err != nil {
		return fmt.Errorf("encode serial index: %w", err)
	}
	if err := s.db.Set(bucketIDSerials, []byte(id.String()), b); err != nil {
		return fmt.Errorf("write serial index of %s: %w", id, err)
	}
	return store()
}
