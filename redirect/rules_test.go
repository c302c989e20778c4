package redirect

import (
	"flag"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

var update = flag.Bool("update", false, "rewrite testdata/*.golden from the current output")

func prefixes(s ...string) []netip.Prefix {
	out := make([]netip.Prefix, len(s))
	for i, p := range s {
		out[i] = netip.MustParsePrefix(p)
	}
	return out
}

// goldenCases are also used by the install tests: every one must install for real.
var goldenCases = []struct {
	name string
	cfg  Config
}{
	{"defaults_uid", Config{ExcludeUIDs: []int{1337}}},
	{"mark_only", Config{ExcludeMark: 0x539}},
	{"uids_and_mark_sorted", Config{ExcludeUIDs: []int{2000, 0, 1337}, ExcludeMark: 0x7fffffff}},
	{"exclusions", Config{
		ExcludeUIDs:  []int{1337},
		ExcludeMark:  1,
		ExcludePorts: []uint16{22, 15008, 53},
		ExcludeCIDRs: prefixes("169.254.169.254/32", "10.1.2.3/8", "127.0.0.0/8"),
	}},
	{"include_ports", Config{ExcludeUIDs: []int{1337}, IncludePorts: []uint16{443, 80, 8080}}},
	{"include_cidrs_and_ports", Config{
		ExcludeUIDs:  []int{1337},
		IncludeCIDRs: prefixes("192.0.2.0/24", "10.0.0.0/8"),
		IncludePorts: []uint16{9000, 80},
		ExcludeCIDRs: prefixes("10.9.0.0/16"),
	}},
	{"custom_ports_strict", Config{
		OutboundPort: 16001,
		InboundPort:  16006,
		ExcludeMark:  0x539,
		StrictPorts:  []uint16{9000, 8080},
	}},
	{"dual_stack_strict", Config{
		ExcludeUIDs:  []int{1337},
		ExcludeMark:  0x539,
		StrictPorts:  []uint16{9000},
		ExcludePorts: []uint16{22},
		ExcludeCIDRs: prefixes("2001:db8:ffff::/48", "169.254.0.0/16", "::1/128"),
		IncludeCIDRs: prefixes("2001:db8::/32", "192.0.2.0/24"),
		IPv6:         true,
	}},
	{"dual_stack_all", Config{ExcludeUIDs: []int{1337}, IPv6: true}},
}

func TestRulesGolden(t *testing.T) {
	t.Parallel()
	for _, tc := range goldenCases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			plan, err := Rules(tc.cfg)
			if err != nil {
				t.Fatalf("Rules: %v", err)
			}
			got := plan.String()
			path := filepath.Join("testdata", tc.name+".golden")
			if *update {
				if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
					t.Fatal(err)
				}
				return
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("%v (run go test ./redirect -update to create it)", err)
			}
			if got != string(want) {
				t.Errorf("Rules(%s) differs from %s (go test ./redirect -update rewrites it)\ngot:\n%s\nwant:\n%s", tc.name, path, got, want)
			}
		})
	}
}

func TestRulesShape(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		cfg  Config
		// check inspects the plan (optional); every case also checks that Rules leaves
		// the Config's slices as they were.
		check func(t *testing.T, p Plan)
	}{
		{
			name: "exclusions precede every redirect",
			cfg: Config{ExcludeUIDs: []int{7}, ExcludeMark: 9, ExcludePorts: []uint16{22},
				ExcludeCIDRs: prefixes("10.0.0.0/8"), IncludePorts: []uint16{80}},
			check: func(t *testing.T, p Plan) {
				rules := p.IPv4.Chains[0].Rules
				lastReturn := -1
				firstRedirect := len(rules)
				for i, r := range rules {
					if strings.HasSuffix(r, "-j RETURN") {
						lastReturn = i
					}
					if strings.Contains(r, "-j REDIRECT") && i < firstRedirect {
						firstRedirect = i
					}
				}
				if !strings.Contains(rules[0], "--uid-owner 7") || !strings.Contains(rules[1], "--mark 0x9") {
					t.Errorf("uid then mark must come first: %q", rules)
				}
				if lastReturn >= firstRedirect {
					t.Errorf("a RETURN follows a REDIRECT: %q", rules)
				}
			},
		},
		{
			name: "no IPv6 plan without IPv6",
			cfg:  Config{ExcludeUIDs: []int{1}},
			check: func(t *testing.T, p Plan) {
				if !p.IPv6.IsZero() {
					t.Errorf("IPv6 plan = %+v, want empty", p.IPv6)
				}
				if p.IPv6.RestoreInput() != "" {
					t.Errorf("empty Ruleset has restore input %q", p.IPv6.RestoreInput())
				}
			},
		},
		{
			name: "no inbound chain without strict ports",
			cfg:  Config{ExcludeUIDs: []int{1}},
			check: func(t *testing.T, p Plan) {
				if len(p.IPv4.Chains) != 1 || p.IPv4.Chains[0].Name != ChainOutput {
					t.Errorf("chains = %+v, want only %s", p.IPv4.Chains, ChainOutput)
				}
				if want := []Rule{{"OUTPUT", "-p tcp -j AGENTMESH_OUTPUT"}}; !slices.Equal(p.IPv4.Jumps, want) {
					t.Errorf("jumps = %v, want %v", p.IPv4.Jumps, want)
				}
			},
		},
		{
			name: "each family gets only its own prefixes",
			cfg: Config{ExcludeUIDs: []int{1}, IPv6: true,
				ExcludeCIDRs: prefixes("10.0.0.0/8", "fd00::/8"),
				IncludeCIDRs: prefixes("192.0.2.0/24", "2001:db8::/32")},
			check: func(t *testing.T, p Plan) {
				v4 := strings.Join(p.IPv4.Chains[0].Rules, "\n")
				v6 := strings.Join(p.IPv6.Chains[0].Rules, "\n")
				if strings.Contains(v4, ":") || !strings.Contains(v4, "-d 192.0.2.0/24 -p tcp") {
					t.Errorf("IPv4 rules:\n%s", v4)
				}
				if strings.Contains(v6, "10.0.0.0") || !strings.Contains(v6, "-d fd00::/8 -j RETURN") || !strings.Contains(v6, "-d ::1/128 -j RETURN") {
					t.Errorf("IPv6 rules:\n%s", v6)
				}
			},
		},
		{
			name: "restore input declares chains before jumps into them",
			cfg:  Config{ExcludeUIDs: []int{1}, StrictPorts: []uint16{9000}},
			check: func(t *testing.T, p Plan) {
				in := p.IPv4.RestoreInput()
				if !strings.HasPrefix(in, "*nat\n:AGENTMESH_OUTPUT - [0:0]\n:AGENTMESH_INBOUND - [0:0]\n") || !strings.HasSuffix(in, "-A OUTPUT -p tcp -j AGENTMESH_OUTPUT\n-A PREROUTING -p tcp -j AGENTMESH_INBOUND\nCOMMIT\n") {
					t.Errorf("restore input:\n%s", in)
				}
			},
		},
		{
			name: "Rules does not change the caller's slices",
			cfg:  Config{ExcludeUIDs: []int{3, 1, 2}, IncludePorts: []uint16{3, 1, 2}},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			uids := slices.Clone(tc.cfg.ExcludeUIDs)
			ports := slices.Clone(tc.cfg.IncludePorts)
			p, err := Rules(tc.cfg)
			if err != nil {
				t.Fatalf("Rules: %v", err)
			}
			if tc.check != nil {
				tc.check(t, p)
			}
			if !slices.Equal(uids, tc.cfg.ExcludeUIDs) || !slices.Equal(ports, tc.cfg.IncludePorts) {
				t.Errorf("Rules reordered the Config's slices")
			}
		})
	}
}
