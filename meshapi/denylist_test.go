package meshapi

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"errors"
	"math/big"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// listCA is a root and an intermediate with in-memory keys, to sign deny-lists in
// tests that do not need the HSM.
type listCA struct {
	root, inter *x509.Certificate
	rootKey     *ecdsa.PrivateKey
	interKey    *ecdsa.PrivateKey
}

func newListCA(t testing.TB, td spiffeid.TrustDomain) *listCA {
	t.Helper()
	now := time.Now()
	rootKey, interKey := newECKey(t), newECKey(t)
	rootTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test root " + td.Name()},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		URIs: []*url.URL{td.ID().URL()},
	}
	root := mustCert(t, rootTmpl, rootTmpl, rootKey.Public(), rootKey)
	interTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "test intermediate " + td.Name()},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, MaxPathLenZero: true,
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		URIs:     []*url.URL{td.ID().URL()},
	}
	inter := mustCert(t, interTmpl, root, interKey.Public(), rootKey)
	return &listCA{root: root, inter: inter, rootKey: rootKey, interKey: interKey}
}

// leaf issues a non-CA certificate for key, signed by the intermediate.
func (c *listCA) leaf(t testing.TB, key crypto.Signer, notAfter time.Time) *x509.Certificate {
	t.Helper()
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(3), NotBefore: time.Now().Add(-time.Hour), NotAfter: notAfter,
		KeyUsage: x509.KeyUsageDigitalSignature, BasicConstraintsValid: true,
		URIs: []*url.URL{spiffeid.RequireFromPath(testTD, "/host/a").URL()},
	}
	return mustCert(t, tmpl, c.inter, key.Public(), c.interKey)
}

func (c *listCA) sign(t testing.TB, l *DenyList) *SignedDenyList {
	t.Helper()
	s, err := SignDenyList(l, c.interKey, c.inter)
	if err != nil {
		t.Fatalf("SignDenyList: %v", err)
	}
	return s
}

func newECKey(t testing.TB) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func mustCert(t testing.TB, tmpl, parent *x509.Certificate, pub crypto.PublicKey, key crypto.Signer) *x509.Certificate {
	t.Helper()
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, key)
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

var (
	listT0   = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	idHostA  = spiffeid.RequireFromPath(testTD, "/host/a")
	idHostB  = spiffeid.RequireFromPath(testTD, "/host/b")
	idAgentX = spiffeid.RequireFromPath(testTD, "/agent/x")
)

// sampleList is version 3 of a list: host/a revoked at 2, serial 77 (of agent/x) at 3.
func sampleList() *DenyList {
	return &DenyList{
		TrustDomain: testTD.Name(),
		Version:     3,
		IssuedAt:    listT0.Add(3 * time.Minute),
		IDs:         []DeniedID{{SPIFFEID: idHostA, Reason: "key leaked", RevokedAt: listT0.Add(2 * time.Minute), Version: 2}},
		Serials: []DeniedSerial{
			{Serial: "9", SPIFFEID: idHostA, Reason: "key leaked", RevokedAt: listT0.Add(2 * time.Minute), NotAfter: listT0.Add(time.Hour), Version: 2},
			{Serial: "77", SPIFFEID: idAgentX, Reason: "lost laptop", RevokedAt: listT0.Add(3 * time.Minute), NotAfter: listT0.Add(time.Hour), Version: 3},
		},
	}
}

// Not parallel: AllocsPerRun refuses to run in a parallel test.
func TestDenies(t *testing.T) {
	hand := sampleList()
	indexed := sampleList()
	indexed.index()
	cases := []struct {
		name   string
		id     spiffeid.ID
		serial string
		want   bool
	}{
		{"revoked id, any serial", idHostA, "12345", true},
		{"revoked id, no serial", idHostA, "", true},
		{"revoked serial, other id", idHostB, "77", true},
		{"revoked serial, no id", spiffeid.ID{}, "77", true},
		{"neither", idHostB, "78", false},
		{"serial prefix is not the serial", idHostB, "7", false},
		{"zero id and empty serial", spiffeid.ID{}, "", false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			for name, l := range map[string]*DenyList{"indexed": indexed, "built by hand": hand} {
				if got := l.Denies(tc.id, tc.serial, time.Time{}); got != tc.want {
					t.Errorf("%s: Denies(%v, %q) = %v, want %v", name, tc.id, tc.serial, got, tc.want)
				}
			}
		})
	}
	var none *DenyList
	if none.Denies(idHostA, "9", time.Time{}) {
		t.Error("a nil list denies")
	}
	if n := testing.AllocsPerRun(100, func() { indexed.Denies(idHostB, "77", time.Time{}) }); n != 0 {
		t.Errorf("Denies allocates %v times", n)
	}
}

func TestVerifyDenyList(t *testing.T) {
	t.Parallel()
	ca := newListCA(t, testTD)
	other := newListCA(t, testTD) // another CA claiming the same trust domain
	roots := []*x509.Certificate{ca.root}
	now := time.Now()

	good := ca.sign(t, sampleList())
	l, err := VerifyDenyList(good, testTD, roots, now)
	if err != nil {
		t.Fatalf("VerifyDenyList(good): %v", err)
	}
	if ok, err := NextDenyList(nil, l, time.Now()); !ok || err != nil || !SameDenyList(l, sampleList()) || !l.Denies(idHostA, "", time.Time{}) {
		t.Fatalf("verified list %+v differs from the signed one", l)
	}
	// The root itself may sign (a CA certificate of the domain).
	if _, err := VerifyDenyList(mustSign(t, sampleList(), ca.rootKey, ca.root), testTD, roots, now); err != nil {
		t.Errorf("root-signed list: %v", err)
	}

	payload := func(mut func(m map[string]any)) []byte {
		var m map[string]any
		b, _ := json.Marshal(sampleList())
		if err := json.Unmarshal(b, &m); err != nil {
			t.Fatal(err)
		}
		mut(m)
		b, _ = json.Marshal(m)
		return b
	}
	signRaw := func(p []byte) *SignedDenyList {
		sig, err := ca.interKey.Sign(rand.Reader, denyListDigest(p), crypto.SHA256)
		if err != nil {
			t.Fatal(err)
		}
		return &SignedDenyList{Payload: p, Signature: sig, Signer: ca.inter.Raw}
	}
	serials := func(m map[string]any) []any { return m["serials"].([]any) }
	leafKey := newECKey(t)
	leaf := ca.leaf(t, leafKey, now.Add(time.Hour))
	foreignTD := spiffeid.RequireTrustDomainFromString("other.test")
	foreign := newListCA(t, foreignTD)
	foreignList := sampleList()
	foreignList.TrustDomain = foreignTD.Name()
	foreignList.IDs, foreignList.Serials = nil, nil

	cases := []struct {
		name string
		s    *SignedDenyList
		td   spiffeid.TrustDomain
		now  time.Time
		want error
	}{
		{"tampered payload", &SignedDenyList{Payload: append([]byte(nil), good.Payload[:len(good.Payload)-2]...), Signature: good.Signature, Signer: good.Signer}, testTD, now, ErrDenyListSignature},
		{"forged: other key, real signer certificate", mustSignAs(t, sampleList(), other.interKey, ca.inter), testTD, now, ErrDenyListSignature},
		{"wrong signer: another CA of the same name", other.sign(t, sampleList()), testTD, now, ErrDenyListSignature},
		{"signer is not a CA", mustSign(t, sampleList(), leafKey, leaf), testTD, now, ErrDenyListSignature},
		{"signer expired", good, testTD, now.Add(48 * time.Hour), ErrDenyListSignature},
		{"no signature", &SignedDenyList{Payload: good.Payload, Signer: good.Signer}, testTD, now, ErrDenyListSignature},
		{"garbage signer", &SignedDenyList{Payload: good.Payload, Signature: good.Signature, Signer: []byte{1, 2}}, testTD, now, ErrDenyListSignature},
		{"nil", nil, testTD, now, ErrDenyListMalformed},
		{"foreign domain, its own CA", foreign.sign(t, foreignList), testTD, now, ErrDenyListSignature},
		{"foreign domain, signed by our CA", ca.sign(t, foreignList), testTD, now, ErrDenyListMalformed},
		{"verified for another domain", good, foreignTD, now, ErrDenyListMalformed},
		{"unknown field", signRaw(payload(func(m map[string]any) { m["extra"] = 1 })), testTD, now, ErrDenyListMalformed},
		{"version 0", signRaw(payload(func(m map[string]any) { m["version"] = 0 })), testTD, now, ErrDenyListMalformed},
		{"no issued_at", signRaw(payload(func(m map[string]any) { delete(m, "issued_at") })), testTD, now, ErrDenyListMalformed},
		{"not JSON", signRaw([]byte("version: 3")), testTD, now, ErrDenyListMalformed},
		{"trailing data", signRaw(append(payload(func(map[string]any) {}), []byte(" {}")...)), testTD, now, ErrDenyListMalformed},
		{"unsorted serials", signRaw(payload(func(m map[string]any) {
			s := serials(m)
			s[0], s[1] = s[1], s[0]
		})), testTD, now, ErrDenyListMalformed},
		{"duplicated serial", signRaw(payload(func(m map[string]any) { m["serials"] = []any{serials(m)[0], serials(m)[0]} })), testTD, now, ErrDenyListMalformed},
		{"serial with a leading zero", signRaw(payload(func(m map[string]any) { serials(m)[0].(map[string]any)["serial"] = "09" })), testTD, now, ErrDenyListMalformed},
		{"serial not decimal", signRaw(payload(func(m map[string]any) { serials(m)[0].(map[string]any)["serial"] = "0x9" })), testTD, now, ErrDenyListMalformed},
		{"entry newer than the list", signRaw(payload(func(m map[string]any) { serials(m)[1].(map[string]any)["version"] = 4 })), testTD, now, ErrDenyListMalformed},
		{"entry version 0", signRaw(payload(func(m map[string]any) { serials(m)[1].(map[string]any)["version"] = 0 })), testTD, now, ErrDenyListMalformed},
		{"id of another domain", signRaw(payload(func(m map[string]any) {
			m["ids"].([]any)[0].(map[string]any)["spiffe_id"] = "spiffe://other.test/host/a"
		})), testTD, now, ErrDenyListMalformed},
		{"the domain itself as an id", signRaw(payload(func(m map[string]any) {
			m["ids"].([]any)[0].(map[string]any)["spiffe_id"] = "spiffe://mesh.test"
		})), testTD, now, ErrDenyListMalformed},
		{"reason not printable", signRaw(payload(func(m map[string]any) {
			m["ids"].([]any)[0].(map[string]any)["reason"] = "a\nb"
		})), testTD, now, ErrDenyListMalformed},
		{"no revoked_at", signRaw(payload(func(m map[string]any) { delete(serials(m)[0].(map[string]any), "revoked_at") })), testTD, now, ErrDenyListMalformed},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			l, err := VerifyDenyList(tc.s, tc.td, roots, tc.now)
			if !errors.Is(err, tc.want) {
				t.Fatalf("VerifyDenyList = %v, %v; want an error wrapping %v", l, err, tc.want)
			}
			if l != nil {
				t.Errorf("a refused list is returned: %+v", l)
			}
		})
	}
}

// mustSign signs l with key as the certificate cert claims (no key/certificate match
// check, to build forgeries).
func mustSignAs(t testing.TB, l *DenyList, key crypto.Signer, cert *x509.Certificate) *SignedDenyList {
	t.Helper()
	p, err := json.Marshal(l)
	if err != nil {
		t.Fatal(err)
	}
	sig, err := key.Sign(rand.Reader, denyListDigest(p), crypto.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	return &SignedDenyList{Payload: p, Signature: sig, Signer: cert.Raw}
}

func mustSign(t testing.TB, l *DenyList, key crypto.Signer, cert *x509.Certificate) *SignedDenyList {
	t.Helper()
	s, err := SignDenyList(l, key, cert)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestSignDenyListChecksKey(t *testing.T) {
	t.Parallel()
	ca := newListCA(t, testTD)
	if _, err := SignDenyList(sampleList(), ca.rootKey, ca.inter); err == nil {
		t.Error("SignDenyList signed with a key that is not the certificate's")
	}
}

func TestNextDenyList(t *testing.T) {
	t.Parallel()
	v3 := sampleList()
	newer := func(mut func(l *DenyList)) *DenyList {
		l := sampleList()
		l.Version, l.IssuedAt = 4, listT0.Add(4*time.Minute)
		l.IDs = append(l.IDs, DeniedID{SPIFFEID: idHostB, Reason: "decommissioned", RevokedAt: listT0.Add(4 * time.Minute), Version: 4})
		if mut != nil {
			mut(l)
		}
		return l
	}
	older := sampleList()
	older.Version, older.Serials = 2, older.Serials[:1]
	cases := []struct {
		name    string
		held    *DenyList
		got     *DenyList
		replace bool
		want    error
	}{
		{"nothing held", nil, v3, true, nil},
		{"same list", v3, sampleList(), false, nil},
		{"newer, cumulative", v3, newer(nil), true, nil},
		{"newer by several versions", older, newer(nil), true, nil},
		{"stale: replayed older version", v3, older, false, ErrDenyListStale},
		{"conflict: same version, other content", v3, func() *DenyList { l := sampleList(); l.Serials = l.Serials[:1]; return l }(), false, ErrDenyListConflict},
		{"conflict: same version, other time", v3, func() *DenyList { l := sampleList(); l.IssuedAt = l.IssuedAt.Add(time.Second); return l }(), false, ErrDenyListConflict},
		{"gap: newer lacks a held id", v3, newer(func(l *DenyList) { l.IDs = l.IDs[1:] }), false, ErrDenyListGap},
		{"gap: newer lacks a held serial", v3, newer(func(l *DenyList) { l.Serials = l.Serials[1:] }), false, ErrDenyListGap},
		{"gap: newer changed a held entry", v3, newer(func(l *DenyList) { l.Serials[0].Reason = "other" }), false, ErrDenyListGap},
		{"conflict: newer rewrites history", v3, newer(func(l *DenyList) { l.IDs[1].Version = 3 }), false, ErrDenyListConflict},
		{"conflict: other trust domain", v3, newer(func(l *DenyList) { l.TrustDomain = "other.test" }), false, ErrDenyListConflict},
		{"nothing received", v3, nil, false, ErrDenyListMalformed},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			replace, err := NextDenyList(tc.held, tc.got, time.Now())
			if replace != tc.replace || !errors.Is(err, tc.want) || (tc.want == nil && err != nil) {
				t.Errorf("NextDenyList = %v, %v; want %v, %v", replace, err, tc.replace, tc.want)
			}
		})
	}
}

func TestNextDenyListBuild(t *testing.T) {
	t.Parallel()
	cur := sampleList()
	cur.index()
	at := listT0.Add(10 * time.Minute)
	next, changed := cur.Successor(at,
		// The same revocation of idHostA again is no new entry.
		[]DeniedID{{SPIFFEID: idHostA, Reason: "again", RevokedAt: listT0.Add(2 * time.Minute)}, {SPIFFEID: idHostB, Reason: "gone", RevokedAt: at}},
		[]DeniedSerial{{Serial: "100", SPIFFEID: idHostB, RevokedAt: at}, {Serial: "77", Reason: "again", RevokedAt: at}, {Serial: "8", RevokedAt: at}})
	if !changed || next.Version != 4 || !next.IssuedAt.Equal(at) {
		t.Fatalf("next = version %d at %v (changed %v), want version 4 at %v", next.Version, next.IssuedAt, changed, at)
	}
	if ok, err := NextDenyList(cur, next, time.Now()); !ok || err != nil {
		t.Fatalf("the next version is not accepted after the current one: %v", err)
	}
	var gotSerials []string
	for _, e := range next.Serials {
		gotSerials = append(gotSerials, e.Serial)
	}
	if len(next.IDs) != 2 || next.IDs[1].SPIFFEID != idHostB || next.IDs[1].Version != 4 || next.IDs[0].Reason != "key leaked" {
		t.Errorf("ids = %+v", next.IDs)
	}
	if want := []string{"8", "9", "77", "100"}; !equalStrings(gotSerials, want) {
		t.Errorf("serials = %v, want %v (numeric order)", gotSerials, want)
	}
	if !next.Denies(idHostB, "", time.Time{}) || !next.Denies(spiffeid.ID{}, "8", time.Time{}) {
		t.Error("the next list is not indexed")
	}
	if cur.Version != 3 || len(cur.Serials) != 2 {
		t.Error("nextDenyList modified the current list")
	}
	if same, changed := cur.Successor(at, []DeniedID{{SPIFFEID: idHostA, RevokedAt: listT0.Add(2 * time.Minute)}}, []DeniedSerial{{Serial: "9"}}); changed || same != cur {
		t.Error("nothing new still made a new version")
	}
	// Signed and verified, the built list round-trips.
	ca := newListCA(t, testTD)
	l, err := VerifyDenyList(ca.sign(t, next), testTD, []*x509.Certificate{ca.root}, time.Now())
	if err != nil || !SameDenyList(l, next) {
		t.Fatalf("round trip: %v", err)
	}
}

func equalStrings(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// FuzzVerifyDenyList feeds arbitrary payloads, correctly signed so that they reach the
// decoder, and arbitrary signed envelopes: nothing panics, and whatever is accepted
// re-encodes to a list that verifies to the same content.
func FuzzVerifyDenyList(f *testing.F) {
	ca := newListCA(f, testTD)
	good := ca.sign(f, sampleList())
	f.Add(good.Payload, good.Signature)
	empty := &DenyList{TrustDomain: testTD.Name(), Version: 1, IssuedAt: listT0, IDs: []DeniedID{}, Serials: []DeniedSerial{}}
	f.Add(ca.sign(f, empty).Payload, []byte{})
	roots := []*x509.Certificate{ca.root}
	now := time.Now()
	f.Fuzz(func(t *testing.T, payload, signature []byte) {
		// As received: almost always a bad signature, never a panic.
		if l, err := VerifyDenyList(&SignedDenyList{Payload: payload, Signature: signature, Signer: ca.inter.Raw}, testTD, roots, now); err == nil {
			checkReencodes(t, ca, l)
		}
		// Correctly signed: exercises the decoder.
		sig, err := ca.interKey.Sign(rand.Reader, denyListDigest(payload), crypto.SHA256)
		if err != nil {
			t.Fatal(err)
		}
		l, err := VerifyDenyList(&SignedDenyList{Payload: payload, Signature: sig, Signer: ca.inter.Raw}, testTD, roots, now)
		if err != nil {
			if !errors.Is(err, ErrDenyListMalformed) {
				t.Fatalf("a correctly signed payload refused for its signature: %v", err)
			}
			return
		}
		checkReencodes(t, ca, l)
	})
}

func checkReencodes(t *testing.T, ca *listCA, l *DenyList) {
	t.Helper()
	again, err := VerifyDenyList(ca.sign(t, l), testTD, []*x509.Certificate{ca.root}, time.Now())
	if err != nil {
		t.Fatalf("an accepted list does not verify once re-encoded: %v", err)
	}
	if !SameDenyList(l, again) {
		t.Fatalf("re-encoding changed the list: %+v -> %+v", l, again)
	}
	if same, err := NextDenyList(l, again, time.Now()); same || err != nil {
		t.Fatalf("NextDenyList(list, re-encoded, time.Now()) = %v, %v; want false, nil", same, err)
	}
	for _, e := range l.IDs {
		if !again.Denies(e.SPIFFEID, "", time.Time{}) {
			t.Fatalf("%s not denied after re-encoding", e.SPIFFEID)
		}
	}
}

// TestDenyListFuzzSeeds keeps the checked-in seed corpus meaningful: every file holds
// a payload and a signature, and the valid-* payloads verify once signed.
func TestDenyListFuzzSeeds(t *testing.T) {
	t.Parallel()
	ca := newListCA(t, testTD)
	files, err := filepath.Glob(filepath.Join("testdata", "fuzz", "FuzzVerifyDenyList", "*"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no seed corpus: %v", err)
	}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		args := corpusArgs(t, b)
		if len(args) != 2 {
			t.Fatalf("%s: %d values, want 2 (payload, signature)", f, len(args))
		}
		sig, err := ca.interKey.Sign(rand.Reader, denyListDigest(args[0]), crypto.SHA256)
		if err != nil {
			t.Fatal(err)
		}
		_, err = VerifyDenyList(&SignedDenyList{Payload: args[0], Signature: sig, Signer: ca.inter.Raw}, testTD, []*x509.Certificate{ca.root}, time.Now())
		if valid := strings.HasPrefix(filepath.Base(f), "valid-"); valid != (err == nil) {
			t.Errorf("%s: VerifyDenyList = %v", f, err)
		}
	}
}

// corpusArgs decodes a fuzz corpus file of []byte values.
func corpusArgs(t *testing.T, file []byte) [][]byte {
	t.Helper()
	var out [][]byte
	for _, line := range strings.Split(strings.TrimSpace(strings.TrimPrefix(string(file), "go test fuzz v1\n")), "\n") {
		s := strings.TrimSuffix(strings.TrimPrefix(line, "[]byte("), ")")
		v, err := strconv.Unquote(s)
		if err != nil {
			t.Fatalf("corpus line %q: %v", line, err)
		}
		out = append(out, []byte(v))
	}
	return out
}
