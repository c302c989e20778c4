package main

import (
	"fmt"
	"net/netip"
	"os"

	"github.com/spf13/cobra"

	"github.com/agentmesh/agentmesh/redirect"
)

func newRedirectCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "redirect",
		Short: "Install or remove the iptables rules that send agents' TCP to the local proxy",
	}
	var removeIPv6 bool
	remove := &cobra.Command{
		Use:   "remove",
		Short: "Remove exactly the rules install added; idempotent",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return redirect.Remove(cmd.Context(), redirect.Config{IPv6: removeIPv6, Logger: newLogger(os.Stderr, 0, "text")})
		},
	}
	remove.Flags().BoolVar(&removeIPv6, "ipv6", false, "also remove from ip6tables (an error if ip6tables cannot be read)")
	cmd.AddCommand(newRedirectInstallCmd(), remove)
	return cmd
}

// installFlags are the flags of `redirect install` that need checking before they
// become a redirect.Config.
type installFlags struct {
	outbound, inbound  uint
	strict, incl, excl []uint
	uids               []int
	mark               uint32
	inclCIDR, exclCIDR []string
	dryRun             bool
}

func newRedirectInstallCmd() *cobra.Command {
	var (
		cfg redirect.Config
		fl  installFlags
	)
	install := &cobra.Command{
		Use:   "install",
		Short: "Install (or update in place) the capture rules; idempotent",
		Long: `Install the capture rules in their own nat chains (AGENTMESH_OUTPUT, AGENTMESH_INBOUND),
atomically with iptables-restore --noflush, leaving every other rule untouched. Running it
again with the same flags changes nothing; with other flags it switches over atomically.
IPv6 is captured too (ip6tables) when the host has IPv6 and ip6tables is installed, unless
--ipv6=false. The proxy's own traffic must be excluded with --exclude-uid or --exclude-mark.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := fl.apply(&cfg); err != nil {
				return err
			}
			// IPv6 is captured wherever the host has it: left out, agents' IPv6
			// connections would bypass the proxy unseen.
			if !cmd.Flags().Changed("ipv6") {
				cfg.IPv6 = redirect.HostHasIPv6()
			}
			if fl.dryRun {
				plan, err := redirect.Rules(cfg)
				if err != nil {
					return err
				}
				_, err = fmt.Fprint(cmd.OutOrStdout(), plan.String())
				return err
			}
			cfg.Logger = newLogger(os.Stderr, 0, "text")
			return redirect.Install(cmd.Context(), cfg)
		},
	}
	f := install.Flags()
	f.UintVar(&fl.outbound, "outbound-port", uint(redirect.DefaultOutboundPort), "the proxy's transparent outbound port")
	f.UintVar(&fl.inbound, "inbound-port", uint(redirect.DefaultInboundPort), "the proxy's strict-mode inbound port")
	f.UintSliceVar(&fl.strict, "strict-port", nil, "agent port whose plain inbound traffic is captured (strict mode); repeatable")
	f.UintSliceVar(&fl.incl, "include-port", nil, "capture only these destination ports (default all)")
	f.UintSliceVar(&fl.excl, "exclude-port", nil, "never capture these destination ports")
	f.StringSliceVar(&fl.inclCIDR, "include-cidr", nil, "capture only these destinations (default all)")
	f.StringSliceVar(&fl.exclCIDR, "exclude-cidr", nil, "never capture these destinations (loopback always excluded)")
	f.IntSliceVar(&fl.uids, "exclude-uid", nil, "uid whose traffic is never captured (the proxy's)")
	f.Uint32Var(&fl.mark, "exclude-mark", 0, "fwmark whose traffic is never captured (the proxy's mark setting)")
	f.BoolVar(&cfg.IPv6, "ipv6", false, "also program ip6tables (default: true when the host has IPv6 and ip6tables is installed)")
	f.BoolVar(&fl.dryRun, "dry-run", false, "print the rules instead of installing them")
	return install
}

// apply checks the ports and prefixes of fl and sets them in cfg; the first bad value
// is the error.
func (fl *installFlags) apply(cfg *redirect.Config) error {
	var err error
	for _, p := range []struct {
		flag string
		in   uint
		out  *uint16
	}{{"--outbound-port", fl.outbound, &cfg.OutboundPort}, {"--inbound-port", fl.inbound, &cfg.InboundPort}} {
		if *p.out, err = port16(p.flag, p.in); err != nil {
			return err
		}
	}
	for _, p := range []struct {
		flag string
		in   []uint
		out  *[]uint16
	}{{"--strict-port", fl.strict, &cfg.StrictPorts}, {"--include-port", fl.incl, &cfg.IncludePorts}, {"--exclude-port", fl.excl, &cfg.ExcludePorts}} {
		for _, v := range p.in {
			n, err := port16(p.flag, v)
			if err != nil {
				return err
			}
			*p.out = append(*p.out, n)
		}
	}
	if cfg.IncludeCIDRs, err = prefixes("--include-cidr", fl.inclCIDR); err != nil {
		return err
	}
	if cfg.ExcludeCIDRs, err = prefixes("--exclude-cidr", fl.exclCIDR); err != nil {
		return err
	}
	cfg.ExcludeUIDs, cfg.ExcludeMark = fl.uids, int(fl.mark)
	return nil
}

func port16(flag string, v uint) (uint16, error) {
	if v < 1 || v > 65535 {
		return 0, fmt.Errorf("%s: port %d out of range 1-65535", flag, v)
	}
	return uint16(v), nil
}

func prefixes(flag string, in []string) ([]netip.Prefix, error) {
	out := make([]netip.Prefix, 0, len(in))
	for _, s := range in {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", flag, err)
		}
		out = append(out, p)
	}
	return out, nil
}
