package authority

import (
	"net"
	"slices"
	"testing"
)

func TestServerNames(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name       string
		configured []string
		listen     string
		urlHost    string
		want       []string // prefix of the result, then urlHost must be present
	}{
		{"defaults, wildcard listen", nil, ":9443", "127.0.0.1", []string{"localhost", "127.0.0.1", "::1"}},
		{"defaults, specific listen", nil, "10.1.2.3:9443", "10.1.2.3", []string{"localhost", "127.0.0.1", "::1", "10.1.2.3"}},
		{"configured, url host appended", []string{"ca.mesh.test"}, "10.1.2.3:9443", "10.1.2.3", []string{"ca.mesh.test", "10.1.2.3"}},
		{"configured, duplicates dropped", []string{"ca", "ca", "127.0.0.1"}, ":0", "127.0.0.1", []string{"ca", "127.0.0.1"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			got := serverNames(tc.configured, tc.listen, tc.urlHost)
			if len(got) < len(tc.want) || !slices.Equal(got[:len(tc.want)], tc.want) {
				t.Errorf("serverNames = %v, want prefix %v", got, tc.want)
			}
			if !slices.Contains(got, tc.urlHost) {
				t.Errorf("serverNames = %v lacks the URL host %s", got, tc.urlHost)
			}
			for i, n := range got {
				if slices.Contains(got[i+1:], n) {
					t.Errorf("serverNames = %v repeats %s", got, n)
				}
			}
		})
	}
}

func TestLocalURLHost(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		listen string
		bound  net.Addr
		want   string
	}{
		{":9443", &net.TCPAddr{IP: net.IPv6unspecified, Port: 9443}, "127.0.0.1"},
		{"0.0.0.0:0", &net.TCPAddr{IP: net.IPv4zero, Port: 4000}, "127.0.0.1"},
		{"127.0.0.1:0", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 4000}, "127.0.0.1"},
		{"[::1]:0", &net.TCPAddr{IP: net.IPv6loopback, Port: 4000}, "::1"},
		{"ca.mesh.test:9443", &net.TCPAddr{IP: net.IPv4(10, 0, 0, 1), Port: 9443}, "ca.mesh.test"},
	} {
		if got := localURLHost(tc.listen, tc.bound); got != tc.want {
			t.Errorf("localURLHost(%q, %v) = %q, want %q", tc.listen, tc.bound, got, tc.want)
		}
	}
}
