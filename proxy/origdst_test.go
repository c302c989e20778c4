package proxy

import (
	"encoding/binary"
	"errors"
	"net/netip"
	"strconv"
	"testing"
)

// sockaddr encodes ap as Linux returns it for SO_ORIGINAL_DST (IPv4) or
// IP6T_SO_ORIGINAL_DST (IPv6), written independently of parseOrigDst.
func sockaddr(ap netip.AddrPort) []byte {
	if ap.Addr().Is4() {
		b := make([]byte, 16)
		binary.NativeEndian.PutUint16(b, 2)
		binary.BigEndian.PutUint16(b[2:], ap.Port())
		a := ap.Addr().As4()
		copy(b[4:], a[:])
		return b
	}
	b := make([]byte, 28)
	binary.NativeEndian.PutUint16(b, 10)
	binary.BigEndian.PutUint16(b[2:], ap.Port())
	binary.BigEndian.PutUint32(b[4:], 0xdeadbeef) // flowinfo: ignored
	a := ap.Addr().As16()
	copy(b[8:], a[:])
	if z := ap.Addr().Zone(); z != "" {
		n, _ := strconv.ParseUint(z, 10, 32)
		binary.NativeEndian.PutUint32(b[24:], uint32(n))
	}
	return b
}

func TestParseOrigDst(t *testing.T) {
	t.Parallel()
	mapped := sockaddr(netip.MustParseAddrPort("[::1]:80"))
	copy(mapped[8:24], netip.MustParseAddr("::ffff:10.1.2.3").AsSlice())
	tests := []struct {
		name    string
		in      []byte
		want    netip.AddrPort
		wantErr bool
	}{
		{name: "ipv4", in: sockaddr(netip.MustParseAddrPort("10.0.0.7:8080")), want: netip.MustParseAddrPort("10.0.0.7:8080")},
		{name: "ipv4_loopback_max_port", in: sockaddr(netip.MustParseAddrPort("127.0.0.2:65535")), want: netip.MustParseAddrPort("127.0.0.2:65535")},
		{name: "ipv6", in: sockaddr(netip.MustParseAddrPort("[2001:db8::5]:443")), want: netip.MustParseAddrPort("[2001:db8::5]:443")},
		{name: "ipv6_loopback", in: sockaddr(netip.MustParseAddrPort("[::1]:9000")), want: netip.MustParseAddrPort("[::1]:9000")},
		{name: "ipv6_link_local_scope", in: sockaddr(netip.MustParseAddrPort("[fe80::1%3]:22")), want: netip.MustParseAddrPort("[fe80::1%3]:22")},
		{name: "ipv4_mapped_is_unmapped", in: mapped, want: netip.MustParseAddrPort("10.1.2.3:80")},
		{name: "empty", in: nil, wantErr: true},
		{name: "one_byte", in: []byte{2}, wantErr: true},
		{name: "ipv4_short", in: sockaddr(netip.MustParseAddrPort("10.0.0.7:80"))[:8], wantErr: true},
		{name: "ipv4_long", in: append(sockaddr(netip.MustParseAddrPort("10.0.0.7:80")), 0), wantErr: true},
		{name: "ipv6_short", in: sockaddr(netip.MustParseAddrPort("[::1]:80"))[:24], wantErr: true},
		{name: "ipv6_family_ipv4_size", in: func() []byte {
			b := sockaddr(netip.MustParseAddrPort("10.0.0.7:80"))
			binary.NativeEndian.PutUint16(b, 10)
			return b
		}(), wantErr: true},
		{name: "unknown_family", in: func() []byte {
			b := sockaddr(netip.MustParseAddrPort("10.0.0.7:80"))
			binary.NativeEndian.PutUint16(b, 1) // AF_UNIX
			return b
		}(), wantErr: true},
		{name: "port_zero", in: sockaddr(netip.MustParseAddrPort("10.0.0.7:0")), wantErr: true},
		{name: "unspecified_ipv4", in: sockaddr(netip.MustParseAddrPort("0.0.0.0:80")), wantErr: true},
		{name: "unspecified_ipv6", in: sockaddr(netip.MustParseAddrPort("[::]:80")), wantErr: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			got, err := parseOrigDst(tc.in)
			if tc.wantErr {
				if !errors.Is(err, ErrNoOriginalDst) {
					t.Fatalf("parseOrigDst(%x) = %v, %v; want ErrNoOriginalDst", tc.in, got, err)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("parseOrigDst(%x) = %v, %v; want %v", tc.in, got, err, tc.want)
			}
		})
	}
}

// FuzzOrigDst: the decoder sees whatever the kernel wrote. It must never
// panic, must classify every rejection, and what it accepts must re-encode
// to the same family, port, address and scope.
func FuzzOrigDst(f *testing.F) {
	f.Add(sockaddr(netip.MustParseAddrPort("10.0.0.7:8080")))
	f.Add(sockaddr(netip.MustParseAddrPort("[2001:db8::5]:443")))
	f.Add(sockaddr(netip.MustParseAddrPort("[fe80::1%3]:22")))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		ap, err := parseOrigDst(b)
		if err != nil {
			if !errors.Is(err, ErrNoOriginalDst) {
				t.Fatalf("unclassified error %v", err)
			}
			return
		}
		if ap.Port() == 0 || ap.Addr().IsUnspecified() || ap.Addr().Is4In6() {
			t.Fatalf("accepted %v", ap)
		}
		if len(b) == 28 && ap.Addr().Is4() {
			// An IPv4-mapped address in a sockaddr_in6 comes back as IPv4.
			if netip.AddrFrom16([16]byte(b[8:24])) != netip.AddrFrom16(ap.Addr().As16()) ||
				binary.BigEndian.Uint16(b[2:4]) != ap.Port() {
				t.Fatalf("accepted %x as %v", b, ap)
			}
			return
		}
		// Otherwise what carries meaning round-trips: family, port,
		// address and, for IPv6, the scope.
		again := sockaddr(ap)
		same := len(again) == len(b) && string(again[:4]) == string(b[:4])
		switch {
		case !same:
		case len(b) == 16:
			same = string(again[4:8]) == string(b[4:8])
		default:
			same = string(again[8:]) == string(b[8:])
		}
		if !same {
			t.Fatalf("accepted %x as %v, which encodes to %x", b, ap, again)
		}
	})
}
