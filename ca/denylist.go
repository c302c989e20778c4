package ca

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
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// denyListContext is prepended to the payload before hashing, so that a deny-list
// signature can never be mistaken for (or made from) any other signature of the
// intermediate key: certificates, CRLs, OCSP answers.
const denyListContext = "agentmesh deny-list v1\n"

const (
	// maxRevokeReason bounds the operator's free-text reason, in bytes of printable
	// ASCII.
	maxRevokeReason = 256
	// maxSerialDigits bounds a decimal serial: RFC 5280 serials are at most 20 octets,
	// 49 decimal digits.
	maxSerialDigits = 49
)

// DenyList is one version of the CA's revocation deny-list. Lists are cumulative: a
// newer version contains every entry of every older one, unchanged. A DenyList is
// immutable once built (VerifyDenyList returns a fresh one): share it, never modify it.
type DenyList struct {
	// TrustDomain is the name of the trust domain whose CA signed the list.
	TrustDomain string `json:"trust_domain"`
	// Version starts at 1 (the empty list a CA signs on first start) and increases by
	// one per change; the CA persists it across restarts.
	Version uint64 `json:"version"`
	// IssuedAt is when the CA signed this version.
	IssuedAt time.Time `json:"issued_at"`
	// IDs are the revoked identities, sorted by SPIFFE ID, unique. No certificate
	// for them is valid, whatever its serial, and the CA issues none.
	IDs []DeniedID `json:"ids"`
	// Serials are the revoked certificates, sorted by serial in numeric order, unique.
	Serials []DeniedSerial `json:"serials"`

	// Lookup indexes, built by VerifyDenyList and by the CA; nil on a list built by
	// hand, which Denies then scans.
	ids     map[spiffeid.ID]struct{}
	serials map[string]struct{}
}

// DeniedID is a revoked identity.
type DeniedID struct {
	SPIFFEID  spiffeid.ID `json:"spiffe_id"`
	Reason    string      `json:"reason,omitempty"`
	RevokedAt time.Time   `json:"revoked_at"`
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

// Denies reports whether a certificate for id with this serial (decimal) is revoked:
// the identity is, or the serial is. It is O(1) and does not allocate on a list from
// VerifyDenyList or the CA. Safe for concurrent use. A nil list denies nothing.
func (l *DenyList) Denies(id spiffeid.ID, serial string) bool {
	if l == nil {
		return false
	}
	if l.ids != nil || l.serials != nil {
		if _, ok := l.ids[id]; ok && !id.IsZero() {
			return true
		}
		_, ok := l.serials[serial]
		return ok && serial != ""
	}
	// A list built by hand: scan it.
	for i := range l.IDs {
		if !id.IsZero() && l.IDs[i].SPIFFEID == id {
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

// index builds the lookup indexes Denies uses.
func (l *DenyList) index() {
	l.ids = make(map[spiffeid.ID]struct{}, len(l.IDs))
	for _, e := range l.IDs {
		l.ids[e.SPIFFEID] = struct{}{}
	}
	l.serials = make(map[string]struct{}, len(l.Serials))
	for _, e := range l.Serials {
		l.serials[e.Serial] = struct{}{}
	}
}

// deniesID reports whether the identity itself is revoked (not only some of its
// certificates).
func (l *DenyList) deniesID(id spiffeid.ID) bool {
	return l.Denies(id, "")
}

// deniesSerial reports whether the serial is revoked.
func (l *DenyList) deniesSerial(serial string) bool {
	return l.Denies(spiffeid.ID{}, serial)
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

// signDenyList encodes l and signs it with signer, the key of the CA certificate
// cert (an ECDSA key, possibly in a token).
func signDenyList(l *DenyList, signer crypto.Signer, cert *x509.Certificate) (*SignedDenyList, error) {
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
		return nil, fmt.Errorf("%w: sign deny list: %w", ErrHSM, err)
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
	if err := decodeStrict(bytes.NewReader(payload), &l); err != nil {
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
	}
	for i, e := range l.IDs {
		if err := checkIssuable(td, e.SPIFFEID); err != nil {
			return fmt.Errorf("ids[%d]: %w", i, err)
		}
		if err := checkEntry(e.Reason, e.RevokedAt, e.Version, l.Version); err != nil {
			return fmt.Errorf("ids[%d] %s: %w", i, e.SPIFFEID, err)
		}
		if i > 0 && compareIDs(l.IDs[i-1].SPIFFEID, e.SPIFFEID) >= 0 {
			return fmt.Errorf("ids[%d] %s: not sorted or duplicated", i, e.SPIFFEID)
		}
	}
	for i, e := range l.Serials {
		if !canonicalSerial(e.Serial) {
			return fmt.Errorf("serials[%d]: %q is not a canonical decimal serial", i, e.Serial)
		}
		if !e.SPIFFEID.IsZero() {
			if err := checkIssuable(td, e.SPIFFEID); err != nil {
				return fmt.Errorf("serials[%d]: %w", i, err)
			}
		}
		if err := checkEntry(e.Reason, e.RevokedAt, e.Version, l.Version); err != nil {
			return fmt.Errorf("serials[%d] %s: %w", i, e.Serial, err)
		}
		if i > 0 && compareSerials(l.Serials[i-1].Serial, e.Serial) >= 0 {
			return fmt.Errorf("serials[%d] %s: not sorted or duplicated", i, e.Serial)
		}
	}
	return nil
}

func checkEntry(reason string, revokedAt time.Time, version, listVersion uint64) error {
	switch {
	case !validReason(reason):
		return fmt.Errorf("reason: at most %d printable ASCII characters", maxRevokeReason)
	case revokedAt.IsZero():
		return errors.New("revoked_at missing")
	case version == 0 || version > listVersion:
		return fmt.Errorf("entry version %d outside 1..%d", version, listVersion)
	}
	return nil
}

func validReason(r string) bool {
	return len(r) <= maxRevokeReason && printable(r)
}

// canonicalSerial reports whether s is a positive decimal without leading zeros, as
// big.Int.String writes a serial.
func canonicalSerial(s string) bool {
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

// compareSerials orders canonical decimal serials numerically.
func compareSerials(a, b string) int {
	return cmp.Or(cmp.Compare(len(a), len(b)), cmp.Compare(a, b))
}

func compareIDs(a, b spiffeid.ID) int { return cmp.Compare(a.String(), b.String()) }

// NextDenyList decides whether got may replace held; held is nil when nothing is held
// yet. Both come from VerifyDenyList for the same trust domain. It returns:
//
//   - (true, nil) when got is newer and carries every entry of held, unchanged;
//   - (false, nil) when got is the list held (same version, same content);
//   - an error wrapping ErrDenyListStale when got is older (replayed or rolled back);
//   - ErrDenyListConflict when got has the same version with other content, or
//     rewrites history (an entry new to held but dated at or before held's version);
//   - ErrDenyListGap when got is newer but lacks an entry of held or changed it: lists
//     are cumulative, so versions in between were lost or tampered with.
//
// It is pure.
func NextDenyList(held, got *DenyList) (bool, error) {
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
		if !sameDenyList(held, got) {
			return false, fmt.Errorf("%w: version %d differs from the one held", ErrDenyListConflict, got.Version)
		}
		return false, nil
	}
	idKey := func(e DeniedID) string { return e.SPIFFEID.String() }
	if err := extends(held, got, held.IDs, got.IDs, idKey, func(e DeniedID) uint64 { return e.Version }, sameDeniedID); err != nil {
		return false, err
	}
	serialKey := func(e DeniedSerial) string { return "serial " + e.Serial }
	if err := extends(held, got, held.Serials, got.Serials, serialKey, func(e DeniedSerial) uint64 { return e.Version }, sameDeniedSerial); err != nil {
		return false, err
	}
	return true, nil
}

func sameDenyList(a, b *DenyList) bool {
	return a.TrustDomain == b.TrustDomain && a.Version == b.Version && a.IssuedAt.Equal(b.IssuedAt) &&
		slices.EqualFunc(a.IDs, b.IDs, sameDeniedID) && slices.EqualFunc(a.Serials, b.Serials, sameDeniedSerial)
}

// extends checks one kind of entry of a newer list got against held: every held entry
// is in got unchanged (else a gap), and every entry only got has is dated after held's
// version (else got rewrites history: a conflict). key names an entry in errors.
func extends[E any](held, got *DenyList, heldEntries, gotEntries []E, key func(E) string,
	version func(E) uint64, same func(a, b E) bool,
) error {
	fresh := make(map[string]E, len(gotEntries))
	for _, e := range gotEntries {
		fresh[key(e)] = e
	}
	for _, e := range heldEntries {
		g, ok := fresh[key(e)]
		if !ok || !same(e, g) {
			return fmt.Errorf("%w: version %d lacks %s of version %d", ErrDenyListGap, got.Version, key(e), held.Version)
		}
		delete(fresh, key(e))
	}
	for _, g := range fresh {
		if version(g) <= held.Version {
			return fmt.Errorf("%w: version %d adds %s as of version %d, held %d lacks it",
				ErrDenyListConflict, got.Version, key(g), version(g), held.Version)
		}
	}
	return nil
}

func sameDeniedID(a, b DeniedID) bool {
	return a.SPIFFEID == b.SPIFFEID && a.Reason == b.Reason && a.RevokedAt.Equal(b.RevokedAt) && a.Version == b.Version
}

func sameDeniedSerial(a, b DeniedSerial) bool {
	return a.Serial == b.Serial && a.SPIFFEID == b.SPIFFEID && a.Reason == b.Reason &&
		a.RevokedAt.Equal(b.RevokedAt) && a.NotAfter.Equal(b.NotAfter) && a.Version == b.Version
}
