package redirect

import (
	"context"
	"fmt"
	"log/slog"
	"math"
	"net/netip"
	"os/exec"
	"slices"
)

// Default ports, as in ARCHITECTURE.md (and Istio's 15001/15006).
const (
	DefaultOutboundPort uint16 = 15001
	DefaultInboundPort  uint16 = 15006
)

// Config says which TCP connections are redirected to the local proxy. The zero value is not
// valid on its own: the proxy's own traffic must be excluded (ExcludeUIDs or ExcludeMark),
// otherwise the proxy's dials would be captured again and loop.
type Config struct {
	// OutboundPort is where captured outbound TCP goes: the proxy's transparent listener.
	// Locally generated connections are redirected to the loopback address, so the proxy
	// listens on 127.0.0.1 (and ::1 with IPv6) at this port. Default 15001.
	OutboundPort uint16

	// InboundPort is where plain inbound TCP to StrictPorts goes in strict mode; the proxy
	// refuses and audits it there. Inbound connections are redirected to the primary address
	// of the interface they arrived on, so the proxy listens on a wildcard address at this
	// port. Default 15006. In strict mode it must differ from OutboundPort; without
	// StrictPorts it is not used.
	InboundPort uint16

	// StrictPorts are local agent ports whose plain inbound TCP (from other hosts, through
	// nat PREROUTING) is redirected to InboundPort, so nothing unauthenticated reaches those
	// agents. Connections from this host to them over loopback are not inbound traffic and
	// are not captured. Empty (default): no inbound capture and no AGENTMESH_INBOUND chain.
	// 1..65535, no duplicates, must not contain OutboundPort or InboundPort.
	StrictPorts []uint16

	// ExcludeUIDs are uids whose connections are never captured: the proxy's own uid, so its
	// dials to peers and passthrough destinations are not redirected back to itself.
	// 0..4294967294, no duplicates. Default none; at least one of ExcludeUIDs and
	// ExcludeMark is required.
	ExcludeUIDs []int

	// ExcludeMark is a firewall mark (SO_MARK) whose connections are never captured; the
	// proxy marks its outbound sockets with it (proxy.Config.Mark). Matched exactly (mask
	// 0xffffffff). 0 (default) = no mark exclusion; 1..4294967295 (1..2147483647 where int
	// is 32 bits).
	ExcludeMark int

	// IncludePorts, when not empty, limits capture to these destination ports. Default: all
	// TCP ports. 1..65535, no duplicates, must not contain OutboundPort (a connection to the
	// proxy's own port would be redirected onto itself).
	IncludePorts []uint16

	// ExcludePorts are destination ports never captured (e.g. 22, so ssh keeps working
	// whatever happens to the proxy). 1..65535, no duplicates, none also in IncludePorts.
	ExcludePorts []uint16

	// ExcludeCIDRs are destinations never captured. 127.0.0.0/8 and ::1/128 are always
	// excluded. Host bits are ignored (10.1.2.3/8 means 10.0.0.0/8); IPv6 prefixes need
	// IPv6; IPv4-mapped IPv6 prefixes are refused (write the IPv4 form).
	ExcludeCIDRs []netip.Prefix

	// IncludeCIDRs, when not empty, limits capture to these destinations. Default: all.
	// Same rules as ExcludeCIDRs; with IPv6 set it must hold at least one prefix of each
	// family, since an empty list for one family would mean "capture everything" there.
	IncludeCIDRs []netip.Prefix

	// IPv6 also programs ip6tables with the same rules. False: only iptables (and Install
	// removes agentmesh chains left in ip6tables by an earlier install, if it can read
	// ip6tables at all), so IPv6 connections bypass the proxy. The zero value is false
	// for this package's callers that manage families themselves; `agentmesh redirect
	// install` defaults it to HostHasIPv6().
	IPv6 bool

	// Command builds the command that runs one iptables tool (iptables-save,
	// iptables-restore, ip6tables-save, ip6tables-restore). Install and Remove set its Stdin,
	// Stdout and Stderr. Default exec.CommandContext. Set it to program another network
	// namespace, e.g. by prefixing "ip netns exec NAME" or "nsenter --net=PATH"; see the
	// package example.
	Command func(ctx context.Context, name string, arg ...string) *exec.Cmd

	// Logger receives one Info line per family changed and Debug lines otherwise. Default:
	// discard.
	Logger *slog.Logger
}

func (c Config) withDefaults() Config {
	if c.OutboundPort == 0 {
		c.OutboundPort = DefaultOutboundPort
	}
	if c.InboundPort == 0 {
		c.InboundPort = DefaultInboundPort
	}
	if c.Command == nil {
		c.Command = exec.CommandContext
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	return c
}

// validate checks a defaulted Config. Each failure names the field so an operator can find
// it in a config file.
func (c Config) validate() error {
	if len(c.StrictPorts) > 0 && c.InboundPort == c.OutboundPort {
		return &ConfigError{"InboundPort", fmt.Sprintf("%d is also OutboundPort", c.InboundPort)}
	}
	if err := checkPorts("StrictPorts", c.StrictPorts); err != nil {
		return err
	}
	for i, p := range c.StrictPorts {
		if p == c.OutboundPort || p == c.InboundPort {
			return &ConfigError{fmt.Sprintf("StrictPorts[%d]", i),
				fmt.Sprintf("%d is one of the proxy's own ports (OutboundPort %d, InboundPort %d)",
					p, c.OutboundPort, c.InboundPort)}
		}
	}
	if err := checkPorts("IncludePorts", c.IncludePorts); err != nil {
		return err
	}
	if i := slices.Index(c.IncludePorts, c.OutboundPort); i >= 0 {
		return &ConfigError{fmt.Sprintf("IncludePorts[%d]", i),
			fmt.Sprintf("%d is OutboundPort: connections to it would be redirected onto the proxy's own listener", c.OutboundPort)}
	}
	if err := checkPorts("ExcludePorts", c.ExcludePorts); err != nil {
		return err
	}
	for i, p := range c.ExcludePorts {
		if slices.Contains(c.IncludePorts, p) {
			return &ConfigError{fmt.Sprintf("ExcludePorts[%d]", i), fmt.Sprintf("%d is also in IncludePorts", p)}
		}
	}
	for i, uid := range c.ExcludeUIDs {
		field := fmt.Sprintf("ExcludeUIDs[%d]", i)
		if uid < 0 || int64(uid) >= math.MaxUint32 {
			return &ConfigError{field, fmt.Sprintf("uid %d out of range 0..%d", uid, uint32(math.MaxUint32-1))}
		}
		if slices.Contains(c.ExcludeUIDs[:i], uid) {
			return &ConfigError{field, fmt.Sprintf("duplicate uid %d", uid)}
		}
	}
	if c.ExcludeMark < 0 || int64(c.ExcludeMark) > math.MaxUint32 {
		return &ConfigError{"ExcludeMark", fmt.Sprintf("%d out of range 0..%d", c.ExcludeMark, uint32(math.MaxUint32))}
	}
	if len(c.ExcludeUIDs) == 0 && c.ExcludeMark == 0 {
		return &ConfigError{"ExcludeUIDs", "neither ExcludeUIDs nor ExcludeMark is set: the proxy's own connections would be captured and loop back to it"}
	}
	if err := checkPrefixes("ExcludeCIDRs", c.ExcludeCIDRs, c.IPv6); err != nil {
		return err
	}
	if err := checkPrefixes("IncludeCIDRs", c.IncludeCIDRs, c.IPv6); err != nil {
		return err
	}
	if len(c.IncludeCIDRs) > 0 {
		var v4, v6 bool
		for _, p := range c.IncludeCIDRs {
			v4 = v4 || p.Addr().Is4()
			v6 = v6 || p.Addr().Is6()
		}
		if !v4 {
			return &ConfigError{"IncludeCIDRs", "no IPv4 prefix: IPv4 capture would be unrestricted; list the IPv4 destinations too"}
		}
		if c.IPv6 && !v6 {
			return &ConfigError{"IncludeCIDRs", "no IPv6 prefix while IPv6 is set: IPv6 capture would be unrestricted; list IPv6 destinations or unset IPv6"}
		}
	}
	return nil
}

func checkPorts(field string, ports []uint16) error {
	for i, p := range ports {
		if p == 0 {
			return &ConfigError{fmt.Sprintf("%s[%d]", field, i), "port 0 is not a valid port"}
		}
		if slices.Contains(ports[:i], p) {
			return &ConfigError{fmt.Sprintf("%s[%d]", field, i), fmt.Sprintf("duplicate port %d", p)}
		}
	}
	return nil
}

func checkPrefixes(field string, prefixes []netip.Prefix, ipv6 bool) error {
	for i, p := range prefixes {
		name := fmt.Sprintf("%s[%d]", field, i)
		switch {
		case !p.IsValid():
			return &ConfigError{name, fmt.Sprintf("invalid prefix %q", p.String())}
		case p.Addr().Is4In6():
			return &ConfigError{name, fmt.Sprintf("%s is an IPv4-mapped IPv6 prefix; write it as IPv4", p)}
		case p.Addr().Is6() && !ipv6:
			return &ConfigError{name, fmt.Sprintf("%s is IPv6 but IPv6 is not set", p)}
		}
		for j, q := range prefixes[:i] {
			if q.IsValid() && q.Masked() == p.Masked() {
				return &ConfigError{name, fmt.Sprintf("%s duplicates %s[%d] (%s)", p, field, j, q)}
			}
		}
	}
	return nil
}
