package ca

import (
	"context"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/agentmesh/agentmesh/meshapi"
	"maps"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/smallstep/certificates/db"
	"github.com/smallstep/nosql/database"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/agentmesh/agentmesh/audit"
)

// The lineage of an identity is every certificate the CA issued for it that has not
// expired, in the order of issuance: its serial, the host it was issued to and the
// serial a renewal replaced. It binds renewal to one line of descent: /renew and
// /rekey are allowed only to the newest certificate (the head) or to the one the head
// replaced (in overlap: the holder whose renewal answer was lost retries with it).
// Anything older, or a sibling of the head, is a fork: a second holder of a stolen key
// that renewed on its own, and it is refused. An enrolment starts a new head.
//
// Agent identities are never renewed through /renew or /rekey: their proxy re-enrols
// them with a token that only the host named by their registration entry obtains (over
// mTLS with its own SVID), so renewal of an agent is bound to the registration at the
// moment it happens, and a copied agent certificate cannot extend itself. Each agent
// certificate records the host whose token enrolled it, so that moving the agent to
// another host revokes every certificate the old host holds.

// bucketLineage maps a SPIFFE ID to its lineage (JSON []lineageEntry, oldest first).
var bucketLineage = []byte("agentmesh_lineage")

// lineageEntry is one certificate of a lineage.
type lineageEntry struct {
	Serial string `json:"serial"`
	// Host is the host the certificate was issued to: the identity itself for a host,
	// the host whose granted token enrolled it for an agent; zero when unknown (an
	// agent enrolled with a token an operator minted).
	Host     spiffeid.ID `json:"host,omitzero"`
	IssuedAt time.Time   `json:"issued_at"`
	NotAfter time.Time   `json:"not_after"`
	// Replaced is the serial this certificate renewed; "" for an enrolment.
	Replaced string `json:"replaced,omitempty"`
}

// renewRefusal says why a renewal or rekey was refused. The values are the "reason"
// of the audit record and the label of the refusal metric.
type renewRefusal string

const (
	// refusedFork: the certificate is neither the head of its lineage nor the one the
	// head replaced (or not in the lineage at all).
	refusedFork renewRefusal = "fork"
	// refusedRevokedSerial: the certificate's serial is revoked.
	refusedRevokedSerial renewRefusal = "revoked"
	// refusedAgentRenewal: an agent certificate; agents re-enrol through their host.
	refusedAgentRenewal renewRefusal = "agent_renewal"
	// refusedNotRegisteredHost: an agent certificate issued for a host the agent's
	// registration no longer names (the token was granted before a move).
	refusedNotRegisteredHost renewRefusal = "not_registered_host"
)

// allRenewRefusals lists the reasons, for the metric's label values.
var allRenewRefusals = []renewRefusal{refusedFork, refusedRevokedSerial, refusedAgentRenewal, refusedNotRegisteredHost}

// ErrRenewalRefused wraps a renewRefusal when the certificate store refuses an
// issuance: the state changed between step-ca's authorisation and the store.
var ErrRenewalRefused = errors.New("ca: renewal refused by the lineage")

// ErrNotLineageHead is returned by Revoke for a lineage revocation whose kept serial is
// not the newest certificate of the identity (answered 409): another holder renewed
// after it, and only revoking the identity stops both.
var ErrNotLineageHead = errors.New("ca: the serial to keep is not the newest certificate of its identity")

// renewDecision is the lineage rule for a renewal or rekey of serial, an unexpired
// certificate of an identity whose lineage is lin. Pure. An identity without a lineage
// has only certificates issued before the CA kept lineages: they may renew once, and
// the renewal starts the lineage.
func renewDecision(id spiffeid.ID, lin []lineageEntry, serial string) (renewRefusal, bool) {
	if isAgentID(id) {
		return refusedAgentRenewal, false
	}
	if len(lin) == 0 {
		return "", true
	}
	head := lin[len(lin)-1]
	if serial == head.Serial || (head.Replaced != "" && serial == head.Replaced) {
		return "", true
	}
	return refusedFork, false
}

// tokenGrant is an agent token granted to a host, until the token expires.
type tokenGrant struct {
	host    spiffeid.ID
	expires time.Time
}

// lineageStore keeps the lineages in the database. mu serialises every lineage write
// with the checks it depends on: a renewal is recorded only if its old certificate is
// still allowed to renew, and a lineage revocation sees every certificate stored
// before it and none is stored from a revoked one after it. Lock order: mu before
// revocationStore.mu.
//
// grants and pending bind an agent certificate to the host that obtained its token:
// the token ID (jti) of every agent token granted on the mesh API is remembered with
// the host until the token expires, and while a /sign request with such a token is in
// flight its CSR's key is mapped to that host, which the store reads back from the
// issued certificate's key. Both are in memory: a token granted before a restart
// enrols an agent certificate whose host is unknown, which a move revokes like any
// other.
type lineageStore struct {
	db      *db.DB
	rev     *revocationStore
	entries *atomic.Pointer[entrySet] // the registration entries in force (Server.entries)
	// refused audits, counts and logs a refusal of the store (Server.lineageRefused).
	refused func(context.Context, audit.Lineage, string)
	// refusals counts the issuances the lineage refused, by reason.
	refusals *prometheus.CounterVec
	mu       sync.Mutex

	bindMu  sync.Mutex
	grants  map[string]tokenGrant   // jti → grant
	pending map[string]*spiffeid.ID // SHA-256 of a CSR's SubjectPublicKeyInfo → host
}

func openLineageStore(d *db.DB, rev *revocationStore, entries *atomic.Pointer[entrySet],
	refused func(context.Context, audit.Lineage, string)) (*lineageStore, error) {
	if err := d.CreateTable(bucketLineage); err != nil {
		return nil, fmt.Errorf("create database bucket %s: %w", bucketLineage, err)
	}
	return &lineageStore{db: d, rev: rev, entries: entries, refused: refused, refusals: newLineageMetric(), grants: map[string]tokenGrant{}, pending: map[string]*spiffeid.ID{}}, nil
}

// registered is the host the registration entry of agent id names now.
func (l *lineageStore) registered(id spiffeid.ID) (spiffeid.ID, bool) {
	set := l.entries.Load()
	if set == nil {
		return spiffeid.ID{}, false
	}
	e, ok := set.byID[id]
	return e.Host, ok
}

func (l *lineageStore) read(id spiffeid.ID) ([]lineageEntry, error) {
	var lin []lineageEntry
	b, err := l.db.Get(bucketLineage, []byte(id.String()))
	if err == nil {
		err = json.Unmarshal(b, &lin)
	} else if database.IsErrNotFound(err) {
		err = nil
	}
	if err != nil {
		return nil, fmt.Errorf("read lineage of %s: %w", id, err)
	}
	return lin, nil
}

// write stores lin without its expired entries.
func (l *lineageStore) write(id spiffeid.ID, lin []lineageEntry, now time.Time) error {
	lin = slices.DeleteFunc(lin, func(e lineageEntry) bool { return !now.Before(e.NotAfter) })
	b, err := json.Marshal(lin)
	if err != nil {
		return fmt.Errorf("encode lineage: %w", err)
	}
	if err := l.db.Set(bucketLineage, []byte(id.String()), b); err != nil {
		return fmt.Errorf("write lineage of %s: %w", id, err)
	}
	return nil
}

// lineage returns the lineage of id (a copy).
func (l *lineageStore) lineage(id spiffeid.ID) ([]lineageEntry, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.read(id)
}

// checkRenewal applies the lineage rule and the serial revocations to cert, presented
// for renewal. It returns the refusal and the lineage's head serial ("" when none).
func (l *lineageStore) checkRenewal(cert *x509.Certificate) (renewRefusal, string, error) {
	id, err := x509svid.IDFromCert(cert)
	if err != nil {
		return "", "", nil // not an SVID: step-ca's own rules apply
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.checkRenewalLocked(id, cert.SerialNumber.String())
}

func (l *lineageStore) checkRenewalLocked(id spiffeid.ID, serial string) (renewRefusal, string, error) {
	if l.rev.revoked(spiffeid.ID{}, serial, time.Time{}) {
		return refusedRevokedSerial, "", nil
	}
	lin, err := l.read(id)
	if err != nil {
		return "", "", err
	}
	head := ""
	if len(lin) > 0 {
		head = lin[len(lin)-1].Serial
	}
	if reason, ok := renewDecision(id, lin, serial); !ok {
		return reason, head, nil
	}
	return "", head, nil
}

// record adds leaf to its identity's lineage and then has it stored (store). old is
// the certificate a renewal replaced (nil for an enrolment), which must still be
// allowed to renew. An agent certificate is stored only when the host its token was granted to is the
// one the registration names now. Refusals wrap ErrRenewalRefused.
func (l *lineageStore) record(leaf, old *x509.Certificate, store func() error) error {
	id, err := x509svid.IDFromCert(leaf)
	if err != nil {
		return store() // the CA's own TLS serving certificate
	}
	e := lineageEntry{Serial: leaf.SerialNumber.String(), IssuedAt: time.Now().UTC().Round(0), NotAfter: leaf.NotAfter.UTC()}
	switch {
	case meshapi.IsHostID(id):
		e.Host = id
	case isAgentID(id):
		if host := l.boundHost(leaf); host != nil {
			e.Host = *host
		}
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	// Checked under mu: a move changes the entry before it revokes the old host's
	// certificates under mu, so a certificate for the old host is either refused here
	// or in the lineage that revocation reads.
	if isAgentID(id) && !e.Host.IsZero() {
		if reg, ok := l.registered(id); !ok || reg != e.Host {
			err := fmt.Errorf("%w: %s: %s is not registered to %s", ErrRenewalRefused, refusedNotRegisteredHost, id, e.Host)
			l.refused(context.Background(), audit.Lineage{Op: string(opSign), Caller: id.String(), Host: e.Host.String(),
				Reason: string(refusedNotRegisteredHost)}, err.Error())
			return err
		}
	}
	if old != nil {
		e.Replaced = old.SerialNumber.String()
		reason, head, err := l.checkRenewalLocked(id, e.Replaced)
		if err != nil {
			return err
		}
		if reason != "" {
			err := fmt.Errorf("%w: %s: serial %s of %s", ErrRenewalRefused, reason, e.Replaced, id)
			l.refused(context.Background(), audit.Lineage{Op: string(opRenew), Caller: id.String(), Serial: e.Replaced,
				Head: head, Reason: string(reason)}, err.Error())
			return err
		}
	}
	lin, err := l.read(id)
	if err != nil {
		return err
	}
	// Written before the certificate is stored, like the serial index: a certificate
	// that reaches its holder is always in its lineage. One whose store then fails is
	// a head nobody holds; its predecessor stays renewable (overlap).
	if err := l.write(id, append(lin, e), time.Now()); err != nil {
		return err
	}
	return store()
}

// revokeWhere marks revoked, for reason at now, every unexpired certificate of id's
// lineage that keep does not keep, and returns them. With head set, it first checks
// that head is the newest certificate of the lineage (ErrNotLineageHead otherwise).
// Under mu: no certificate is added to the lineage meanwhile, and none can be renewed
// from a marked one afterwards.
func (l *lineageStore) revokeWhere(id spiffeid.ID, head string, keep func(lineageEntry) bool, reason string, now time.Time) ([]lineageEntry, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	lin, err := l.read(id)
	if err != nil {
		return nil, err
	}
	if head != "" && (len(lin) == 0 || lin[len(lin)-1].Serial != head) {
		return nil, fmt.Errorf("%w: %s of %s", ErrNotLineageHead, head, id)
	}
	var out []lineageEntry
	for _, e := range lin {
		if keep(e) || !now.Before(e.NotAfter) {
			continue
		}
		m := revocationMark{SPIFFEID: id, Serial: e.Serial, Reason: reason, RevokedAt: now.UTC().Round(0), NotAfter: e.NotAfter}
		if _, err := l.rev.mark(m); err != nil {
			return out, err
		}
		out = append(out, e)
	}
	return out, nil
}

// grant remembers that the agent token tok was granted to host.
func (l *lineageStore) grant(tok string, host spiffeid.ID, now time.Time) {
	claims, ok := tokenPayload(tok)
	if !ok {
		return
	}
	l.bindMu.Lock()
	defer l.bindMu.Unlock()
	maps.DeleteFunc(l.grants, func(_ string, g tokenGrant) bool { return !now.Before(g.expires) })
	l.grants[claims.ID] = tokenGrant{host: host, expires: time.Unix(claims.Expiry, 0)}
}

// bindCSR maps the key of csrPEM to the host the token tok was granted to, if any, for
// as long as the /sign request runs; the returned func ends it. A request whose token
// was not granted here (a host's, or one an operator minted) binds nothing. Nothing
// here is trusted: step-ca verifies the token and the CSR afterwards, and only a
// certificate it issues, for this key, reads the binding.
func (l *lineageStore) bindCSR(tok, csrPEM string) func() {
	claims, ok := tokenPayload(tok)
	if !ok {
		return func() {}
	}
	csr, err := parseCSRPEM(csrPEM)
	if err != nil {
		return func() {}
	}
	key := spkiKey(csr.RawSubjectPublicKeyInfo)
	l.bindMu.Lock()
	defer l.bindMu.Unlock()
	g, ok := l.grants[claims.ID]
	if !ok {
		return func() {}
	}
	host := g.host
	l.pending[key] = &host
	return func() {
		l.bindMu.Lock()
		defer l.bindMu.Unlock()
		if l.pending[key] == &host {
			delete(l.pending, key)
		}
	}
}

// grantedHost returns the host an agent token was granted to.
func (l *lineageStore) grantedHost(tok string) (spiffeid.ID, bool) {
	claims, ok := tokenPayload(tok)
	if !ok {
		return spiffeid.ID{}, false
	}
	l.bindMu.Lock()
	defer l.bindMu.Unlock()
	g, ok := l.grants[claims.ID]
	return g.host, ok
}

// boundHost is the host bindCSR mapped leaf's key to, or nil.
func (l *lineageStore) boundHost(leaf *x509.Certificate) *spiffeid.ID {
	l.bindMu.Lock()
	defer l.bindMu.Unlock()
	return l.pending[spkiKey(leaf.RawSubjectPublicKeyInfo)]
}

func spkiKey(spki []byte) string {
	sum := sha256.Sum256(spki)
	return string(sum[:])
}

// tokenClaimsLite is the part of a one-time token's payload the lineage reads.
type tokenClaimsLite struct {
	ID      string `json:"jti"`
	Subject string `json:"sub"`
	Expiry  int64  `json:"exp"`
}

// tokenPayload decodes a JWT's payload without verifying it (see bindCSR).
func tokenPayload(tok string) (tokenClaimsLite, bool) {
	parts := strings.Split(tok, ".")
	if len(parts) != 3 {
		return tokenClaimsLite{}, false
	}
	b, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		return tokenClaimsLite{}, false
	}
	var c tokenClaimsLite
	if err := json.Unmarshal(b, &c); err != nil || c.ID == "" {
		return tokenClaimsLite{}, false
	}
	return c, true
}
