package redirect

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"
	"strings"
)

// agentmesh's own chains in the nat table. Install creates them and Remove deletes them; any
// rule elsewhere that jumps to them is treated as agentmesh's too.
const (
	ChainOutput  = "AGENTMESH_OUTPUT"
	ChainInbound = "AGENTMESH_INBOUND"
)

// ownChains lists every chain name agentmesh has ever owned, so a reinstall or Remove also
// clears chains an earlier configuration created.
var ownChains = [...]string{ChainOutput, ChainInbound}

var (
	loopback4 = netip.MustParsePrefix("127.0.0.0/8")
	loopback6 = netip.MustParsePrefix("::1/128")
)

// Plan is what Install programs: agentmesh's part of the nat table of each address family.
type Plan struct {
	IPv4 Ruleset
	IPv6 Ruleset // empty unless Config.IPv6
}

// Ruleset is agentmesh's part of one family's nat table. Every rule is written the way
// iptables-save prints it, so Install can tell whether the kernel already holds exactly
// this Ruleset.
type Ruleset struct {
	// Chains are agentmesh's own chains, each created (or flushed) and filled in order.
	Chains []Chain
	// Jumps are the rules in built-in chains that send traffic into Chains. Install
	// appends each once and leaves one copy of an existing one.
	Jumps []Rule
}

// Chain is one of agentmesh's own chains and its rules, in order.
type Chain struct {
	Name  string
	Rules []string // rule specifications, without the leading "-A Name"
}

// Rule is one rule of a built-in chain.
type Rule struct {
	Chain string
	Spec  string // rule specification, without the leading "-A Chain"
}

func (r Rule) String() string { return "-A " + r.Chain + " " + r.Spec }

// IsZero reports whether the Ruleset holds nothing: no chain and no jump.
func (r Ruleset) IsZero() bool { return len(r.Chains) == 0 && len(r.Jumps) == 0 }

// RestoreInput is the iptables-restore input (applied with --noflush) that installs r on a
// nat table holding nothing of agentmesh's. On a table that already does, Install applies
// the same chains and rules but adds only the jumps that are missing and deletes agentmesh
// rules and chains r does not have, in the same atomic restore. An empty Ruleset gives "".
func (r Ruleset) RestoreInput() string { return restoreScript(tableState{}, r) }

// Rules validates cfg (with defaults applied) and returns the rules Install would program.
// It is pure: it runs nothing and reads no system state. Invalid configs give a
// *ConfigError naming the field, matching ErrInvalidConfig.
func Rules(cfg Config) (Plan, error) {
	cfg = cfg.withDefaults()
	if err := cfg.validate(); err != nil {
		return Plan{}, err
	}
	p := Plan{IPv4: family(cfg, loopback4, netip.Addr.Is4)}
	if cfg.IPv6 {
		p.IPv6 = family(cfg, loopback6, netip.Addr.Is6)
	}
	return p, nil
}

// family builds the Ruleset of one address family from a validated Config; is tells that
// family's addresses (netip.Addr.Is4 or Is6) in the CIDR lists.
func family(cfg Config, loopback netip.Prefix, is func(netip.Addr) bool) Ruleset {
	pick := func(ps []netip.Prefix) []netip.Prefix {
		var out []netip.Prefix
		for _, p := range ps {
			if is(p.Addr()) {
				out = append(out, p.Masked())
			}
		}
		slices.SortFunc(out, comparePrefix)
		return out
	}

	// The order is the contract: the exclusions first (proxy identity, then
	// destinations), so nothing after them can capture the proxy's own connections; then
	// the REDIRECTs; anything else falls off the end of the chain and is not captured.
	var out []string
	for _, uid := range sorted(cfg.ExcludeUIDs) {
		out = append(out, fmt.Sprintf("-m owner --uid-owner %d -j RETURN", uid))
	}
	if cfg.ExcludeMark != 0 {
		out = append(out, fmt.Sprintf("-m mark --mark %#x -j RETURN", cfg.ExcludeMark))
	}
	out = append(out, "-d "+loopback.String()+" -j RETURN")
	for _, p := range pick(cfg.ExcludeCIDRs) {
		if p != loopback {
			out = append(out, "-d "+p.String()+" -j RETURN")
		}
	}
	for _, port := range sorted(cfg.ExcludePorts) {
		out = append(out, fmt.Sprintf("-p tcp -m tcp --dport %d -j RETURN", port))
	}
	redirect := fmt.Sprintf("-j REDIRECT --to-ports %d", cfg.OutboundPort)
	dsts := pick(cfg.IncludeCIDRs)
	if len(dsts) == 0 {
		dsts = []netip.Prefix{{}} // any destination
	}
	for _, d := range dsts {
		dst := ""
		if d.IsValid() {
			dst = "-d " + d.String() + " "
		}
		if len(cfg.IncludePorts) == 0 {
			out = append(out, dst+"-p tcp "+redirect)
			continue
		}
		for _, port := range sorted(cfg.IncludePorts) {
			out = append(out, fmt.Sprintf("%s-p tcp -m tcp --dport %d %s", dst, port, redirect))
		}
	}

	r := Ruleset{
		Chains: []Chain{{Name: ChainOutput, Rules: out}},
		Jumps:  []Rule{{Chain: "OUTPUT", Spec: "-p tcp -j " + ChainOutput}},
	}
	if len(cfg.StrictPorts) > 0 {
		var in []string
		for _, port := range sorted(cfg.StrictPorts) {
			in = append(in, fmt.Sprintf("-p tcp -m tcp --dport %d -j REDIRECT --to-ports %d", port, cfg.InboundPort))
		}
		r.Chains = append(r.Chains, Chain{Name: ChainInbound, Rules: in})
		r.Jumps = append(r.Jumps, Rule{Chain: "PREROUTING", Spec: "-p tcp -j " + ChainInbound})
	}
	return r
}

func sorted[T cmp.Ordered](s []T) []T {
	return slices.Sorted(slices.Values(s))
}

func comparePrefix(a, b netip.Prefix) int {
	if c := a.Addr().Compare(b.Addr()); c != 0 {
		return c
	}
	return cmp.Compare(a.Bits(), b.Bits())
}

// String renders the plan as the restore input of each family, with a header line per
// family, as stored in the golden files.
func (p Plan) String() string {
	var b strings.Builder
	b.WriteString("# iptables-restore --noflush (IPv4)\n")
	b.WriteString(p.IPv4.RestoreInput())
	if !p.IPv6.IsZero() {
		b.WriteString("# ip6tables-restore --noflush (IPv6)\n")
		b.WriteString(p.IPv6.RestoreInput())
	}
	return b.String()
}
