package main

import (
	"fmt"
	"io"
	"net/netip"
	"strings"

	"github.com/spf13/cobra"

	"github.com/agentmesh/agentmesh/node"
	"github.com/agentmesh/agentmesh/policy"
)

func newPolicyCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "policy",
		Short: "Check an authorization policy file, or explain its decision for a request",
	}
	check := &cobra.Command{
		Use:   "check FILE",
		Short: "Validate a policy file offline; errors name the file, line and field",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			a, err := node.LoadPolicy(args[0])
			if err != nil {
				return err
			}
			_, err = fmt.Fprintf(cmd.OutOrStdout(), "%s: ok (%d inbound, %d outbound rules)\n",
				args[0], a.InboundRules(), a.OutboundRules())
			return err
		},
	}
	var (
		file string
		port uint16
	)
	explain := &cobra.Command{
		Use:   "explain SRC DST --policy FILE [--port PORT]",
		Short: "Print the decision and the deciding rule for SRC calling DST",
		Long: `Print what the policy in FILE decides when SRC calls DST: outbound (may the local agent
SRC call DST), and inbound (may the peer SRC reach the local agent DST; with --port, at that
port), each with the rule that decided. A DST of the form passthrough:ADDRESS explains the
passthrough decision only (may SRC reach ADDRESS outside the mesh). The exit status is 0
when both allow, 3 when either denies.`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			return explainPolicy(cmd.OutOrStdout(), file, port, args[0], args[1])

		},
	}
	explain.Flags().StringVar(&file, "policy", "", "policy file (required)")
	explain.Flags().Uint16Var(&port, "port", 0, "the destination port (inbound rules that name ports match only with it)")
	_ = explain.MarkFlagRequired("policy")
	cmd.AddCommand(check, explain)
	return cmd
}

// explainPolicy prints the decisions of the policy in file for rawSrc calling rawDst
// and returns exitError(3) when one of them denies.
func explainPolicy(w io.Writer, file string, port uint16, rawSrc, rawDst string) error {
	src, err := argID("SRC", rawSrc)
	if err != nil {
		return err
	}
	a, err := node.LoadPolicy(file)
	if err != nil {
		return err
	}
	var ds []policy.Decision
	if raw, ok := strings.CutPrefix(rawDst, policy.PassthroughScheme); ok {
		addr, err := netip.ParseAddr(raw)
		if err != nil {
			return fmt.Errorf("DST: %w", err)
		}
		ds = []policy.Decision{a.Passthrough(src, addr)}
	} else {
		dst, err := argID("DST", rawDst)
		if err != nil {
			return err
		}
		ds = []policy.Decision{a.Outbound(src, dst), a.Inbound(src, port, dst)}
	}
	for _, d := range ds {
		if _, err := fmt.Fprint(w, a.Explain(d)); err != nil {
			return err
		}
	}
	for _, d := range ds {
		if !d.Allow {
			return exitError(3)
		}
	}
	return nil
}
