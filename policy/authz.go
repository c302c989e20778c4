package policy

import (
	"fmt"
	"net/netip"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Authz is a parsed authorization policy: which peers may reach which local ports and
// agents (inbound), and which peers local agents may call (outbound). Every rule
// allows; anything no rule allows is denied, except that a parsed policy with no
// outbound rules leaves outbound calls unrestricted.
//
// The zero value (and a nil *Authz) denies everything, inbound and outbound, so a
// proxy that has not loaded a policy yet fails closed. An Authz is immutable once
// parsed and safe for concurrent use.
type Authz struct {
	inbound  []inboundRule
	outbound []outboundRule
	// outboundOpen is set by ParseAuthz when the file lists no outbound rules.
	outboundOpen bool
}

type inboundRule struct {
	name  string
	from  []pattern
	ports []uint16 // empty: any port
	id    *pattern // nil: any local agent
}

type outboundRule struct {
	name    string
	from    []pattern
	to      []pattern
	toAddrs []addrPattern // passthrough destinations (PassthroughScheme)
}

// Flow says which rule list, inbound or outbound, a Decision refers to.
type Flow uint8

// Flows of a Decision. The zero Flow belongs to the zero Decision.
const (
	DirectionInbound Flow = iota + 1
	DirectionOutbound
)

func (d Flow) String() string {
	switch d {
	case DirectionInbound:
		return "inbound"
	case DirectionOutbound:
		return "outbound"
	}
	return "unknown"
}

// Decision is the outcome of an authorization check with the deciding rule.
type Decision struct {
	Allow     bool
	Direction Flow
	Rule      int    // index into the Direction's rule list in file order; -1 for the default
	Name      string // the deciding rule's name; "default" for the default
	// The request decided: source, destination (zero when unknown) and, inbound, port.
	Src, Dst spiffeid.ID
	Port     uint16
	// Addr is the destination of a passthrough decision (Authz.Passthrough), zero
	// otherwise.
	Addr netip.Addr
	// open marks the default allow of a policy without outbound rules.
	open bool
}

// Reason is one line naming the deciding rule (or the default) and the request, for logs.
// It is built on demand, so that deciding costs no allocation.
func (d Decision) Reason() string {
	var req string
	switch d.Direction {
	case DirectionInbound:
		req = fmt.Sprintf("%s to port %d", idString(d.Src), d.Port)
		if !d.Dst.IsZero() {
			req += " (" + d.Dst.String() + ")"
		}
	case DirectionOutbound:
		req = idString(d.Src) + " to call " + idString(d.Dst)
		if d.Addr.IsValid() {
			req = idString(d.Src) + " to pass through to " + d.Addr.String()
		}
	default:
		return "no decision"
	}
	switch {
	case d.open:
		return "no outbound rules: allows " + req
	case d.Allow:
		return fmt.Sprintf("%s rule %q allows %s", d.Direction, d.Name, req)
	}
	return fmt.Sprintf("no %s rule allows %s", d.Direction, req)
}

// The YAML shape of a policy file. Field names are what an operator writes.
type authzFile struct {
	Inbound  []inboundYAML  `yaml:"inbound"`
	Outbound []outboundYAML `yaml:"outbound"`
}

type inboundYAML struct {
	Name string    `yaml:"name"`
	From []string  `yaml:"from"`
	To   inboundTo `yaml:"to"`
}

type inboundTo struct {
	Ports []uint16 `yaml:"ports"`
	ID    string   `yaml:"id"`
}

type outboundYAML struct {
	Name string   `yaml:"name"`
	From []string `yaml:"from"`
	To   []string `yaml:"to"`
}

// defaultRule is Decision.Name when no rule matched.
const defaultRule = "default"

// ruleName keeps names safe to print in logs and explain output (no spaces, quotes or
// control characters).
var ruleName = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`)

// ParseAuthz parses and validates a policy file. Unknown fields, malformed or
// non-normalised SPIFFE IDs, missing names, duplicate names and rules that select
// nothing are refused. Every error is a *FieldError carrying the line and the field
// path (e.g. "inbound[2].from[0]"), so the caller can print file:line: field: reason.
func ParseAuthz(data []byte) (*Authz, error) {
	var f authzFile
	doc, err := decodeYAML(data, &f)
	if err != nil {
		return nil, err
	}
	a := &Authz{outboundOpen: len(f.Outbound) == 0}
	names := map[string]string{} // rule name -> path of its first use
	checkName := func(path, name string) error {
		switch {
		case name == "":
			return doc.fieldError(path+".name", "required")
		case !ruleName.MatchString(name):
			return doc.fieldError(path+".name", "must be letters, digits, '.', '-' or '_', starting with a letter or digit")
		case name == defaultRule:
			return doc.fieldError(path+".name", `"default" names the decision when no rule matches`)
		case names[name] != "":
			return doc.fieldError(path+".name", fmt.Sprintf("duplicate rule name %q (first used at %s)", name, names[name]))
		}
		names[name] = path
		return nil
	}
	for i, r := range f.Inbound {
		path := "inbound[" + strconv.Itoa(i) + "]"
		if err := checkName(path, r.Name); err != nil {
			return nil, err
		}
		from, err := parsePatterns(doc, path+".from", r.From)
		if err != nil {
			return nil, err
		}
		rule := inboundRule{name: r.Name, from: from, ports: r.To.Ports}
		if len(r.To.Ports) == 0 && r.To.ID == "" {
			return nil, doc.fieldError(path+".to", "ports or id required")
		}
		for j, p := range r.To.Ports {
			if p == 0 {
				return nil, doc.fieldError(path+".to.ports["+strconv.Itoa(j)+"]", "port must be in [1, 65535]")
			}
		}
		if r.To.ID != "" {
			p, err := parsePattern(r.To.ID)
			if err != nil {
				return nil, doc.fieldError(path+".to.id", err.Error())
			}
			rule.id = &p
		}
		a.inbound = append(a.inbound, rule)
	}
	for i, r := range f.Outbound {
		path := "outbound[" + strconv.Itoa(i) + "]"
		if err := checkName(path, r.Name); err != nil {
			return nil, err
		}
		from, err := parsePatterns(doc, path+".from", r.From)
		if err != nil {
			return nil, err
		}
		to, toAddrs, err := parseOutboundTo(doc, path+".to", r.To)
		if err != nil {
			return nil, err
		}
		a.outbound = append(a.outbound, outboundRule{name: r.Name, from: from, to: to, toAddrs: toAddrs})
	}
	return a, nil
}

func parsePatterns(doc *yamlDoc, path string, in []string) ([]pattern, error) {
	if len(in) == 0 {
		return nil, doc.fieldError(path, "at least one SPIFFE ID required")
	}
	out := make([]pattern, 0, len(in))
	for i, s := range in {
		p, err := parsePattern(s)
		if err != nil {
			return nil, doc.fieldError(path+"["+strconv.Itoa(i)+"]", err.Error())
		}
		out = append(out, p)
	}
	return out, nil
}

// Inbound decides whether the peer src may reach the local port and, when known, the
// local agent dst (the zero ID when unknown: a rule that names to.id then never
// matches). The first matching rule in file order allows; no match denies with Rule -1.
func (a *Authz) Inbound(src spiffeid.ID, port uint16, dst spiffeid.ID) Decision {
	d := Decision{Direction: DirectionInbound, Rule: -1, Name: defaultRule, Src: src, Dst: dst, Port: port}
	if a == nil {
		return d
	}
	for i, r := range a.inbound {
		if !matchAny(r.from, src) {
			continue
		}
		if len(r.ports) > 0 && !slices.Contains(r.ports, port) {
			continue
		}
		if r.id != nil && !r.id.match(dst) {
			continue
		}
		d.Allow, d.Rule, d.Name = true, i, r.name
		return d
	}
	return d
}

// InboundFrom reports whether some inbound rule admits src at all, whatever the port
// and agent: a proxy refuses any other peer at the handshake, before it names a port.
func (a *Authz) InboundFrom(src spiffeid.ID) bool {
	if a == nil {
		return false
	}
	for _, r := range a.inbound {
		if matchAny(r.from, src) {
			return true
		}
	}
	return false
}

// InboundRules and OutboundRules count the rules of each direction.
func (a *Authz) InboundRules() int {
	if a == nil {
		return 0
	}
	return len(a.inbound)
}

// OutboundRules counts the outbound rules (see InboundRules).
func (a *Authz) OutboundRules() int {
	if a == nil {
		return 0
	}
	return len(a.outbound)
}

// Restricted reports whether outbound calls are subject to rules: false for a parsed
// policy that lists none.
func (a *Authz) Restricted() bool { return a == nil || !a.outboundOpen }

// Outbound decides whether the local agent src may call the peer dst. A parsed policy
// without outbound rules allows every call (Rule -1); otherwise the first matching rule
// allows and no match denies with Rule -1.
func (a *Authz) Outbound(src, dst spiffeid.ID) Decision {
	d := Decision{Direction: DirectionOutbound, Rule: -1, Name: defaultRule, Src: src, Dst: dst}
	return a.decideOutbound(d, func(r *outboundRule) bool { return matchAny(r.to, dst) })
}

// decideOutbound decides the outbound request d: a nil policy denies, one without
// outbound rules allows (Rule -1), else the first rule whose from selects d.Src and
// whose to selects the destination (to reports it) allows, and no match denies.
func (a *Authz) decideOutbound(d Decision, to func(*outboundRule) bool) Decision {
	switch {
	case a == nil:
		return d
	case a.outboundOpen:
		d.Allow, d.open = true, true
		return d
	}
	for i := range a.outbound {
		if r := &a.outbound[i]; matchAny(r.from, d.Src) && to(r) {
			d.Allow, d.Rule, d.Name = true, i, r.name
			return d
		}
	}
	return d
}

// Explain renders d and the rule that decided it, for `agentmesh policy explain`.
// d must come from a's Inbound or Outbound.
func (a *Authz) Explain(d Decision) string {
	var b strings.Builder
	verdict := "deny"
	if d.Allow {
		verdict = "allow"
	}
	fmt.Fprintf(&b, "%s: %s\n", verdict, d.Reason())
	if d.Rule < 0 {
		switch {
		case d.Direction == DirectionOutbound && d.Allow:
			b.WriteString("rule: default (the policy has no outbound rules: outbound calls are unrestricted)\n")
		default:
			fmt.Fprintf(&b, "rule: default (no %s rule matched: deny)\n", d.Direction)
		}
		return b.String()
	}
	switch {
	case a != nil && d.Direction == DirectionInbound && d.Rule < len(a.inbound):
		r := a.inbound[d.Rule]
		fmt.Fprintf(&b, "rule: inbound[%d] %q\n", d.Rule, r.name)
		fmt.Fprintf(&b, "  from: %s\n", joinPatterns(r.from))
		ports := "any"
		if len(r.ports) > 0 {
			ps := make([]string, len(r.ports))
			for i, p := range r.ports {
				ps[i] = strconv.Itoa(int(p))
			}
			ports = strings.Join(ps, ", ")
		}
		id := "any"
		if r.id != nil {
			id = r.id.String()
		}
		fmt.Fprintf(&b, "  to:   ports %s; id %s\n", ports, id)
	case a != nil && d.Direction == DirectionOutbound && d.Rule < len(a.outbound):
		r := a.outbound[d.Rule]
		fmt.Fprintf(&b, "rule: outbound[%d] %q\n", d.Rule, r.name)
		fmt.Fprintf(&b, "  from: %s\n", joinPatterns(r.from))
		to := joinPatterns(r.to)
		if len(r.toAddrs) > 0 {
			to = strings.TrimPrefix(to+", "+joinAddrPatterns(r.toAddrs), ", ")
		}
		fmt.Fprintf(&b, "  to:   %s\n", to)
	default:
		fmt.Fprintf(&b, "rule: %s[%d] (not in this policy)\n", d.Direction, d.Rule)
	}
	return b.String()
}

func joinPatterns(ps []pattern) string {
	s := make([]string, len(ps))
	for i, p := range ps {
		s[i] = p.String()
	}
	return strings.Join(s, ", ")
}

func idString(id spiffeid.ID) string {
	if id.IsZero() {
		return "(no identity)"
	}
	return id.String()
}
