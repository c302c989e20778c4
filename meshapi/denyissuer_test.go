package meshapi

import (
	"crypto/x509"
	"errors"
	"strings"
	"testing"
	"time"
)

// An issuer retired by a rotation of the trust anchors goes on the list by its key
// fingerprint, survives signing and verification, is carried by later versions, and
// dropped only as expired, like every entry.
func TestDeniedIssuer(t *testing.T) {
	t.Parallel()
	ca := newListCA(t, testTD)
	now := time.Now().UTC().Round(0)
	fp := KeyFingerprint(ca.inter)
	v1 := FirstDenyList(testTD.Name(), now.Add(-time.Minute))

	resigned := v1.WithIssuer(now, nil)
	if resigned.Version != 2 || len(resigned.Issuers) != 0 {
		t.Fatalf("re-issued list: version %d issuers %v", resigned.Version, resigned.Issuers)
	}
	v3 := resigned.WithIssuer(now, &DeniedIssuer{KeyFingerprint: fp, RevokedAt: now, NotAfter: now.Add(time.Hour)})
	got, err := VerifyDenyList(ca.sign(t, v3), testTD, []*x509.Certificate{ca.root}, now)
	if err != nil {
		t.Fatalf("VerifyDenyList: %v", err)
	}
	if !got.DeniesIssuer(fp) || got.DeniesIssuer(strings.Repeat("0", 64)) || got.Issuers[0].Version != 3 {
		t.Fatalf("issuers %+v", got.Issuers)
	}
	if ok, err := NextDenyList(resigned, got, now); !ok || err != nil {
		t.Fatalf("NextDenyList(v2, v3) = %v, %v", ok, err)
	}
	if again := got.WithIssuer(now, &DeniedIssuer{KeyFingerprint: fp, RevokedAt: now}); len(again.Issuers) != 1 {
		t.Fatalf("issuer listed twice: %+v", again.Issuers)
	}

	// A later version without it, before it expired: a gap.
	lost := &DenyList{TrustDomain: v3.TrustDomain, Version: 4, IssuedAt: now, IDs: []DeniedID{}, Serials: []DeniedSerial{}}
	if _, err := NextDenyList(got, lost, now); !errors.Is(err, ErrDenyListGap) {
		t.Fatalf("NextDenyList without the issuer: %v, want a gap", err)
	}
	// Once its certificates have expired, the next version drops it and says so.
	later := now.Add(2 * time.Hour)
	pruned, changed := got.Successor(later, nil, nil)
	if !changed || len(pruned.Issuers) != 0 || pruned.ExpiredThrough.IsZero() {
		t.Fatalf("Successor after expiry: changed %v issuers %v", changed, pruned.Issuers)
	}
	if ok, err := NextDenyList(got, pruned, later); !ok || err != nil {
		t.Fatalf("NextDenyList(pruned) = %v, %v", ok, err)
	}
}

func TestDeniedIssuerMalformed(t *testing.T) {
	t.Parallel()
	ca := newListCA(t, testTD)
	now := time.Now().UTC().Round(0)
	fp := KeyFingerprint(ca.inter)
	base := func(issuers ...DeniedIssuer) *DenyList {
		return &DenyList{TrustDomain: testTD.Name(), Version: 2, IssuedAt: now, IDs: []DeniedID{}, Serials: []DeniedSerial{},
			Issuers: issuers}
	}
	tests := []struct {
		name string
		l    *DenyList
	}{
		{"not hex", base(DeniedIssuer{KeyFingerprint: strings.Repeat("z", 64), RevokedAt: now, Version: 1})},
		{"upper case", base(DeniedIssuer{KeyFingerprint: strings.ToUpper(fp), RevokedAt: now, Version: 1})},
		{"short", base(DeniedIssuer{KeyFingerprint: fp[:62], RevokedAt: now, Version: 1})},
		{"no revoked_at", base(DeniedIssuer{KeyFingerprint: fp, Version: 1})},
		{"version ahead", base(DeniedIssuer{KeyFingerprint: fp, RevokedAt: now, Version: 3})},
		{"duplicated", base(DeniedIssuer{KeyFingerprint: fp, RevokedAt: now, Version: 1},
			DeniedIssuer{KeyFingerprint: fp, RevokedAt: now, Version: 2})},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			if _, err := VerifyDenyList(ca.sign(t, tc.l), testTD, []*x509.Certificate{ca.root}, now); !errors.Is(err, ErrDenyListMalformed) {
				t.Fatalf("VerifyDenyList: %v, want malformed", err)
			}
		})
	}
}
