package policy_test

import (
	"net/netip"
	"strconv"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/policy"
)

const passthroughPolicy = `outbound:
  - name: planner-calls
    from: [spiffe://example.org/agent/planner]
    to:   [spiffe://example.org/agent/search, passthrough:203.0.113.0/24, passthrough:2001:db8::7]
  - name: host-anywhere
    from: [spiffe://example.org/host/a]
    to:   ["passthrough:*"]
`

// TestPassthrough: passthrough destinations are outbound destinations like IDs, chosen
// by address; an ID never selects an address nor an address an ID, and a policy without
// outbound rules leaves passthrough unrestricted as it does every outbound call.
func TestPassthrough(t *testing.T) {
	t.Parallel()
	a := mustParse(t, passthroughPolicy)
	planner, host, scraper := id("spiffe://example.org/agent/planner"), id("spiffe://example.org/host/a"), id("spiffe://example.org/agent/scraper")
	tests := []struct {
		src  spiffeid.ID
		addr string
		want string // the deciding rule, "" for a denial
	}{
		{planner, "203.0.113.9", "planner-calls"},
		{planner, "203.0.114.1", ""},
		{planner, "2001:db8::7", "planner-calls"},
		{planner, "2001:db8::8", ""},
		{planner, "::ffff:203.0.113.9", "planner-calls"}, // the mapped form of an allowed address
		{host, "198.51.100.1", "host-anywhere"},
		{host, "2001:db8:1::1", "host-anywhere"},
		{scraper, "203.0.113.9", ""},
		{spiffeid.ID{}, "203.0.113.9", ""},
		{planner, "", ""}, // no address: nothing to allow
	}
	for _, tc := range tests {
		var addr netip.Addr
		if tc.addr != "" {
			addr = netip.MustParseAddr(tc.addr)
		}
		d := a.Passthrough(tc.src, addr)
		if d.Allow != (tc.want != "") || (tc.want != "" && d.Name != tc.want) {
			t.Errorf("Passthrough(%s, %s) = %+v, want rule %q", tc.src, tc.addr, d, tc.want)
		}
		if d.Direction != policy.DirectionOutbound || d.Addr != addr {
			t.Errorf("Passthrough(%s, %s) = %+v: wrong direction or address", tc.src, tc.addr, d)
		}
	}
	// An address pattern never selects an identity.
	if d := a.Outbound(planner, id("spiffe://example.org/agent/other")); d.Allow {
		t.Errorf("Outbound to another agent allowed by %q", d.Name)
	}
	if d := a.Outbound(host, id("spiffe://example.org/agent/search")); d.Allow {
		t.Errorf("passthrough:* allowed a mesh call: %+v", d)
	}
	if d := a.Outbound(planner, id("spiffe://example.org/agent/search")); !d.Allow {
		t.Errorf("the rule's ID no longer allows: %+v", d)
	}

	d := a.Passthrough(planner, netip.MustParseAddr("203.0.113.9"))
	explain := a.Explain(d)
	for _, want := range []string{"allow:", "to pass through to 203.0.113.9", "passthrough:203.0.113.0/24", "passthrough:2001:db8::7"} {
		if !strings.Contains(explain, want) {
			t.Errorf("Explain = %q, want %q in it", explain, want)
		}
	}
	if e := a.Explain(a.Passthrough(scraper, netip.MustParseAddr("203.0.113.9"))); !strings.Contains(e, "deny: no outbound rule allows spiffe://example.org/agent/scraper to pass through to 203.0.113.9") {
		t.Errorf("Explain of a denial = %q", e)
	}

	open := mustParse(t, "inbound: []\n")
	if d := open.Passthrough(scraper, netip.MustParseAddr("192.0.2.1")); !d.Allow || d.Rule != -1 {
		t.Errorf("a policy without outbound rules: %+v, want the open default", d)
	}
	var none *policy.Authz
	if d := none.Passthrough(host, netip.MustParseAddr("192.0.2.1")); d.Allow {
		t.Errorf("a nil policy allowed passthrough: %+v", d)
	}
}

// FuzzPassthroughMatch checks address patterns against netip as an oracle: an accepted
// passthrough:X is normalised (what is written is what is matched) and selects an
// address exactly when the prefix it names contains it.
func FuzzPassthroughMatch(f *testing.F) {
	for _, s := range [][2]string{
		{"203.0.113.0/24", "203.0.113.255"},
		{"203.0.113.0/24", "203.0.114.0"},
		{"10.1.2.3/8", "10.1.2.3"},
		{"2001:db8::/32", "2001:db8:ffff::1"},
		{"2001:db8::7", "2001:db8::7"},
		{"::ffff:10.0.0.1", "10.0.0.1"},
		{"0.0.0.0/0", "::1"},
		{"*", "192.0.2.1"},
		{"fe80::1%eth0", "fe80::1"},
	} {
		f.Add(s[0], s[1])
	}
	src := id("spiffe://td/a")
	f.Fuzz(func(t *testing.T, pat, cand string) {
		doc := "outbound:\n  - name: o\n    from: [spiffe://td/a]\n    to: [" + strconv.Quote(policy.PassthroughScheme+pat) + "]\n"
		a, err := policy.ParseAuthz([]byte(doc))
		if err != nil {
			return
		}
		addr, err := netip.ParseAddr(cand)
		if err != nil {
			return
		}
		var want bool
		switch p, perr := netip.ParsePrefix(pat); {
		case pat == "*":
			want = true
		case perr == nil:
			if p != p.Masked() || p.Addr().Is4In6() {
				t.Fatalf("accepted non-normalised prefix %q", pat)
			}
			want = p.Contains(addr.Unmap().WithZone(""))
		default:
			one, err := netip.ParseAddr(pat)
			if err != nil || one.Zone() != "" || one.Is4In6() {
				t.Fatalf("accepted %q, neither a prefix nor a plain address", pat)
			}
			want = one == addr.Unmap().WithZone("")
		}
		if got := a.Passthrough(src, addr).Allow; got != want {
			t.Fatalf("passthrough:%s vs %s: %v, want %v", pat, cand, got, want)
		}
	})
}
