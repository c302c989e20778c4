package meshapi

import (
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

func TestParseRegistration(t *testing.T) {
	t.Parallel()
	ok := RegisterRequest{Addresses: []string{"10.0.0.2", "fd00::2"}, TunnelPort: 15008, Transports: []string{"tls"}}
	for _, tc := range []struct {
		name   string
		mutate func(*RegisterRequest)
		want   *HostRegistration // nil: refused
	}{
		{"valid", func(*RegisterRequest) {}, &HostRegistration{Addresses: addrs("10.0.0.2", "fd00::2"), TunnelPort: 15008, Transports: []string{"tls"}}},
		{"addresses sorted and deduplicated", func(r *RegisterRequest) { r.Addresses = []string{"fd00::2", "10.0.0.2", "10.0.0.2"} },
			&HostRegistration{Addresses: addrs("10.0.0.2", "fd00::2"), TunnelPort: 15008, Transports: []string{"tls"}}},
		{"mapped address unmapped", func(r *RegisterRequest) { r.Addresses = []string{"::ffff:10.0.0.2", "10.0.0.2"} },
			&HostRegistration{Addresses: addrs("10.0.0.2"), TunnelPort: 15008, Transports: []string{"tls"}}},
		{"transports default to tls", func(r *RegisterRequest) { r.Transports = nil },
			&HostRegistration{Addresses: addrs("10.0.0.2", "fd00::2"), TunnelPort: 15008, Transports: []string{"tls"}}},
		{"transport order kept, duplicates dropped", func(r *RegisterRequest) { r.Transports = []string{"quic", "h2", "quic", "tls"} },
			&HostRegistration{Addresses: addrs("10.0.0.2", "fd00::2"), TunnelPort: 15008, Transports: []string{"quic", "h2", "tls"}}},
		{"bundle version kept", func(r *RegisterRequest) { r.BundleVersion = "2030-01-01T00:00:00Z/3" },
			&HostRegistration{Addresses: addrs("10.0.0.2", "fd00::2"), TunnelPort: 15008, Transports: []string{"tls"}, BundleVersion: "2030-01-01T00:00:00Z/3"}},
		{"port 65535", func(r *RegisterRequest) { r.TunnelPort = 65535 },
			&HostRegistration{Addresses: addrs("10.0.0.2", "fd00::2"), TunnelPort: 65535, Transports: []string{"tls"}}},
		{"no addresses", func(r *RegisterRequest) { r.Addresses = nil }, nil},
		{"too many addresses", func(r *RegisterRequest) {
			r.Addresses = slices.Repeat([]string{"10.0.0.1"}, MaxAddresses+1)
		}, nil},
		{"host name", func(r *RegisterRequest) { r.Addresses = []string{"host-a.mesh.test"} }, nil},
		{"address with port", func(r *RegisterRequest) { r.Addresses = []string{"10.0.0.2:15008"} }, nil},
		{"cidr", func(r *RegisterRequest) { r.Addresses = []string{"10.0.0.0/24"} }, nil},
		{"zoned", func(r *RegisterRequest) { r.Addresses = []string{"fe80::1%eth0"} }, nil},
		{"unspecified v4", func(r *RegisterRequest) { r.Addresses = []string{"0.0.0.0"} }, nil},
		{"unspecified v6", func(r *RegisterRequest) { r.Addresses = []string{"::"} }, nil},
		{"unspecified mapped", func(r *RegisterRequest) { r.Addresses = []string{"::ffff:0.0.0.0"} }, nil},
		{"multicast", func(r *RegisterRequest) { r.Addresses = []string{"224.0.0.1"} }, nil},
		{"port 0", func(r *RegisterRequest) { r.TunnelPort = 0 }, nil},
		{"port negative", func(r *RegisterRequest) { r.TunnelPort = -1 }, nil},
		{"port 65536", func(r *RegisterRequest) { r.TunnelPort = 65536 }, nil},
		{"transport uppercase", func(r *RegisterRequest) { r.Transports = []string{"TLS"} }, nil},
		{"transport empty", func(r *RegisterRequest) { r.Transports = []string{""} }, nil},
		{"transport too long", func(r *RegisterRequest) { r.Transports = []string{strings.Repeat("x", maxTransportLen+1)} }, nil},
		{"too many transports", func(r *RegisterRequest) { r.Transports = slices.Repeat([]string{"tls"}, maxTransports+1) }, nil},
		{"bundle version too long", func(r *RegisterRequest) { r.BundleVersion = strings.Repeat("v", maxBundleVersion+1) }, nil},
		{"bundle version with control characters", func(r *RegisterRequest) { r.BundleVersion = "v1\n" }, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			req := ok
			req.Addresses = slices.Clone(ok.Addresses)
			tc.mutate(&req)
			got, err := ParseRegistration(idA, req)
			if tc.want == nil {
				if err == nil {
					t.Fatalf("accepted: %+v", got)
				}
				t.Logf("refused: %v", err)
				return
			}
			if err != nil {
				t.Fatalf("refused: %v", err)
			}
			want := *tc.want
			want.ID = idA
			if got.ID != want.ID || !slices.Equal(got.Addresses, want.Addresses) || got.TunnelPort != want.TunnelPort ||
				!slices.Equal(got.Transports, want.Transports) || got.BundleVersion != want.BundleVersion {
				t.Errorf("got %+v, want %+v", got, want)
			}
		})
	}
}

func TestParseWatchQuery(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name, since, wait string
		wantSince         uint64
		wantWait          time.Duration
		ok                bool
	}{
		{"defaults", "", "", 0, DefaultWatchWait, true},
		{"explicit", "42", "10s", 42, 10 * time.Second, true},
		{"zero wait answers at once", "1", "0s", 1, 0, true},
		{"wait capped", "1", "10m", 1, MaxWatchWait, true},
		{"max uint64", "18446744073709551615", "", 1<<64 - 1, DefaultWatchWait, true},
		{"negative since", "-1", "", 0, 0, false},
		{"since overflow", "18446744073709551616", "", 0, 0, false},
		{"since not a number", "abc", "", 0, 0, false},
		{"wait without unit", "1", "25", 0, 0, false},
		{"negative wait", "1", "-1s", 0, 0, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			since, wait, err := ParseWatchQuery(tc.since, tc.wait)
			if tc.ok != (err == nil) {
				t.Fatalf("err = %v, ok wanted: %v", err, tc.ok)
			}
			if tc.ok && (since != tc.wantSince || wait != tc.wantWait) {
				t.Errorf("got (%d, %v), want (%d, %v)", since, wait, tc.wantSince, tc.wantWait)
			}
		})
	}
}

func TestIsHostID(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		id   spiffeid.ID
		want bool
	}{
		{"host", spiffeid.RequireFromPath(testTD, "/host/a"), true},
		{"nested host", spiffeid.RequireFromPath(testTD, "/host/eu/a"), true},
		{"agent", spiffeid.RequireFromPath(testTD, "/agent/x"), false},
		{"bare host segment", spiffeid.RequireFromPath(testTD, "/host"), false},
		{"host prefix trick", spiffeid.RequireFromPath(testTD, "/hostile/a"), false},
		{"admin", spiffeid.RequireFromPath(testTD, "/admin/root"), false},
		{"trust domain", testTD.ID(), false},
		{"zero", spiffeid.ID{}, false},
	} {
		if got := IsHostID(tc.id); got != tc.want {
			t.Errorf("%s: IsHostID(%q) = %v, want %v", tc.name, tc.id, got, tc.want)
		}
	}
}

func TestDecodeStrict(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name, body string
		ok         bool
	}{
		{"valid", `{"addresses":["10.0.0.1"],"tunnel_port":1}`, true},
		{"trailing whitespace", "{\"tunnel_port\":1}\n", true},
		{"unknown field", `{"tunnel_port":1,"spiffe_id":"spiffe://mesh.test/host/evil"}`, false},
		{"two objects", `{"tunnel_port":1}{"tunnel_port":2}`, false},
		{"trailing garbage", `{"tunnel_port":1} x`, false},
		{"wrong type", `{"tunnel_port":"1"}`, false},
		{"empty", ``, false},
		{"array", `[]`, false},
	} {
		var req RegisterRequest
		if err := DecodeStrict(strings.NewReader(tc.body), &req); tc.ok != (err == nil) {
			t.Errorf("%s: err = %v, ok wanted: %v", tc.name, err, tc.ok)
		}
	}
}

func TestCheckAdvertisable(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		addr string
		ok   bool
	}{
		{"10.0.0.1", true},
		{"127.0.0.1", true},
		{"fd00::1", true},
		{"::ffff:10.0.0.1", true},
		{"fe80::1", true},
		{"fe80::1%eth0", false},
		{"0.0.0.0", false},
		{"::", false},
		{"ff02::1", false},
	} {
		if err := CheckAdvertisable(netip.MustParseAddr(tc.addr)); tc.ok != (err == nil) {
			t.Errorf("%s: %v, ok wanted: %v", tc.addr, err, tc.ok)
		}
	}
}
