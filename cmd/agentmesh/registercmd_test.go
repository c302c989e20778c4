package main

import (
	"errors"
	"net/netip"
	"path/filepath"
	"slices"
	"testing"

	"github.com/agentmesh/agentmesh/ca"
)

// `register --addr`: the host is the argument or --host, each --addr a prefix or one
// address, and agent flags or a non-host ID are refused before the CA is asked.
func TestHostClaimArgs(t *testing.T) {
	t.Parallel()
	const host = "spiffe://example.org/host/a"
	for _, tc := range []struct {
		name       string
		args       []string
		host       string
		addrs      []string
		agentFlags bool
		want       []string // nil when refused
	}{
		{"argument", []string{host}, "", []string{"10.0.0.0/24", "fd00::1"}, false, []string{"10.0.0.0/24", "fd00::1/128"}},
		{"--host", nil, host, []string{"10.0.0.1"}, false, []string{"10.0.0.1/32"}},
		{"both, equal", []string{host}, host, []string{"10.0.0.1"}, false, []string{"10.0.0.1/32"}},
		{"both, different", []string{host}, "spiffe://example.org/host/b", []string{"10.0.0.1"}, false, nil},
		{"no host", nil, "", []string{"10.0.0.1"}, false, nil},
		{"an agent ID", []string{"spiffe://example.org/agent/x"}, "", []string{"10.0.0.1"}, false, nil},
		{"not a SPIFFE ID", []string{"host-a"}, "", []string{"10.0.0.1"}, false, nil},
		{"with --uid", []string{host}, "", []string{"10.0.0.1"}, true, nil},
		{"host bits set", []string{host}, "", []string{"10.0.0.1/24"}, false, nil},
		{"not a prefix", []string{host}, "", []string{"10.0.0.0/33"}, false, nil},
		{"every address", []string{host}, "", []string{"0.0.0.0/0"}, false, nil},
		{"a name", []string{host}, "", []string{"host-b"}, false, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			h, got, err := hostClaimArgs(tc.args, tc.host, tc.addrs, tc.agentFlags)
			if tc.want == nil {
				if err == nil {
					t.Fatalf("accepted: %v %v", h, got)
				}
				return
			}
			want := make([]netip.Prefix, len(tc.want))
			for i, p := range tc.want {
				want[i] = netip.MustParsePrefix(p)
			}
			if err != nil || h.String() != host || !slices.Equal(got, want) {
				t.Fatalf("hostClaimArgs = %v %v %v, want %s %v", h, got, err, host, want)
			}
		})
	}
}

// A bad --addr is refused on the command line, naming the flag, before the admin socket
// is dialled (there is no CA here).
func TestRegisterAddrRefusedLocally(t *testing.T) {
	t.Parallel()
	state := filepath.Join(t.TempDir(), "no-ca")
	_, err := runRoot(t, "register", "spiffe://example.org/host/a", "--addr", "10.0.0.1/24", "--state", state)
	if !errors.Is(err, ca.ErrInvalidRequest) {
		t.Fatalf("register --addr 10.0.0.1/24: %v, want ErrInvalidRequest", err)
	}
	if _, err := runRoot(t, "register", "spiffe://example.org/agent/x", "--state", state); err == nil {
		t.Fatal("an agent registration without --host and --uid was accepted")
	}
}
