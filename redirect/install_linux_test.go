package redirect

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os/exec"
	"slices"
	"strings"
	"testing"
)

// Rules of "other software" seeded before Install; they must survive Install and Remove
// untouched, in place and in order.
const (
	hostRulesV4 = `*nat
:DOCKER - [0:0]
-A PREROUTING -d 198.51.100.0/24 -p tcp -j DOCKER
-A OUTPUT -d 198.51.100.0/24 -p tcp -j DOCKER
-A POSTROUTING -s 172.17.0.0/16 -j MASQUERADE
-A DOCKER -p tcp -m tcp --dport 8443 -j DNAT --to-destination 172.17.0.2:443
COMMIT
*filter
:INPUT ACCEPT [0:0]
-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT
COMMIT
`
	hostRulesV6 = `*nat
:DOCKER - [0:0]
-A OUTPUT -d 2001:db8:100::/48 -p tcp -j DOCKER
-A DOCKER -p tcp -m tcp --dport 8443 -j DNAT --to-destination [fd00::2]:443
COMMIT
`
)

type familyCase struct {
	t    tools
	plan func(Plan) Ruleset
	seed string // rules of other software, iptables-restore input
}

var families = []familyCase{
	{toolsV4, func(p Plan) Ruleset { return p.IPv4 }, hostRulesV4},
	{toolsV6, func(p Plan) Ruleset { return p.IPv6 }, hostRulesV6},
}

// backend picks the iptables implementation the tests run: the default one (on Debian 12,
// nft) or the legacy x_tables one, which many hosts still use.
type backend struct {
	name string
	tool func(string) string // iptables-save -> the program to run
}

var backends = []backend{
	{"default", func(s string) string { return s }},
	{"legacy", func(s string) string {
		for _, suffix := range []string{"-save", "-restore"} {
			if base, ok := strings.CutSuffix(s, suffix); ok {
				return base + "-legacy" + suffix
			}
		}
		return s + "-legacy"
	}},
}

// command is the Config.Command running this backend's tools in ns.
func (b backend) command(ns string) func(ctx context.Context, name string, arg ...string) *exec.Cmd {
	return func(ctx context.Context, name string, arg ...string) *exec.Cmd {
		return inNetns(ns)(ctx, b.tool(name), arg...)
	}
}

// available skips the test when this backend's tools are not installed.
func (b backend) available(t *testing.T) {
	t.Helper()
	for _, f := range families {
		for _, tool := range []string{f.t.save, f.t.restore} {
			if _, err := exec.LookPath(b.tool(tool)); err != nil {
				t.Skipf("%s backend: %v", b.name, err)
			}
		}
	}
}

// TestInstallRemove installs every golden config for real in a fresh namespace, with each
// backend, with and without other rules present, and checks idempotence, the installed
// rules, and that Remove restores iptables-save byte for byte.
func TestInstallRemove(t *testing.T) {
	requireNetns(t, "iptables-save", "iptables-restore", "ip6tables-save", "ip6tables-restore")
	t.Parallel()
	for _, be := range backends {
		for _, tc := range goldenCases {
			for _, seeded := range []bool{true, false} {
				name := be.name + "/" + tc.name + "/empty_table"
				if seeded {
					name = be.name + "/" + tc.name + "/with_host_rules"
				}
				t.Run(name, func(t *testing.T) {
					be.available(t)
					t.Parallel()
					testInstallRemove(t, be, tc.cfg, seeded)
				})
			}
		}
	}
}

func testInstallRemove(t *testing.T, be backend, cfg Config, seeded bool) {
	ns := newNetns(t)
	rec := &recorder{next: be.command(ns)}
	cfg.Command = rec.command
	plan, err := Rules(cfg)
	if err != nil {
		t.Fatal(err)
	}
	save := func(f familyCase) string {
		// Seeded: the whole iptables-save. Empty: the nat table only, since a table
		// Install had to create outlives Remove (empty).
		if seeded {
			return normalizeSave(nsRun(t, ns, "", be.tool(f.t.save)))
		}
		return normalizeSave(nsRun(t, ns, "", be.tool(f.t.save), "-t", "nat"))
	}

	before := map[string]string{}
	for _, f := range families {
		if seeded {
			nsRun(t, ns, f.seed, be.tool(f.t.restore), "--noflush")
		}
		before[f.t.save] = save(f)
		t.Cleanup(func() {
			if t.Failed() {
				t.Logf("%s at failure:\n%s", f.t.save, nsRun(t, ns, "", be.tool(f.t.save)))
			}
		})
	}

	if err := Install(t.Context(), cfg); err != nil {
		t.Fatalf("Install: %v", err)
	}
	// On a table with nothing of ours, Install applies exactly Rules' input.
	installCmds := rec.take()
	for _, f := range families {
		want := f.plan(plan).RestoreInput()
		if got := restoreInput(t, installCmds, f.t.restore); got != want {
			t.Errorf("%s input:\n%s\nwant (Plan):\n%s", f.t.restore, got, want)
		}
	}
	for range 2 { // the second Install must change nothing
		for _, f := range families {
			assertInstalled(t, ns, be, f, f.plan(plan))
		}
		if err := Install(t.Context(), cfg); err != nil {
			t.Fatalf("Install again: %v", err)
		}
		if got := names(rec.take()); slices.Contains(got, "iptables-restore") || slices.Contains(got, "ip6tables-restore") {
			t.Errorf("Install of installed rules ran %v, want only saves", got)
		}
	}

	for i := range 2 { // the second Remove must be a no-op
		if err := Remove(t.Context(), Config{Command: rec.command, IPv6: cfg.IPv6}); err != nil {
			t.Fatalf("Remove #%d: %v", i+1, err)
		}
		cmds := names(rec.take())
		for _, f := range families {
			if got := save(f); got != before[f.t.save] {
				t.Errorf("after Remove #%d, %s differs from before Install:\n%s\nbefore:\n%s", i+1, f.t.save, got, before[f.t.save])
			}
			ran := slices.Contains(cmds, f.t.restore)
			if wantRun := i == 0 && !f.plan(plan).IsZero(); ran != wantRun {
				t.Errorf("Remove #%d ran %v: restore ran = %v, want %v", i+1, cmds, ran, wantRun)
			}
		}
	}
}

// restoreInput returns what the one recorded restore command of the given tool read on
// stdin, "" if it did not run.
func restoreInput(t *testing.T, cmds []recorded, tool string) string {
	t.Helper()
	var got []string
	for _, c := range cmds {
		if c.name != tool {
			continue
		}
		r, ok := c.cmd.Stdin.(*bytes.Reader)
		if !ok {
			t.Fatalf("%s stdin is %T", tool, c.cmd.Stdin)
		}
		if _, err := r.Seek(0, io.SeekStart); err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(r)
		got = append(got, string(b))
	}
	if len(got) > 1 {
		t.Fatalf("%s ran %d times, want at most once", tool, len(got))
	}
	return strings.Join(got, "")
}

// assertInstalled checks the family's nat table holds exactly want of agentmesh's: our
// chains with exactly the planned rules in order, and one copy of each jump.
func assertInstalled(t *testing.T, ns string, be backend, f familyCase, want Ruleset) {
	t.Helper()
	save := nsRun(t, ns, "", be.tool(f.t.save), "-t", "nat")
	st, err := parseSave([]byte(save))
	if err != nil {
		t.Fatalf("parse %s: %v", f.t.save, err)
	}
	wanted := map[string][]string{}
	for _, c := range want.Chains {
		wanted[c.Name] = c.Rules
	}
	for _, name := range ownChains {
		var got []string
		for _, r := range st.rules {
			if r.Chain == name {
				got = append(got, r.Spec)
			}
		}
		w, ok := wanted[name]
		if ok != st.chains[name] || !slices.Equal(got, w) {
			t.Errorf("%s chain %s: declared %v, rules\n%s\nwant declared %v, rules\n%s", f.t.family, name, st.chains[name], strings.Join(got, "\n"), ok, strings.Join(w, "\n"))
		}
	}
	for _, j := range want.Jumps {
		if n := strings.Count(save, "\n"+j.String()+"\n"); n != 1 {
			t.Errorf("%s: %d copies of %q, want 1", f.t.family, n, j)
		}
	}
	for _, r := range st.rules {
		if isOwn(target(r.Spec)) && !isOwn(r.Chain) && !slices.Contains(want.Jumps, r) {
			t.Errorf("%s: unexpected jump %v", f.t.family, r)
		}
	}
}

// TestInstallReconfigure moves between configs and checks that what the new config no longer
// needs is gone (inbound chain, IPv6 rules), then that Remove still restores the start.
func TestInstallReconfigure(t *testing.T) {
	requireNetns(t, "iptables-save", "iptables-restore", "ip6tables-save", "ip6tables-restore")
	t.Parallel()
	ns := newNetns(t)
	for _, f := range families {
		nsRun(t, ns, f.seed, f.t.restore, "--noflush")
	}
	before := normalizeSave(nsRun(t, ns, "", "iptables-save")) + normalizeSave(nsRun(t, ns, "", "ip6tables-save"))

	steps := []struct {
		name string
		cfg  Config
	}{
		{"dual stack strict", Config{ExcludeUIDs: []int{1337}, StrictPorts: []uint16{9000, 9001}, IPv6: true}},
		{"strict off, IPv6 off", Config{ExcludeMark: 0x539, ExcludePorts: []uint16{22}}},
		{"strict again, other ports", Config{ExcludeMark: 0x539, StrictPorts: []uint16{7000}, OutboundPort: 16001, InboundPort: 16006}},
		{"IPv6 again", Config{ExcludeUIDs: []int{1337}, IPv6: true}},
	}
	for _, s := range steps {
		cfg := s.cfg
		cfg.Command = inNetns(ns)
		if err := Install(t.Context(), cfg); err != nil {
			t.Fatalf("%s: Install: %v", s.name, err)
		}
		plan, err := Rules(cfg)
		if err != nil {
			t.Fatal(err)
		}
		for _, f := range families {
			assertInstalled(t, ns, backends[0], f, f.plan(plan))
		}
	}
	if err := Remove(t.Context(), Config{Command: inNetns(ns)}); err != nil {
		t.Fatalf("Remove: %v", err)
	}
	after := normalizeSave(nsRun(t, ns, "", "iptables-save")) + normalizeSave(nsRun(t, ns, "", "ip6tables-save"))
	if after != before {
		t.Errorf("after Remove:\n%s\nbefore:\n%s", after, before)
	}
}

// TestRemoveNothingInstalled: on a namespace that never had rules, Remove reads and writes
// nothing, so not even an empty nat table appears.
func TestRemoveNothingInstalled(t *testing.T) {
	requireNetns(t, "iptables-save", "ip6tables-save")
	t.Parallel()
	ns := newNetns(t)
	rec := &recorder{next: inNetns(ns)}
	if err := Remove(t.Context(), Config{Command: rec.command, IPv6: true}); err != nil {
		t.Fatalf("Remove: %v", err)
	}
	if got, want := names(rec.take()), []string{"iptables-save", "ip6tables-save"}; !slices.Equal(got, want) {
		t.Errorf("Remove ran %v, want %v", got, want)
	}
	for _, save := range []string{"iptables-save", "ip6tables-save"} {
		if out := nsRun(t, ns, "", save); out != "" {
			t.Errorf("%s after Remove on a clean namespace:\n%s", save, out)
		}
	}
}

// fakeTools is a Config.Command that runs a shell snippet per tool instead of the tool.
func fakeTools(scripts map[string]string) func(ctx context.Context, name string, arg ...string) *exec.Cmd {
	return func(ctx context.Context, name string, arg ...string) *exec.Cmd {
		script, ok := scripts[name]
		if !ok {
			script = "echo unexpected " + name + " >&2; exit 99"
		}
		return exec.CommandContext(ctx, "sh", "-c", script)
	}
}

const emptyNat = `printf '*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n'`

func TestInstallErrors(t *testing.T) {
	if _, err := exec.LookPath("sh"); err != nil {
		t.Skip("needs sh")
	}
	t.Parallel()
	valid := Config{ExcludeUIDs: []int{1337}}
	tests := []struct {
		name    string
		do      func(ctx context.Context, cfg Config) error
		cfg     Config
		scripts map[string]string
		cancel  bool
		check   func(t *testing.T, err error)
		// wantNoCommands: nothing may run at all.
		wantNoCommands bool
	}{
		{
			name: "restore failure carries stderr",
			do:   Install, cfg: valid,
			scripts: map[string]string{
				"iptables-save":    emptyNat,
				"iptables-restore": "cat >/dev/null; echo 'iptables-restore v1.8.9: Chain X does not exist' >&2; echo 'Error occurred at line: 3' >&2; exit 2",
			},
			check: func(t *testing.T, err error) {
				var ce *CommandError
				if !errors.As(err, &ce) || ce.Name != "iptables-restore" {
					t.Fatalf("error %v is not a CommandError of iptables-restore", err)
				}
				for _, want := range []string{"redirect: install: apply ipv4 rules: iptables-restore --noflush --wait: exit status 2", "Chain X does not exist Error occurred at line: 3"} {
					if !strings.Contains(err.Error(), want) {
						t.Errorf("error %q lacks %q", err, want)
					}
				}
			},
		},
		{
			name: "unreadable table",
			do:   Install, cfg: valid,
			scripts: map[string]string{"iptables-save": "echo 'iptables-save: permission denied' >&2; exit 1"},
			check: func(t *testing.T, err error) {
				if !strings.Contains(err.Error(), "read ipv4 nat table") || !strings.Contains(err.Error(), "permission denied") {
					t.Errorf("error %q", err)
				}
			},
		},
		{
			name:    "garbage save output",
			do:      Remove,
			scripts: map[string]string{"iptables-save": "echo '-A OUTPUT -j X'"},
			check: func(t *testing.T, err error) {
				if !strings.Contains(err.Error(), "redirect: remove: parse iptables-save output: line 1") {
					t.Errorf("error %q", err)
				}
			},
		},
		{
			name: "cancelled context",
			do:   Install, cfg: valid, cancel: true,
			scripts: map[string]string{"iptables-save": emptyNat},
			check: func(t *testing.T, err error) {
				if !errors.Is(err, context.Canceled) {
					t.Errorf("error %v does not match context.Canceled", err)
				}
			},
		},
		{
			name: "invalid config runs nothing",
			do:   Install, cfg: Config{ExcludeUIDs: []int{-5}},
			scripts:        map[string]string{},
			wantNoCommands: true,
			check: func(t *testing.T, err error) {
				if !errors.Is(err, ErrInvalidConfig) {
					t.Errorf("error %v, want ErrInvalidConfig", err)
				}
			},
		},
		{
			name:    "IPv6 unreadable without IPv6 is fine",
			do:      Remove,
			scripts: map[string]string{"iptables-save": emptyNat, "ip6tables-save": "echo 'ip6tables-save: no such table' >&2; exit 1"},
			check: func(t *testing.T, err error) {
				if err != nil {
					t.Errorf("Remove: %v", err)
				}
			},
		},
		{
			name: "IPv6 unreadable with IPv6 is an error",
			do:   Remove, cfg: Config{IPv6: true},
			scripts: map[string]string{"iptables-save": emptyNat, "ip6tables-save": "echo 'ip6tables-save: no such table' >&2; exit 1"},
			check: func(t *testing.T, err error) {
				if err == nil || !strings.Contains(err.Error(), "read ipv6 nat table") || !strings.Contains(err.Error(), "no such table") {
					t.Errorf("Remove error = %v", err)
				}
			},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			rec := &recorder{next: fakeTools(tc.scripts)}
			cfg := tc.cfg
			cfg.Command = rec.command
			ctx, cancel := context.WithCancel(t.Context())
			defer cancel()
			if tc.cancel {
				cancel()
			}
			err := tc.do(ctx, cfg)
			tc.check(t, err)
			if ran := names(rec.take()); tc.wantNoCommands && len(ran) != 0 {
				t.Errorf("ran %v, want nothing", ran)
			}
		})
	}
}

// TestInstallRepairsTampering: duplicate or foreign-form jumps into our chains and rules
// added to them by hand are put back to exactly the plan by the next Install.
func TestInstallRepairsTampering(t *testing.T) {
	requireNetns(t, "iptables", "iptables-save", "iptables-restore", "ip6tables-save")
	t.Parallel()
	ns := newNetns(t)
	nsRun(t, ns, hostRulesV4, "iptables-restore", "--noflush")
	before := normalizeSave(nsRun(t, ns, "", "iptables-save"))
	cfg := Config{ExcludeUIDs: []int{1337}, StrictPorts: []uint16{9000}, Command: inNetns(ns)}
	plan, err := Rules(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := Install(t.Context(), cfg); err != nil {
		t.Fatalf("Install: %v", err)
	}
	for _, args := range [][]string{
		{"-A", "OUTPUT", "-p", "tcp", "-j", ChainOutput},            // a second copy
		{"-I", "OUTPUT", "1", "-j", ChainOutput},                    // an older form, first
		{"-A", "DOCKER", "-p", "tcp", "-j", ChainInbound},           // from someone else's chain
		{"-A", ChainOutput, "-d", "203.0.113.0/24", "-j", "RETURN"}, // a hand-made exclusion
		{"-F", ChainInbound},                                        // an emptied chain
	} {
		nsRun(t, ns, "", "iptables", append([]string{"-t", "nat"}, args...)...)
	}
	if err := Install(t.Context(), cfg); err != nil {
		t.Fatalf("Install over tampered rules: %v", err)
	}
	assertInstalled(t, ns, backends[0], families[0], plan.IPv4)
	if err := Remove(t.Context(), cfg); err != nil {
		t.Fatalf("Remove: %v", err)
	}
	if after := normalizeSave(nsRun(t, ns, "", "iptables-save")); after != before {
		t.Errorf("after Remove:\n%s\nbefore:\n%s", after, before)
	}
}
