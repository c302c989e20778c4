package sockowner

import (
	"errors"
	"net/netip"
	"testing"
)

func TestInvalidAddress(t *testing.T) {
	t.Parallel()
	valid := netip.MustParseAddrPort("127.0.0.1:80")
	cases := []struct {
		name          string
		local, remote netip.AddrPort
	}{
		{"no local", netip.AddrPort{}, valid},
		{"no remote", valid, netip.AddrPort{}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			if _, err := UID(tc.local, tc.remote); err == nil || errors.Is(err, ErrNotFound) {
				t.Fatalf("UID(%v, %v) = %v; want an error other than ErrNotFound", tc.local, tc.remote, err)
			}
		})
	}
}
