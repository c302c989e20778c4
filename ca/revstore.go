package ca

import (
	"crypto/x509"
	"encoding/json"
	"fmt"
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
type revocationMark struct {
	SPIFFEID  spiffeid.ID `json:"spiffe_id,omitzero"`
	Serial    string      `json:"serial,omitempty"`
	Reason    string      `json:"reason"`
	RevokedAt time.Time   `json:"revoked_at"`
	NotAfter  time.Time   `json:"not_after,omitzero"`
}

func (m revocationMark) key() []byte {
	if m.Serial != "" {
		return []byte("serial " + m.Serial)
	}
	return []byte("id " + m.SPIFFEID.String())
}

// issuedSerial is one certificate in the serial index.
type issuedSerial struct {
	Serial   string    `json:"serial"`
	NotAfter time.Time `json:"not_after"`
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

// idRevoked reports whether id is marked revoked. Lock-free.
func (s *revocationStore) idRevoked(id spiffeid.ID) bool {
	_, ok := s.marks.Load().ids[id]
	return ok
}

// revoked reports whether id or serial is marked revoked. Lock-free.
func (s *revocationStore) revoked(id spiffeid.ID, serial string) bool {
	set := s.marks.Load()
	if _, ok := set.ids[id]; ok {
		return true
	}
	_, ok := set.serials[serial]
	return ok
}

// all returns the marks.
func (s *revocationStore) all() *revokedSet { return s.marks.Load() }

// mark records m; it reports false (and changes nothing) when the identity or serial
// is already marked.
func (s *revocationStore) mark(m revocationMark) (bool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	cur := s.marks.Load()
	if m.Serial != "" {
		if _, ok := cur.serials[m.Serial]; ok {
			return false, nil
		}
	} else if _, ok := cur.ids[m.SPIFFEID]; ok {
		return false, nil
	}
	b, err := json.Marshal(m)
	if err != nil {
		return false, fmt.Errorf("encode revocation: %w", err)
	}
	if err := s.db.Set(bucketRevocations, m.key(), b); err != nil {
		return false, fmt.Errorf("record revocation: %w", err)
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
	return true, nil
}

// liveSerials returns the serials issued for id that are valid at now, sorted.
// Called after marking id, it returns every certificate of id that can still be used.
func (s *revocationStore) liveSerials(id spiffeid.ID, now time.Time) ([]issuedSerial, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	list, err := s.readSerials(id)
	if err != nil {
		return nil, err
	}
	return slices.DeleteFunc(list, func(e issuedSerial) bool { return !now.Before(e.NotAfter) }), nil
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
// store it (store). It refuses (ErrRevoked) a leaf for a revoked identity: step-ca
// then answers with an error instead of the certificate. This closes the race between
// an issuance already past step-ca's checks and a revocation of its identity.
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
	if _, ok := s.marks.Load().ids[id]; ok {
		return fmt.Errorf("%w: %s", ErrRevoked, id)
	}
	list, err := s.readSerials(id)
	if err != nil {
		return err
	}
	now := time.Now()
	list = slices.DeleteFunc(list, func(e issuedSerial) bool { return !now.Before(e.NotAfter) })
	list = append(list, issuedSerial{Serial: leaf.SerialNumber.String(), NotAfter: leaf.NotAfter})
	slices.SortFunc(list, func(a, b issuedSerial) int { return compareSerials(a.Serial, b.Serial) })
	b, err := json.Marshal(list)
	if err != nil {
		return fmt.Errorf("encode serial index: %w", err)
	}
	if err := s.db.Set(bucketIDSerials, []byte(id.String()), b); err != nil {
		return fmt.Errorf("write serial index of %s: %w", id, err)
	}
	return store()
}
