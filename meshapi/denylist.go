package meshapi

import (
	"bytes"
	"cmp"
	"crypto"
	"crypto/ecdsa"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// denyListContext is prepended to the payload before hashing, so that a deny-list
// signature can never be mistaken for (or made from) any other signature of the
// intermediate key: certificates, CRLs, OCSP answers.
const denyListContext = "agentmesh deny-list v1\n"

const (
	// MaxReason bounds the operator's free-text reason, in bytes of printable
	// ASCII.
	MaxReason = 256
	// maxSerialDigits bounds a decimal serial: RFC 5280 serials are at most 20 octets,
	// 49 decimal digits.
	maxSerialDigits = 49
)

// DenyList is one version of the CA's revocation deny-list. Lists are cumulative but
// for expiry: a newer version contains every entry of every older one, unchanged,
// except entries whose certificates have all expired, which the CA drops and the newer
// version accounts for with ExpiredThrough. A DenyList is immutable once built
// (VerifyDenyList returns a fresh one): share it, never modify it.
type DenyList struct {
	// TrustDomain is the name of the trust domain whose CA signed the list.
	TrustDomain string `json:"trust_domain"`
	// Version starts at 1 (the empty list a CA signs on first start) and increases by
	// one per change; the CA persists it across restarts.
	Version uint64 `json:"version"`
	// IssuedAt is when the CA signed this version.
	IssuedAt time.Time `json:"issued_at"`
	// IDs are the identity revocations, sorted by SPIFFE ID and then version, unique
	// by both: an identity revoked, reinstated and revoked again has one entry per
	// revocation until the older one expires. Each denies the identity's certificates
	// issued before its cutoff (DeniedID.NotBefore), whatever their serial.
	IDs []DeniedID `json:"ids"`
	// Serials are the revoked certificates, sorted by serial in numeric order, unique.
	Serials []DeniedSerial `json:"serials"`
	// ExpiredThrough says which entries the list has dropped, and why: every entry of
	// an earlier version whose not_after is at or before it, because every
	// certificate it covered had expired by then. It never moves back, is at or
	// before IssuedAt, and no entry of the list has a not_after at or before it. Zero
	// until the CA first drops an entry.
	ExpiredThrough time.Time `json:"expired_through,omitzero"`
	// Issuers are the CA keys retired by a rotation of the CA's trust anchors, sorted
	// by KeyFingerprint, unique: every certificate they issued is denied. Absent from
	// lists signed before rotations existed.
	Issuers []DeniedIssuer `json:"issuers,omitempty"`

	// Lookup indexes, built by VerifyDenyList and by the CA; nil on a list built by
	// hand, which Denies then scans. ids maps an identity to its latest cutoff (zero:
	// every certificate).
	ids     map[spiffeid.ID]time.Time
	serials map[string]struct{}
	issuers map[string]struct{}
}

// DeniedIssuer is a CA key a rotation retired and destroyed: every certificate issued
// by a CA certificate with this key is denied.
type DeniedIssuer struct {
	// KeyFingerprint is the issuer's KeyFingerprint.
	KeyFingerprint string    `json:"key_fingerprint"`
	RevokedAt      time.Time `json:"revoked_at"`
	// NotAfter is when the issuer's own certificate expires: until then a certificate it
	// signed could still verify under a kept root.
	NotAfter time.Time `json:"not_after,omitzero"`
	// Version is the list version that first carried the entry.
	Version uint64 `json:"version"`
}

// DeniesIssuer reports whether the CA key with KeyFingerprint fp is denied. A nil
// list denies nothing. Safe for concurrent use.
func (l *DenyList) DeniesIssuer(fp string) bool {
	if l == nil || fp == "" {
		return false
	}
	if l.issuers != nil {
		_, ok := l.issuers[fp]
		return ok
	}
	return slices.ContainsFunc(l.Issuers, func(e DeniedIssuer) bool { return e.KeyFingerprint == fp })
}

// WithIssuer returns the version after l, issued at now, carrying every entry of l
// and issuer when not nil (and not already listed or already expired by l's
// ExpiredThrough). With a nil issuer it is l re-issued as a new version: what the CA
// signs when it starts issuing from another key. Pure.
func (l *DenyList) WithIssuer(now time.Time, issuer *DeniedIssuer) *DenyList {
	next := &DenyList{TrustDomain: l.TrustDomain, Version: l.Version + 1, IssuedAt: now.UTC().Round(0),
		IDs: slices.Clone(l.IDs), Serials: slices.Clone(l.Serials), ExpiredThrough: l.ExpiredThrough,
		Issuers: slices.Clone(l.Issuers)}
	if issuer != nil && !l.DeniesIssuer(issuer.KeyFingerprint) &&
		(issuer.NotAfter.IsZero() || issuer.NotAfter.After(l.ExpiredThrough)) {
		e := *issuer
		e.Version = next.Version
		next.Issuers = append(next.Issuers, e)
		slices.SortFunc(next.Issuers, func(a, b DeniedIssuer) int { return cmp.Compare(a.KeyFingerprint, b.KeyFingerprint) })
	}
	next.index()
	return next
}

// DeniedID is a revoked identity: the certificates of SPIFFEID issued before the
// revocation.
type DeniedID struct {
	SPIFFEID  spiffeid.ID `json:"spiffe_id"`
	Reason    string      `json:"reason,omitempty"`
	RevokedAt time.Time   `json:"revoked_at"`
	// NotBefore is the cutoff: a certificate of the identity whose NotBefore is
	// before it is denied. A certificate's NotBefore is its issue time minus the
	// CA's backdate, so the CA publishes the revocation time minus its backdate, and
	// never issues afterwards a certificate with an earlier NotBefore: exactly the
	// certificates issued before the revocation are denied. Zero (lists signed before
	// cutoffs existed) denies every certificate of the identity.
	NotBefore time.Time `json:"not_before,omitzero"`
	// NotAfter is when the last certificate the entry covers expires (at the latest):
	// past it the entry denies nothing that is not expired anyway, and the CA drops
	// it. Zero: unknown, kept for good.
	NotAfter time.Time `json:"not_after,omitzero"`
	// Version is the list version that first carried the entry.
	Version uint64 `json:"version"`
}

// DeniedSerial is a revoked certificate.
type DeniedSerial struct {
	// Serial is the certificate's serial number in decimal, as step-ca stores it.
	Serial string `json:"serial"`
	// SPIFFEID is the certificate's identity, when the CA issued it (zero otherwise).
	SPIFFEID  spiffeid.ID `json:"spiffe_id,omitzero"`
	Reason    string      `json:"reason,omitempty"`
	RevokedAt time.Time   `json:"revoked_at"`
	// NotAfter is the certificate's expiry, when known: past it, the entry no longer
	// matters (an expired certificate is refused anyway).
	NotAfter time.Time `json:"not_after,omitzero"`
	// Version is the list version that first carried the entry.
	Version uint64 `json:"version"`
}

// Denies reports whether a certificate for id with this serial (decimal) and this
// NotBefore is revoked: the serial is, or the identity was revoked after the
// certificate was issued (notBefore before the entry's cutoff; a zero notBefore, when
// unknown, is before any cutoff). It is O(1) and does not allocate on a list from
// VerifyDenyList or the CA. Safe for concurrent use. A nil list denies nothing.
func (l *DenyList) Denies(id spiffeid.ID, serial string, notBefore time.Time) bool {
	if l == nil {
		return false
	}
	if l.ids != nil || l.serials != nil {
		if cutoff, ok := l.ids[id]; ok && !id.IsZero() && CoveredBy(notBefore, cutoff) {
			return true
		}
		_, ok := l.serials[serial]
		return ok && serial != ""
	}
	// A list built by hand: scan it.
	for i := range l.IDs {
		if !id.IsZero() && l.IDs[i].SPIFFEID == id && CoveredBy(notBefore, l.IDs[i].NotBefore) {
			return true
		}
	}
	for i := range l.Serials {
		if serial != "" && l.Serials[i].Serial == serial {
			return true
		}
	}
	return false
}

// CoveredBy reports whether a certificate with this NotBefore was issued before an
// identity entry's cutoff (zero: every certificate is).
func CoveredBy(notBefore, cutoff time.Time) bool {
	return cutoff.IsZero() || notBefore.Before(cutoff)
}

// index builds the lookup indexes Denies uses. Of several entries of one identity the
// latest cutoff covers the others' certificates too.
func (l *DenyList) index() {
	l.ids = make(map[spiffeid.ID]time.Time, len(l.IDs))
	for _, e := range l.IDs {
		cur, ok := l.ids[e.SPIFFEID]
		switch {
		case !ok, e.NotBefore.IsZero():
			l.ids[e.SPIFFEID] = e.NotBefore
		case !cur.IsZero() && e.NotBefore.After(cur):
			l.ids[e.SPIFFEID] = e.NotBefore
		}
	}
	l.serials = make(map[string]struct{}, len(l.Serials))
	for _, e := range l.Serials {
		l.serials[e.Serial] = struct{}{}
	}
	l.issuers = make(map[string]struct{}, len(l.Issuers))
	for _, e := range l.Issuers {
		l.issuers[e.KeyFingerprint] = struct{}{}
	}
}

// deniesSerial reports whether the serial is revoked.
func (l *DenyList) deniesSerial(serial string) bool {
	return l.Denies(spiffeid.ID{}, serial, time.Time{})
}

// SignedDenyList is a deny-list on the wire: the JSON of a DenyList and a signature
// over it by a CA certificate's key (the CA's intermediate, whose key lives in the
// HSM). Verify it with VerifyDenyList before reading the payload.
type SignedDenyList struct {
	// Payload is the JSON of the DenyList (base64 in JSON).
	Payload []byte `json:"payload"`
	// Signature is an ASN.1 ECDSA signature over
	// SHA-256("agentmesh deny-list v1\n" || Payload).
	Signature []byte `json:"signature"`
	// Signer is the DER of the signing CA certificate.
	Signer []byte `json:"signer"`
}

// denyListDigest is what a deny-list signature signs.
func denyListDigest(payload []byte) []byte {
	h := sha256.New()
	h.Write([]byte(denyListContext))
	h.Write(payload)
	return h.Sum(nil)
}

// SignDenyList encodes l and signs it with signer, the key of the CA certificate
// cert (an ECDSA key, possibly in a token).
func SignDenyList(l *DenyList, signer crypto.Signer, cert *x509.Certificate) (*SignedDenyList, error) {
	pub, ok := signer.Public().(*ecdsa.PublicKey)
	if !ok {
		return nil, fmt.Errorf("sign deny list: %T is not an ECDSA key", signer.Public())
	}
	if !pub.Equal(cert.PublicKey) {
		return nil, fmt.Errorf("sign deny list: key does not match certificate %q", cert.Subject.CommonName)
	}
	payload, err := json.Marshal(l)
	if err != nil {
		return nil, fmt.Errorf("encode deny list: %w", err)
	}
	sig, err := signer.Sign(rand.Reader, denyListDigest(payload), crypto.SHA256)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrSign, err)
	}
	return &SignedDenyList{Payload: payload, Signature: sig, Signer: slices.Clone(cert.Raw)}, nil
}

// VerifyDenyList checks a signed deny-list against the trust anchors roots of td at
// now, and returns the list it carries.
//
// The signer certificate must chain to one of roots and be a CA certificate (IsCA,
// KeyUsageCertSign) valid at now; the signature must verify with its ECDSA key. Only
// then is the payload decoded, strictly: one JSON object, no unknown fields, version at
// least 1, issued_at set, trust_domain td, every identity a workload ID of td, every
// serial a canonical positive decimal, reasons printable ASCII of at most 256 bytes,
// revoked_at set, entry versions within 1..version, entries sorted and unique.
//
// Errors wrap ErrDenyListSignature (forged, tampered, or signed by a certificate that
// is not a valid CA of td) or ErrDenyListMalformed (anything else).
func VerifyDenyList(s *SignedDenyList, td spiffeid.TrustDomain, roots []*x509.Certificate, now time.Time) (*DenyList, error) {
	if s == nil {
		return nil, fmt.Errorf("%w: no list", ErrDenyListMalformed)
	}
	if len(s.Signer) == 0 || len(s.Signature) == 0 {
		return nil, fmt.Errorf("%w: unsigned", ErrDenyListSignature)
	}
	signer, err := x509.ParseCertificate(s.Signer)
	if err != nil {
		return nil, fmt.Errorf("%w: signer certificate: %w", ErrDenyListSignature, err)
	}
	if !signer.IsCA || signer.KeyUsage&x509.KeyUsageCertSign == 0 {
		return nil, fmt.Errorf("%w: signer %q is not a CA certificate", ErrDenyListSignature, signer.Subject.CommonName)
	}
	pool := x509.NewCertPool()
	for _, r := range roots {
		pool.AddCert(r)
	}
	if _, err := signer.Verify(x509.VerifyOptions{
		Roots:       pool,
		CurrentTime: now,
		// CA certificates carry no extended key usage.
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
	}); err != nil {
		return nil, fmt.Errorf("%w: signer %q: %w", ErrDenyListSignature, signer.Subject.CommonName, err)
	}
	pub, ok := signer.PublicKey.(*ecdsa.PublicKey)
	if !ok {
		return nil, fmt.Errorf("%w: signer key is %T, not ECDSA", ErrDenyListSignature, signer.PublicKey)
	}
	if !ecdsa.VerifyASN1(pub, denyListDigest(s.Payload), s.Signature) {
		return nil, fmt.Errorf("%w: signature does not verify", ErrDenyListSignature)
	}
	l, err := decodeDenyList(s.Payload, td)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrDenyListMalformed, err)
	}
	return l, nil
}

// decodeDenyList decodes and checks a payload (see VerifyDenyList) and indexes it.
func decodeDenyList(payload []byte, td spiffeid.TrustDomain) (*DenyList, error) {
	var l DenyList
	if err := DecodeStrict(bytes.NewReader(payload), &l); err != nil {
		return nil, fmt.Errorf("decode: %w", err)
	}
	if err := l.check(td); err != nil {
		return nil, err
	}
	if l.IDs == nil {
		l.IDs = []DeniedID{}
	}
	if l.Serials == nil {
		l.Serials = []DeniedSerial{}
	}
	l.index()
	return &l, nil
}

// check validates a decoded list for td.
func (l *DenyList) check(td spiffeid.TrustDomain) error {
	switch {
	case l.TrustDomain != td.Name():
		return fmt.Errorf("list of trust domain %q, want %q", l.TrustDomain, td.Name())
	case l.Version == 0:
		return errors.New("version 0")
	case l.IssuedAt.IsZero():
		return errors.New("issued_at missing")
	case l.ExpiredThrough.After(l.IssuedAt):
		return errors.New("expired_through after issued_at")
	}
	for i, e := range l.IDs {
		if err := CheckWorkloadID(td, e.SPIFFEID); err != nil {
			return fmt.Errorf("ids[%d]: %w", i, err)
		}
		if err := checkEntry(e.Reason, e.RevokedAt, e.Version, l.Version); err != nil {
			return fmt.Errorf("ids[%d] %s: %w", i, e.SPIFFEID, err)
		}
		if err := l.checkExpiry(e.NotAfter); err != nil {
			return fmt.Errorf("ids[%d] %s: %w", i, e.SPIFFEID, err)
		}
		if e.NotBefore.After(e.RevokedAt) {
			return fmt.Errorf("ids[%d] %s: not_before after revoked_at", i, e.SPIFFEID)
		}
		if i > 0 && CompareIDEntries(l.IDs[i-1], e) >= 0 {
			return fmt.Errorf("ids[%d] %s: not sorted or duplicated", i, e.SPIFFEID)
		}
	}
	for i, e := range l.Serials {
		if !CanonicalSerial(e.Serial) {
			return fmt.Errorf("serials[%d]: %q is not a canonical decimal serial", i, e.Serial)
		}
		if !e.SPIFFEID.IsZero() {
			if err := CheckWorkloadID(td, e.SPIFFEID); err != nil {
				return fmt.Errorf("serials[%d]: %w", i, err)
			}
		}
		if err := checkEntry(e.Reason, e.RevokedAt, e.Version, l.Version); err != nil {
			return fmt.Errorf("serials[%d] %s: %w", i, e.Serial, err)
		}
		if err := l.checkExpiry(e.NotAfter); err != nil {
			return fmt.Errorf("serials[%d] %s: %w", i, e.Serial, err)
		}
		if i > 0 && CompareSerials(l.Serials[i-1].Serial, e.Serial) >= 0 {
			return fmt.Errorf("serials[%d] %s: not sorted or duplicated", i, e.Serial)
		}
	}
	return l.checkIssuers()
}

// checkIssuers validates the issuer entries: hex SHA-256 fingerprints, sorted, unique.
func (l *DenyList) checkIssuers() error {
	for i, e := range l.Issuers {
		if len(e.KeyFingerprint) != sha256.Size*2 || strings.Trim(e.KeyFingerprint, "0123456789abcdef") != "" {
			return fmt.Errorf("issuers[%d]: %q is not a key fingerprint", i, e.KeyFingerprint)
		}
		if err := checkEntry("", e.RevokedAt, e.Version, l.Version); err != nil {
			return fmt.Errorf("issuers[%d] %s: %w", i, e.KeyFingerprint, err)
		}
		if err := l.checkExpiry(e.NotAfter); err != nil {
			return fmt.Errorf("issuers[%d] %s: %w", i, e.KeyFingerprint, err)
		}
		if i > 0 && l.Issuers[i-1].KeyFingerprint >= e.KeyFingerprint {
			return fmt.Errorf("issuers[%d] %s: not sorted or duplicated", i, e.KeyFingerprint)
		}
	}
	return nil
}

// checkExpiry refuses an entry that ExpiredThrough says was dropped.
func (l *DenyList) checkExpiry(notAfter time.Time) error {
	if !notAfter.IsZero() && !l.ExpiredThrough.IsZero() && !notAfter.After(l.ExpiredThrough) {
		return errors.New("not_after at or before expired_through: the entry was dropped")
	}
	return nil
}

func checkEntry(reason string, revokedAt time.Time, version, listVersion uint64) error {
	switch {
	case !ValidReason(reason):
		return fmt.Errorf("reason: at most %d printable ASCII characters", MaxReason)
	case revokedAt.IsZero():
		return errors.New("revoked_at missing")
	case version == 0 || version > listVersion:
		return fmt.Errorf("entry version %d outside 1..%d", version, listVersion)
	}
	return nil
}

// ValidReason reports whether r may stand as a deny-list entry's reason: at most
// MaxReason printable ASCII characters.
func ValidReason(r string) bool {
	return len(r) <= MaxReason && Printable(r)
}

// CanonicalSerial reports whether s is a positive decimal without leading zeros, as
// big.Int.String writes a serial.
func CanonicalSerial(s string) bool {
	if s == "" || len(s) > maxSerialDigits || s[0] == '0' {
		return false
	}
	for i := range len(s) {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return true
}

// CompareSerials orders canonical decimal serials numerically.
func CompareSerials(a, b string) int {
	return cmp.Or(cmp.Compare(len(a), len(b)), cmp.Compare(a, b))
}

func compareIDs(a, b spiffeid.ID) int { return cmp.Compare(a.String(), b.String()) }

// CompareIDEntries orders identity entries by SPIFFE ID, then version.
func CompareIDEntries(a, b DeniedID) int {
	return cmp.Or(compareIDs(a.SPIFFEID, b.SPIFFEID), cmp.Compare(a.Version, b.Version))
}

// NextDenyList decides whether got may replace held at now (this side's clock); held
// is nil when nothing is held yet. Both come from VerifyDenyList for the same trust
// domain. It returns:
//
//   - (true, nil) when got is newer and carries every entry of held unchanged, except
//     entries it accounts for as expired: a held entry's own (signed) not_after is at
//     or before got's expired_through, which is at or before got's issued_at (checked
//     by VerifyDenyList) and now;
//   - (false, nil) when got is the list held (same version, same content);
//   - an error wrapping ErrDenyListStale when got is older (replayed or rolled back);
//   - ErrDenyListConflict when got has the same version with other content, or
//     rewrites history (an entry new to held but dated at or before held's version,
//     or an expired_through earlier than held's);
//   - ErrDenyListGap when got is newer but lacks an entry of held that it does not
//     account for as expired, or changed one: versions in between were lost or
//     tampered with;
//   - ErrDenyListPremature when got drops an entry as expired whose not_after is
//     still ahead of now: this side's clock is behind the CA's (the same list is
//     accepted once it catches up).
//
// It is pure.
func NextDenyList(held, got *DenyList, now time.Time) (bool, error) {
	switch {
	case got == nil:
		return false, fmt.Errorf("%w: no list", ErrDenyListMalformed)
	case held == nil:
		return true, nil
	case got.TrustDomain != held.TrustDomain:
		return false, fmt.Errorf("%w: trust domain %q, held %q", ErrDenyListConflict, got.TrustDomain, held.TrustDomain)
	case got.Version < held.Version:
		return false, fmt.Errorf("%w: version %d, held %d", ErrDenyListStale, got.Version, held.Version)
	case got.Version == held.Version:
		if !SameDenyList(held, got) {
			return false, fmt.Errorf("%w: version %d differs from the one held", ErrDenyListConflict, got.Version)
		}
		return false, nil
	case got.ExpiredThrough.Before(held.ExpiredThrough):
		return false, fmt.Errorf("%w: version %d has expired_through %v, before the %v held",
			ErrDenyListConflict, got.Version, got.ExpiredThrough, held.ExpiredThrough)
	}
	idKey := func(e DeniedID) string { return e.SPIFFEID.String() + " version " + strconv.FormatUint(e.Version, 10) }
	idExpiry := func(e DeniedID) time.Time { return e.NotAfter }
	if _, err := extends(held, got, now, held.IDs, got.IDs, idKey, idExpiry, func(e DeniedID) uint64 { return e.Version }, sameDeniedID); err != nil {
		return false, err
	}
	serialKey := func(e DeniedSerial) string { return "serial " + e.Serial }
	serialExpiry := func(e DeniedSerial) time.Time { return e.NotAfter }
	if _, err := extends(held, got, now, held.Serials, got.Serials, serialKey, serialExpiry, func(e DeniedSerial) uint64 { return e.Version }, sameDeniedSerial); err != nil {
		return false, err
	}
	issuerKey := func(e DeniedIssuer) string { return "issuer " + e.KeyFingerprint }
	issuerExpiry := func(e DeniedIssuer) time.Time { return e.NotAfter }
	if _, err := extends(held, got, now, held.Issuers, got.Issuers, issuerKey, issuerExpiry, func(e DeniedIssuer) uint64 { return e.Version }, sameDeniedIssuer); err != nil {
		return false, err
	}
	return true, nil
}

// ExpiredEntries is how many entries of held a newer list got dropped as expired
// (after NextDenyList accepted it).
func ExpiredEntries(held, got *DenyList) int {
	if held == nil || got == nil {
		return 0
	}
	n := 0
	for _, e := range held.IDs {
		if !slices.ContainsFunc(got.IDs, func(g DeniedID) bool { return g.SPIFFEID == e.SPIFFEID && g.Version == e.Version }) {
			n++
		}
	}
	for _, e := range held.Serials {
		if !got.deniesSerial(e.Serial) {
			n++
		}
	}
	return n
}

// SameDenyList reports whether a and b are the same list (same version and entries).
func SameDenyList(a, b *DenyList) bool {
	return a.TrustDomain == b.TrustDomain && a.Version == b.Version && a.IssuedAt.Equal(b.IssuedAt) &&
		a.ExpiredThrough.Equal(b.ExpiredThrough) &&
		slices.EqualFunc(a.IDs, b.IDs, sameDeniedID) && slices.EqualFunc(a.Serials, b.Serials, sameDeniedSerial) &&
		slices.EqualFunc(a.Issuers, b.Issuers, sameDeniedIssuer)
}

// extends checks one kind of entry of a newer list got against held at now: every
// held entry is in got unchanged or accounted for as expired (else a gap, or
// premature when its expiry is after now), and every entry only got has is dated
// after held's version (else got rewrites history: a conflict). It returns how many
// held entries expired. key names an entry in errors.
func extends[E any](held, got *DenyList, now time.Time, heldEntries, gotEntries []E, key func(E) string,
	expiry func(E) time.Time, version func(E) uint64, same func(a, b E) bool,
) (int, error) {
	fresh := make(map[string]E, len(gotEntries))
	for _, e := range gotEntries {
		fresh[key(e)] = e
	}
	expired := 0
	for _, e := range heldEntries {
		g, ok := fresh[key(e)]
		if ok {
			if !same(e, g) {
				return 0, fmt.Errorf("%w: version %d changes %s of version %d", ErrDenyListGap, got.Version, key(e), held.Version)
			}
			delete(fresh, key(e))
			continue
		}
		// Dropped: only as expired, by the entry's own signed expiry.
		exp := expiry(e)
		switch {
		case exp.IsZero() || got.ExpiredThrough.IsZero() || exp.After(got.ExpiredThrough):
			return 0, fmt.Errorf("%w: version %d lacks %s of version %d", ErrDenyListGap, got.Version, key(e), held.Version)
		case exp.After(now):
			return 0, fmt.Errorf("%w: version %d drops %s as expired at %v, later than this clock's %v",
				ErrDenyListPremature, got.Version, key(e), exp, now)
		}
		expired++
	}
	for _, g := range fresh {
		if version(g) <= held.Version {
			return 0, fmt.Errorf("%w: version %d adds %s as of version %d, held %d lacks it",
				ErrDenyListConflict, got.Version, key(g), version(g), held.Version)
		}
	}
	return expired, nil
}

func sameDeniedID(a, b DeniedID) bool {
	return a.SPIFFEID == b.SPIFFEID && a.Reason == b.Reason && a.RevokedAt.Equal(b.RevokedAt) &&
		a.NotBefore.Equal(b.NotBefore) && a.NotAfter.Equal(b.NotAfter) && a.Version == b.Version
}

func sameDeniedSerial(a, b DeniedSerial) bool {
	return a.Serial == b.Serial && a.SPIFFEID == b.SPIFFEID && a.Reason == b.Reason &&
		a.RevokedAt.Equal(b.RevokedAt) && a.NotAfter.Equal(b.NotAfter) && a.Version == b.Version
}

func sameDeniedIssuer(a, b DeniedIssuer) bool {
	return a.KeyFingerprint == b.KeyFingerprint && a.RevokedAt.Equal(b.RevokedAt) && a.NotAfter.Equal(b.NotAfter) &&
		a.Version == b.Version
}
