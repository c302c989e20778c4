package policy_test

import (
	"errors"
	"net/netip"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.yaml.in/yaml/v3"

	"github.com/agentmesh/agentmesh/policy"
)

// probeIDs are the identities an accepted fuzzed policy is evaluated against.
var probeIDs = []spiffeid.ID{
	{},
	spiffeid.RequireFromString("spiffe://td"),
	spiffeid.RequireFromString("spiffe://td/a"),
	spiffeid.RequireFromString("spiffe://td/ab"),
	spiffeid.RequireFromString("spiffe://td/a/b"),
	spiffeid.RequireFromString("spiffe://td/A/b"),
	spiffeid.RequireFromString("spiffe://example.org/agent/planner"),
	spiffeid.RequireFromString("spiffe://example.org/agent/search"),
}

// probeAddrs are the passthrough destinations an accepted fuzzed policy is evaluated
// against.
var probeAddrs = []netip.Addr{
	{},
	netip.MustParseAddr("203.0.113.9"),
	netip.MustParseAddr("10.0.0.1"),
	netip.MustParseAddr("2001:db8::7"),
	netip.MustParseAddr("::ffff:10.0.0.1"),
}

func evaluate(a *policy.Authz) []policy.Decision {
	var out []policy.Decision
	for _, src := range probeIDs {
		for _, dst := range probeIDs {
			for _, port := range []uint16{0, 1, 8080} {
				out = append(out, a.Inbound(src, port, dst))
			}
			out = append(out, a.Outbound(src, dst))
		}
		for _, addr := range probeAddrs {
			out = append(out, a.Passthrough(src, addr))
		}
	}
	return out
}

func FuzzParseAuthz(f *testing.F) {
	f.Add([]byte(examplePolicy))
	f.Add([]byte("inbound:\n  - name: r\n    from: [spiffe://td/a/*]\n    to: {ports: [1]}\n"))
	f.Add([]byte("outbound:\n  - name: o\n    from: [spiffe://td/a]\n    to: [spiffe://td/*]\n"))
	f.Add([]byte(passthroughPolicy))
	f.Add([]byte("outbound:\n  - name: o\n    from: [spiffe://td/a/*]\n    to: [passthrough:10.0.0.0/8, \"passthrough:*\", passthrough:2001:db8::/32]\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		a, err := policy.ParseAuthz(data)
		if err != nil {
			var fe *policy.FieldError
			if !errors.As(err, &fe) || a != nil {
				t.Fatalf("ParseAuthz error %v (%T) with policy %v", err, err, a)
			}
			return
		}
		first := evaluate(a)
		b, err := policy.ParseAuthz(data)
		if err != nil {
			t.Fatalf("second parse failed: %v", err)
		}
		again, other := evaluate(a), evaluate(b)
		for i := range first {
			if first[i] != again[i] || first[i] != other[i] {
				t.Fatalf("decision %d not deterministic: %+v, %+v, %+v", i, first[i], again[i], other[i])
			}
			if a.Explain(first[i]) != b.Explain(other[i]) {
				t.Fatalf("Explain not deterministic for %+v", first[i])
			}
			if d := first[i]; d.Allow && d.Rule >= 0 && !strings.Contains(a.Explain(d), "rule: ") {
				t.Fatalf("Explain(%+v) names no rule", d)
			}
		}
	})
}

// FuzzAuthzMatch checks pattern matching against an independent string oracle: an
// accepted pattern matches a valid ID exactly when the ID's string equals it (exact)
// or extends "base/" by at least one character (prefix). Case or encoding variants,
// siblings like spiffe://td/ab for spiffe://td/a/*, and the base itself never match.
func FuzzAuthzMatch(f *testing.F) {
	for _, s := range [][2]string{
		{"spiffe://td/a/*", "spiffe://td/ab"},
		{"spiffe://td/a/*", "spiffe://td/a"},
		{"spiffe://td/a/*", "spiffe://td/a/b"},
		{"spiffe://td/a/*", "spiffe://TD/a/b"},
		{"spiffe://td/a/*", "spiffe://td/A/b"},
		{"spiffe://td/a/*", "spiffe://td/a%2Fb"},
		{"spiffe://td/a", "spiffe://td/a/b"},
		{"spiffe://td/*", "spiffe://td"},
		{"spiffe://td/a/*", "spiffe://td.evil/a/b"},
	} {
		f.Add(s[0], s[1])
	}
	f.Fuzz(func(t *testing.T, pat, cand string) {
		doc, err := yaml.Marshal(map[string]any{
			"inbound":  []any{map[string]any{"name": "in", "from": []string{pat}, "to": map[string]any{"ports": []int{1}}}},
			"outbound": []any{map[string]any{"name": "out", "from": []string{"spiffe://local.test/me"}, "to": []string{pat}}},
		})
		if err != nil {
			t.Skip()
		}
		a, err := policy.ParseAuthz(doc)
		if err != nil {
			return
		}
		// Only normalised patterns are accepted.
		base, prefix := strings.CutSuffix(pat, "/*")
		if id, err := spiffeid.FromString(base); err != nil || id.String() != base {
			t.Fatalf("accepted non-normalised pattern %q", pat)
		}
		check := func(c string) {
			id, err := spiffeid.FromString(c)
			if err != nil {
				return
			}
			s := id.String()
			want := s == pat
			if prefix {
				want = len(s) > len(base)+1 && strings.HasPrefix(s, base+"/")
			}
			in := a.Inbound(id, 1, spiffeid.ID{}).Allow
			out := a.Outbound(spiffeid.RequireFromString("spiffe://local.test/me"), id).Allow
			if in != want || out != want {
				t.Fatalf("pattern %q vs %q: inbound %v outbound %v, want %v", pat, s, in, out, want)
			}
		}
		check(cand)
		check(base)                  // never matched by its own prefix pattern
		check(base + "b")            // sibling sharing a string prefix
		check(strings.ToUpper(cand)) // case variants never widen
		check(strings.ToLower(cand)) //
		check(base + "/" + cand)     // anything strictly below
		check(strings.Replace(cand, "/", "%2F", 1))
	})
}
