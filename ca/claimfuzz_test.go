package ca

import (
	"net/netip"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/meshapi"
)

// FuzzDecodeClaims: StateDir/claims.json never crashes the CA, and what it accepts
// is valid and free of overlaps.
func FuzzDecodeClaims(f *testing.F) {
	f.Add([]byte(`{"hosts":[{"host":"spiffe://mesh.test/host/a","prefixes":["10.0.0.0/24","fd00::/64"],"source":"admin","at":"2030-01-01T00:00:00Z"}]}`))
	f.Add([]byte(`{"hosts":[{"host":"spiffe://mesh.test/host/b","prefixes":["192.0.2.5/32"],"source":"learnt","from":"192.0.2.5","at":"2030-01-01T00:00:00Z"}]}`))
	f.Add([]byte(`{"hosts":[]}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		set, err := decodeClaims(testTD, b)
		if err != nil {
			return
		}
		for _, c := range set.sorted {
			if _, err := checkHostClaim(testTD, c); err != nil {
				t.Fatalf("accepted an invalid claim %+v: %v", c, err)
			}
			if err := set.overlap(c); err != nil {
				t.Fatalf("accepted overlapping claims: %v", err)
			}
		}
	})
}

// FuzzParseClaimPrefix: operator input never crashes, and what is accepted is a
// masked, unmapped prefix that parses back to itself.
func FuzzParseClaimPrefix(f *testing.F) {
	for _, s := range []string{"10.0.0.0/24", "10.0.0.1", "fd00::/64", "::ffff:10.0.0.0/120", "10.0.0.1/24", "fe80::1%eth0", "0.0.0.0/0"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		p, err := ParseClaimPrefix(s)
		if err != nil {
			return
		}
		if p != p.Masked() || p.Addr().Is4In6() || p.Bits() == 0 {
			t.Fatalf("ParseClaimPrefix(%q) = %v", s, p)
		}
		if again, err := ParseClaimPrefix(p.String()); err != nil || again != p {
			t.Fatalf("ParseClaimPrefix(%q) = %v, then %v %v", s, p, again, err)
		}
	})
}

// BenchmarkClaimCheck is the claim check of a heartbeat, in a mesh of 10,000 hosts
// with one /32 each: the allowed case (every heartbeat) and a refusal, which scans the
// other claims for the owner; and what a first registration and a CA start cost.
func BenchmarkClaimCheck(b *testing.B) {
	var claims []meshapi.HostClaim
	for h := range 10000 {
		a := netip.AddrFrom4([4]byte{10, byte(h >> 16), byte(h >> 8), byte(h)})
		claims = append(claims, meshapi.HostClaim{Host: spiffeid.RequireFromPathf(testTD, "/host/h%d", h),
			Prefixes: []netip.Prefix{hostPrefix(a)}, Source: meshapi.ClaimLearnt})
	}
	set, err := newClaimSet(claims)
	if err != nil {
		b.Fatal(err)
	}
	own := set.sorted[500]
	b.Run("allowed", func(b *testing.B) {
		b.ReportAllocs()
		addrs := []netip.Addr{own.Prefixes[0].Addr()}
		for b.Loop() {
			if set.check(own, addrs) != nil {
				b.Fatal("refused")
			}
		}
	})
	b.Run("foreign", func(b *testing.B) {
		addrs := []netip.Addr{set.sorted[9000].Prefixes[0].Addr()}
		for b.Loop() {
			if set.check(own, addrs) == nil {
				b.Fatal("allowed")
			}
		}
	})
	// A host's first registration adds its claim (the file write aside).
	b.Run("learn", func(b *testing.B) {
		c := meshapi.HostClaim{Host: spiffeid.RequireFromPath(testTD, "/host/new"), Prefixes: prefixes("192.0.2.1/32"), Source: meshapi.ClaimLearnt}
		for b.Loop() {
			if _, err := set.with(c); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("load", func(b *testing.B) {
		for b.Loop() {
			if _, err := newClaimSet(claims); err != nil {
				b.Fatal(err)
			}
		}
	})
}
