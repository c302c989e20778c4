package redirect

import (
	"errors"
	"math"
	"net/netip"
	"strconv"
	"strings"
	"testing"
)

func TestRulesRejectsInvalidConfig(t *testing.T) {
	t.Parallel()
	uid := []int{1337}
	tests := []struct {
		name      string
		cfg       Config
		wantField string
		wantIn    string // substring of the reason
	}{
		{"no proxy exclusion", Config{}, "ExcludeUIDs", "loop"},
		{"inbound equals outbound", Config{ExcludeUIDs: uid, OutboundPort: 15006, StrictPorts: []uint16{9000}}, "InboundPort", "OutboundPort"},
		{"inbound equals defaulted outbound", Config{ExcludeUIDs: uid, InboundPort: 15001, StrictPorts: []uint16{9000}}, "InboundPort", "15001"},
		{"port 0 in IncludePorts", Config{ExcludeUIDs: uid, IncludePorts: []uint16{80, 0}}, "IncludePorts[1]", "port 0"},
		{"port 0 in ExcludePorts", Config{ExcludeUIDs: uid, ExcludePorts: []uint16{0}}, "ExcludePorts[0]", "port 0"},
		{"port 0 in StrictPorts", Config{ExcludeUIDs: uid, StrictPorts: []uint16{9000, 0}}, "StrictPorts[1]", "port 0"},
		{"duplicate IncludePorts", Config{ExcludeUIDs: uid, IncludePorts: []uint16{80, 443, 80}}, "IncludePorts[2]", "duplicate port 80"},
		{"duplicate ExcludePorts", Config{ExcludeUIDs: uid, ExcludePorts: []uint16{22, 22}}, "ExcludePorts[1]", "duplicate port 22"},
		{"duplicate StrictPorts", Config{ExcludeUIDs: uid, StrictPorts: []uint16{9000, 9000}}, "StrictPorts[1]", "duplicate"},
		{"port both included and excluded", Config{ExcludeUIDs: uid, IncludePorts: []uint16{80}, ExcludePorts: []uint16{22, 80}}, "ExcludePorts[1]", "also in IncludePorts"},
		{"included OutboundPort would loop", Config{ExcludeUIDs: uid, IncludePorts: []uint16{80, 15001}}, "IncludePorts[1]", "OutboundPort"},
		{"included custom OutboundPort would loop", Config{ExcludeUIDs: uid, OutboundPort: 3128, IncludePorts: []uint16{3128}}, "IncludePorts[0]", "OutboundPort"},
		{"strict port is OutboundPort", Config{ExcludeUIDs: uid, StrictPorts: []uint16{15001}}, "StrictPorts[0]", "proxy's own ports"},
		{"strict port is InboundPort", Config{ExcludeUIDs: uid, StrictPorts: []uint16{9000, 15006}}, "StrictPorts[1]", "proxy's own ports"},
		{"negative uid", Config{ExcludeUIDs: []int{-1}}, "ExcludeUIDs[0]", "out of range"},
		{"duplicate uid", Config{ExcludeUIDs: []int{0, 1337, 1337}}, "ExcludeUIDs[2]", "duplicate uid 1337"},
		{"negative mark", Config{ExcludeMark: -1}, "ExcludeMark", "out of range"},
		{"IPv6 exclude CIDR without IPv6", Config{ExcludeUIDs: uid, ExcludeCIDRs: prefixes("10.0.0.0/8", "fd00::/8")}, "ExcludeCIDRs[1]", "IPv6 is not set"},
		{"IPv6 include CIDR without IPv6", Config{ExcludeUIDs: uid, IncludeCIDRs: prefixes("2001:db8::/32")}, "IncludeCIDRs[0]", "IPv6 is not set"},
		{"IPv4-mapped prefix", Config{ExcludeUIDs: uid, IPv6: true, ExcludeCIDRs: prefixes("::ffff:10.0.0.0/104")}, "ExcludeCIDRs[0]", "IPv4-mapped"},
		{"zero prefix", Config{ExcludeUIDs: uid, IncludeCIDRs: []netip.Prefix{{}}}, "IncludeCIDRs[0]", "invalid prefix"},
		{"duplicate prefix after masking", Config{ExcludeUIDs: uid, ExcludeCIDRs: prefixes("10.0.0.0/8", "10.1.2.3/8")}, "ExcludeCIDRs[1]", "duplicates ExcludeCIDRs[0]"},
		{"dual stack include without IPv6 prefix", Config{ExcludeUIDs: uid, IPv6: true, IncludeCIDRs: prefixes("192.0.2.0/24")}, "IncludeCIDRs", "no IPv6 prefix"},
		{"dual stack include without IPv4 prefix", Config{ExcludeUIDs: uid, IPv6: true, IncludeCIDRs: prefixes("2001:db8::/32")}, "IncludeCIDRs", "no IPv4 prefix"},
	}
	if strconv.IntSize == 64 { // values beyond uint32 only fit a 64-bit int
		var maxUint32 int64 = math.MaxUint32
		tests = append(tests, []struct {
			name      string
			cfg       Config
			wantField string
			wantIn    string
		}{
			{"uid (uid_t)-1", Config{ExcludeUIDs: []int{int(maxUint32)}}, "ExcludeUIDs[0]", "out of range"},
			{"uid beyond uint32", Config{ExcludeUIDs: []int{int(maxUint32 + 1)}}, "ExcludeUIDs[0]", "out of range"},
			{"mark beyond uint32", Config{ExcludeMark: int(maxUint32 + 1)}, "ExcludeMark", "out of range"},
		}...)
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			_, err := Rules(tc.cfg)
			if !errors.Is(err, ErrInvalidConfig) {
				t.Fatalf("Rules error = %v, want ErrInvalidConfig", err)
			}
			var ce *ConfigError
			if !errors.As(err, &ce) {
				t.Fatalf("error %T is not a *ConfigError", err)
			}
			if ce.Field != tc.wantField || !strings.Contains(ce.Reason, tc.wantIn) {
				t.Errorf("got field %q reason %q, want field %q reason containing %q", ce.Field, ce.Reason, tc.wantField, tc.wantIn)
			}
			if !strings.HasPrefix(err.Error(), "redirect: ") || !strings.Contains(err.Error(), tc.wantField) {
				t.Errorf("message %q should start with the package and name the field", err)
			}
		})
	}
}

func TestRulesAcceptsEdgeValues(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		cfg  Config
	}{
		{"uid 0", Config{ExcludeUIDs: []int{0}}},
		{"port 65535 everywhere", Config{ExcludeMark: 1, IncludePorts: []uint16{65535}, StrictPorts: []uint16{65535}}},
		{"loopback listed explicitly", Config{ExcludeMark: 1, ExcludeCIDRs: prefixes("127.0.0.0/8")}},
		{"InboundPort included as a destination", Config{ExcludeMark: 1, IncludePorts: []uint16{15006}}},
		{"InboundPort equals OutboundPort without strict mode", Config{ExcludeMark: 1, OutboundPort: 15006}},
		{"overlapping include and exclude CIDRs", Config{ExcludeMark: 1, IncludeCIDRs: prefixes("10.0.0.0/8"), ExcludeCIDRs: prefixes("10.1.0.0/16")}},
	}
	if strconv.IntSize == 64 {
		var maxUint32 int64 = math.MaxUint32
		tests = append(tests, []struct {
			name string
			cfg  Config
		}{
			{"largest uid", Config{ExcludeUIDs: []int{int(maxUint32 - 1)}}},
			{"largest mark", Config{ExcludeMark: int(maxUint32)}},
		}...)
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			if _, err := Rules(tc.cfg); err != nil {
				t.Fatalf("Rules: %v", err)
			}
		})
	}
}
