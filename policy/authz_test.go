package policy_test

import (
	"errors"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/policy"
)

var update = flag.Bool("update", false, "rewrite golden files under testdata/")

const examplePolicy = `inbound:
  - name: planner-to-search
    from: [spiffe://example.org/agent/planner]
    to:   {ports: [8080], id: spiffe://example.org/agent/search}
  - name: agents-to-metrics
    from: [spiffe://example.org/agent/*]
    to:   {ports: [9090, 9091]}
  - name: ops-to-search
    from: [spiffe://example.org/ops/oncall, spiffe://example.org/ops/robots/*]
    to:   {id: spiffe://example.org/agent/search}
outbound:
  - name: planner-calls
    from: [spiffe://example.org/agent/planner]
    to:   [spiffe://example.org/agent/search, spiffe://partner.test/api/*]
`

func id(s string) spiffeid.ID { return spiffeid.RequireFromString(s) }

func mustParse(t testing.TB, doc string) *policy.Authz {
	t.Helper()
	a, err := policy.ParseAuthz([]byte(doc))
	if err != nil {
		t.Fatalf("ParseAuthz: %v", err)
	}
	return a
}

func TestParseAuthzErrors(t *testing.T) {
	t.Parallel()
	rule := func(from, to string) string {
		return "inbound:\n  - name: r\n    from: " + from + "\n    to: " + to + "\n"
	}
	out := func(to string) string {
		return "outbound:\n  - name: o\n    from: [spiffe://td/a]\n    to: " + to + "\n"
	}
	tests := []struct {
		name  string
		doc   string
		line  int
		field string
	}{
		{name: "empty", doc: "  \n", line: 0},
		{name: "syntax error", doc: "inbound: [\n", line: 1},
		{name: "unknown top-level field", doc: "inbound: []\nallow_all: true\n", line: 2},
		{name: "unknown rule field", doc: rule("[spiffe://td/a]", "{ports: [1]}") + "    action: deny\n", line: 5},
		{name: "unknown to field", doc: rule("[spiffe://td/a]", "{port: [1]}"), line: 4},
		{name: "duplicate key", doc: "outbound: []\noutbound: []\n", line: 2},
		{name: "port out of range", doc: rule("[spiffe://td/a]", "{ports: [70000]}"), line: 4},
		{name: "port zero", doc: rule("[spiffe://td/a]", "{ports: [0]}"), line: 4, field: "inbound[0].to.ports[0]"},
		{name: "second document", doc: "inbound: []\n---\noutbound: []\n", line: 2},
		{name: "missing name", doc: "inbound:\n  - from: [spiffe://td/a]\n    to: {ports: [1]}\n", line: 2, field: "inbound[0].name"},
		{name: "bad name", doc: "inbound:\n  - name: \"a b\"\n    from: [spiffe://td/a]\n    to: {ports: [1]}\n", line: 2, field: "inbound[0].name"},
		{name: "missing from", doc: "inbound:\n  - name: r\n    to: {ports: [1]}\n", line: 2, field: "inbound[0].from"},
		{name: "empty from", doc: rule("[]", "{ports: [1]}"), line: 3, field: "inbound[0].from"},
		{name: "missing to", doc: "inbound:\n  - name: r\n    from: [spiffe://td/a]\n", line: 2, field: "inbound[0].to"},
		{name: "empty to", doc: rule("[spiffe://td/a]", "{}"), line: 4, field: "inbound[0].to"},
		{name: "bad to.id", doc: rule("[spiffe://td/a]", "{id: spiffe://td/a/../b}"), line: 4, field: "inbound[0].to.id"},
		{name: "not a spiffe id", doc: rule("[https://td/a]", "{ports: [1]}"), line: 3, field: "inbound[0].from[0]"},
		{name: "uppercase trust domain", doc: rule("[spiffe://TD/a]", "{ports: [1]}"), line: 3, field: "inbound[0].from[0]"},
		{name: "uppercase scheme", doc: rule("[SPIFFE://td/a]", "{ports: [1]}"), line: 3, field: "inbound[0].from[0]"},
		{name: "percent encoding", doc: rule("[spiffe://td/a%2Fb]", "{ports: [1]}"), line: 3, field: "inbound[0].from[0]"},
		{name: "dot segment", doc: rule("[spiffe://td/a/./b]", "{ports: [1]}"), line: 3, field: "inbound[0].from[0]"},
		{name: "empty segment", doc: rule("[spiffe://td//a]", "{ports: [1]}"), line: 3, field: "inbound[0].from[0]"},
		{name: "trailing slash", doc: rule("[spiffe://td/a/]", "{ports: [1]}"), line: 3, field: "inbound[0].from[0]"},
		{name: "query", doc: rule("[\"spiffe://td/a?x=1\"]", "{ports: [1]}"), line: 3, field: "inbound[0].from[0]"},
		{name: "fragment", doc: rule("[\"spiffe://td/a#x\"]", "{ports: [1]}"), line: 3, field: "inbound[0].from[0]"},
		{name: "userinfo", doc: rule("[spiffe://u@td/a]", "{ports: [1]}"), line: 3, field: "inbound[0].from[0]"},
		{name: "port in trust domain", doc: rule("[spiffe://td:443/a]", "{ports: [1]}"), line: 3, field: "inbound[0].from[0]"},
		{name: "glob inside segment", doc: rule("[\"spiffe://td/a*\"]", "{ports: [1]}"), line: 3, field: "inbound[0].from[0]"},
		{name: "glob in middle", doc: rule("[\"spiffe://td/*/a\"]", "{ports: [1]}"), line: 3, field: "inbound[0].from[0]"},
		{name: "double glob", doc: rule("[\"spiffe://td/a/**\"]", "{ports: [1]}"), line: 3, field: "inbound[0].from[0]"},
		{name: "glob on trust domain", doc: rule("[\"spiffe://*/a\"]", "{ports: [1]}"), line: 3, field: "inbound[0].from[0]"},
		{name: "second pattern bad", doc: "inbound:\n  - name: r\n    from:\n      - spiffe://td/a\n      - spiffe://td/a b\n    to: {ports: [1]}\n", line: 5, field: "inbound[0].from[1]"},
		{name: "outbound bad to", doc: "outbound:\n  - name: o\n    from: [spiffe://td/a]\n    to:\n      - spiffe://td/b\n      - spiffe://td/%41\n", line: 6, field: "outbound[0].to[1]"},
		{name: "outbound missing to", doc: "outbound:\n  - name: o\n    from: [spiffe://td/a]\n", line: 2, field: "outbound[0].to"},
		{name: "passthrough host bits", doc: out("[spiffe://td/b, passthrough:10.1.2.3/8]"), line: 4, field: "outbound[0].to[1]"},
		{name: "passthrough not an address", doc: out("[passthrough:example.org]"), line: 4, field: "outbound[0].to[0]"},
		{name: "passthrough empty", doc: out("[\"passthrough:\"]"), line: 4, field: "outbound[0].to[0]"},
		{name: "passthrough mapped", doc: out("[\"passthrough:::ffff:10.0.0.1\"]"), line: 4, field: "outbound[0].to[0]"},
		{name: "passthrough zone", doc: out("[\"passthrough:fe80::1%eth0\"]"), line: 4, field: "outbound[0].to[0]"},
		{name: "passthrough glob prefix", doc: out("[\"passthrough:10.*\"]"), line: 4, field: "outbound[0].to[0]"},
		{name: "passthrough as a source", doc: "outbound:\n  - name: o\n    from: [\"passthrough:*\"]\n    to: [spiffe://td/b]\n", line: 3, field: "outbound[0].from[0]"},
		{name: "passthrough inbound", doc: rule("[spiffe://td/a]", "{id: \"passthrough:*\"}"), line: 4, field: "inbound[0].to.id"},
		{
			name:  "duplicate name across lists",
			doc:   rule("[spiffe://td/a]", "{ports: [1]}") + "outbound:\n  - name: r\n    from: [spiffe://td/a]\n    to: [spiffe://td/b]\n",
			line:  6,
			field: "outbound[0].name",
		},
		{
			name:  "duplicate name in rules[2]",
			doc:   rule("[spiffe://td/a]", "{ports: [1]}") + "  - name: s\n    from: [spiffe://td/a]\n    to: {ports: [2]}\n  - name: r\n    from: [spiffe://td/a]\n    to: {ports: [3]}\n",
			line:  8,
			field: "inbound[2].name",
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			a, err := policy.ParseAuthz([]byte(tc.doc))
			var fe *policy.FieldError
			if !errors.As(err, &fe) {
				t.Fatalf("ParseAuthz() = %v, %v; want *FieldError", a, err)
			}
			if a != nil {
				t.Fatalf("ParseAuthz() returned a policy with error %v", err)
			}
			if fe.Line != tc.line || fe.Field != tc.field {
				t.Fatalf("error %q: line %d field %q, want line %d field %q", err, fe.Line, fe.Field, tc.line, tc.field)
			}
			if fe.Reason == "" {
				t.Fatalf("error %q has no reason", err)
			}
		})
	}
}

func TestParseAuthzAccepts(t *testing.T) {
	t.Parallel()
	for _, doc := range []string{
		examplePolicy,
		"inbound: []\n",
		"outbound: []\n",
		"# only a comment is not empty YAML but has no rules\n{}\n",
		"inbound:\n  - name: all-of-td\n    from: [spiffe://td/*]\n    to: {ports: [1]}\n",
		"inbound:\n  - name: Upper.Path_ok-1\n    from: [spiffe://td/A/B]\n    to: {id: spiffe://td/x/*}\n",
	} {
		if _, err := policy.ParseAuthz([]byte(doc)); err != nil {
			t.Errorf("ParseAuthz(%q) = %v", doc, err)
		}
	}
}

func TestAuthzInbound(t *testing.T) {
	t.Parallel()
	a := mustParse(t, examplePolicy)
	var zero spiffeid.ID
	tests := []struct {
		name  string
		src   string
		port  uint16
		dst   string // "" means unknown
		allow bool
		rule  int
	}{
		{name: "exact rule", src: "spiffe://example.org/agent/planner", port: 8080, dst: "spiffe://example.org/agent/search", allow: true, rule: 0},
		{name: "exact rule needs dst", src: "spiffe://example.org/agent/planner", port: 8080, rule: -1},
		{name: "exact rule wrong dst", src: "spiffe://example.org/agent/planner", port: 8080, dst: "spiffe://example.org/agent/searcher", rule: -1},
		{name: "exact rule wrong port", src: "spiffe://example.org/agent/planner", port: 8081, dst: "spiffe://example.org/agent/search", rule: -1},
		{name: "exact never by prefix", src: "spiffe://example.org/agent/planner2", port: 8080, dst: "spiffe://example.org/agent/search", rule: -1},
		{name: "exact never deeper", src: "spiffe://example.org/agent/planner/x", port: 8080, dst: "spiffe://example.org/agent/search", rule: -1},
		{name: "first match wins", src: "spiffe://example.org/agent/planner", port: 9090, allow: true, rule: 1},
		{name: "prefix child", src: "spiffe://example.org/agent/x", port: 9091, allow: true, rule: 1},
		{name: "prefix grandchild", src: "spiffe://example.org/agent/x/y", port: 9090, allow: true, rule: 1},
		{name: "prefix not itself", src: "spiffe://example.org/agent", port: 9090, rule: -1},
		{name: "prefix not sibling", src: "spiffe://example.org/agents/x", port: 9090, rule: -1},
		{name: "prefix is case sensitive", src: "spiffe://example.org/Agent/x", port: 9090, rule: -1},
		{name: "other trust domain", src: "spiffe://example.org.evil/agent/x", port: 9090, rule: -1},
		{name: "trust domain suffix", src: "spiffe://evil.example.org/agent/x", port: 9090, rule: -1},
		{name: "trust domain id", src: "spiffe://example.org", port: 9090, rule: -1},
		{name: "ops exact", src: "spiffe://example.org/ops/oncall", port: 1, dst: "spiffe://example.org/agent/search", allow: true, rule: 2},
		{name: "ops robots", src: "spiffe://example.org/ops/robots/r1", port: 1, dst: "spiffe://example.org/agent/search", allow: true, rule: 2},
		{name: "ops robots not itself", src: "spiffe://example.org/ops/robots", port: 1, dst: "spiffe://example.org/agent/search", rule: -1},
		{name: "no source", src: "", port: 9090, rule: -1},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			src, dst := zero, zero
			if tc.src != "" {
				src = id(tc.src)
			}
			if tc.dst != "" {
				dst = id(tc.dst)
			}
			d := a.Inbound(src, tc.port, dst)
			if d.Allow != tc.allow || d.Rule != tc.rule || d.Direction != policy.DirectionInbound || d.Reason() == "" {
				t.Fatalf("Inbound = %+v, want allow=%v rule=%d", d, tc.allow, tc.rule)
			}
		})
	}
}

func TestAuthzOutbound(t *testing.T) {
	t.Parallel()
	a := mustParse(t, examplePolicy)
	tests := []struct {
		name     string
		src, dst string
		allow    bool
		rule     int
	}{
		{name: "exact", src: "spiffe://example.org/agent/planner", dst: "spiffe://example.org/agent/search", allow: true, rule: 0},
		{name: "other trust domain prefix", src: "spiffe://example.org/agent/planner", dst: "spiffe://partner.test/api/v1", allow: true, rule: 0},
		{name: "prefix not itself", src: "spiffe://example.org/agent/planner", dst: "spiffe://partner.test/api", rule: -1},
		{name: "prefix not sibling", src: "spiffe://example.org/agent/planner", dst: "spiffe://partner.test/apiv2/x", rule: -1},
		{name: "unlisted source", src: "spiffe://example.org/agent/search", dst: "spiffe://example.org/agent/planner", rule: -1},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			d := a.Outbound(id(tc.src), id(tc.dst))
			if d.Allow != tc.allow || d.Rule != tc.rule || d.Direction != policy.DirectionOutbound {
				t.Fatalf("Outbound = %+v, want allow=%v rule=%d", d, tc.allow, tc.rule)
			}
		})
	}
}

func TestAuthzDefaults(t *testing.T) {
	t.Parallel()
	x, y := id("spiffe://td/x"), id("spiffe://td/y")
	// The zero value and nil fail closed in both directions.
	for name, a := range map[string]*policy.Authz{"zero": {}, "nil": nil} {
		if d := a.Inbound(x, 1, y); d.Allow || d.Rule != -1 {
			t.Errorf("%s Inbound = %+v, want default deny", name, d)
		}
		if d := a.Outbound(x, y); d.Allow || d.Rule != -1 {
			t.Errorf("%s Outbound = %+v, want default deny", name, d)
		}
	}
	// A parsed policy without outbound rules leaves outbound unrestricted.
	a := mustParse(t, "inbound: []\n")
	if d := a.Outbound(x, y); !d.Allow || d.Rule != -1 {
		t.Errorf("Outbound without rules = %+v, want default allow", d)
	}
	if d := a.Inbound(x, 1, y); d.Allow || d.Rule != -1 {
		t.Errorf("Inbound without rules = %+v, want default deny", d)
	}
}

// TestAuthzSummary covers what a proxy asks besides a decision: the deciding rule's
// name, whether a peer may reach anything at all, and whether outbound is restricted.
func TestAuthzSummary(t *testing.T) {
	t.Parallel()
	a := mustParse(t, examplePolicy)
	planner, search := id("spiffe://example.org/agent/planner"), id("spiffe://example.org/agent/search")
	if d := a.Inbound(planner, 8080, search); d.Name != "planner-to-search" {
		t.Errorf("Inbound decided by %q, want planner-to-search", d.Name)
	}
	if d := a.Inbound(search, 8080, search); d.Name != "default" {
		t.Errorf("default Inbound decision named %q", d.Name)
	}
	if d := a.Outbound(search, planner); d.Name != "default" || d.Allow {
		t.Errorf("default Outbound = %+v", d)
	}
	for src, want := range map[string]bool{
		"spiffe://example.org/agent/planner":   true,
		"spiffe://example.org/agent/x":         true,
		"spiffe://example.org/ops/oncall":      true,
		"spiffe://example.org/ops/oncall2":     false,
		"spiffe://example.org/host/a":          false,
		"spiffe://example.org.evil/agent/x":    false,
		"spiffe://example.org/ops/robots":      false,
		"spiffe://example.org/ops/robots/r2/x": true,
	} {
		if got := a.InboundFrom(id(src)); got != want {
			t.Errorf("InboundFrom(%s) = %v, want %v", src, got, want)
		}
	}
	if !a.Restricted() || mustParse(t, "inbound: []\n").Restricted() || !(*policy.Authz)(nil).Restricted() {
		t.Error("Restricted: want true with outbound rules and for nil, false without rules")
	}
	if (*policy.Authz)(nil).InboundFrom(planner) {
		t.Error("nil InboundFrom admits")
	}
	if a.InboundRules() != 3 || a.OutboundRules() != 1 {
		t.Errorf("rules = %d inbound, %d outbound; want 3, 1", a.InboundRules(), a.OutboundRules())
	}
	var fe *policy.FieldError
	if _, err := policy.ParseAuthz([]byte("inbound:\n  - name: default\n    from: [spiffe://td/a]\n    to: {ports: [1]}\n")); !errors.As(err, &fe) || fe.Field != "inbound[0].name" || fe.Line != 2 {
		t.Errorf("a rule named default: %v", err)
	}
}

func TestAuthzExplainGolden(t *testing.T) {
	t.Parallel()
	a := mustParse(t, examplePolicy)
	open := mustParse(t, "inbound: []\n")
	planner, search := id("spiffe://example.org/agent/planner"), id("spiffe://example.org/agent/search")
	tests := []struct {
		name string
		a    *policy.Authz
		d    policy.Decision
	}{
		{name: "inbound_allow_exact", a: a, d: a.Inbound(planner, 8080, search)},
		{name: "inbound_allow_ports", a: a, d: a.Inbound(id("spiffe://example.org/agent/x/y"), 9091, spiffeid.ID{})},
		{name: "inbound_allow_id", a: a, d: a.Inbound(id("spiffe://example.org/ops/robots/r1"), 443, search)},
		{name: "inbound_default_deny", a: a, d: a.Inbound(id("spiffe://example.org/agents/x"), 9090, spiffeid.ID{})},
		{name: "outbound_allow", a: a, d: a.Outbound(planner, id("spiffe://partner.test/api/v1"))},
		{name: "outbound_default_deny", a: a, d: a.Outbound(search, planner)},
		{name: "outbound_unrestricted", a: open, d: open.Outbound(search, planner)},
		{name: "foreign_rule", a: open, d: a.Inbound(planner, 8080, search)},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			got := tc.a.Explain(tc.d)
			path := filepath.Join("testdata", "explain", tc.name+".golden")
			if *update {
				if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("read golden (run with -update): %v", err)
			}
			if got != string(want) {
				t.Fatalf("Explain mismatch for %s\ngot:\n%s\nwant:\n%s", path, got, want)
			}
		})
	}
}

func TestFieldErrorFormat(t *testing.T) {
	t.Parallel()
	_, err := policy.ParseAuthz([]byte("inbound:\n  - name: r\n    from: [spiffe://TD/a]\n    to: {ports: [1]}\n"))
	if got := err.Error(); !strings.HasPrefix(got, "policy: line 3: inbound[0].from[0]: ") {
		t.Fatalf("Error() = %q", got)
	}
}
