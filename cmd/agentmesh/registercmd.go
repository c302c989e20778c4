package main

import (
	"errors"
	"fmt"
	"math"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"github.com/agentmesh/agentmesh/meshapi"

	"github.com/spf13/cobra"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/ca"
	"github.com/agentmesh/agentmesh/node"
)

// The registration verbs talk to the admin socket of the agentmesh ca on this host: only
// root or the CA's own user may change or read the entries.

func newRegisterCmd() *cobra.Command {
	var (
		state, host string
		uid         int64
		port        uint16
		addrs       []string
	)
	cmd := &cobra.Command{
		Use: "register {SPIFFE-ID --host HOST-ID --uid UID [--port PORT] | HOST-ID --addr CIDR [--addr CIDR]...}",
		Short: "Register an agent identity (the proxy of --host holds it for the processes of --uid), " +
			"or the addresses a host's proxy may claim",
		Long: `Register SPIFFE-ID (spiffe://TRUST-DOMAIN/agent/NAME) as an agent of the host whose
proxy is HOST-ID (spiffe://TRUST-DOMAIN/host/NAME). That proxy, and no other, obtains and
rotates SVIDs for it, and presents them for connections opened by processes of UID on its
host. --port names where the agent listens on its host, so authorization policy can name it
as a destination.

With --addr, register the addresses the proxy of HOST-ID (given as the argument or as
--host) may advertise in the mesh directory: each --addr is a CIDR prefix (10.0.0.0/24) or
one address (10.0.0.1). They replace the host's earlier claim, set by an operator or learnt
at its first registration; a prefix overlapping another host's claim is refused.`,
		Args: cobra.RangeArgs(0, 1),
		RunE: func(cmd *cobra.Command, args []string) error {
			agentFlags := cmd.Flags().Changed("uid") || cmd.Flags().Changed("port")
			if len(addrs) > 0 {
				return registerHost(cmd, state, args, host, addrs, agentFlags)
			}
			return registerAgent(cmd, state, args, host, uid, port)
		},
	}
	f := cmd.Flags()
	f.StringVar(&host, "host", "", "SPIFFE ID of the proxy of the agent's host (required for an agent)")
	f.Int64Var(&uid, "uid", -1, "uid the agent's processes run as (required for an agent)")
	f.Uint16Var(&port, "port", 0, "port the agent listens on, on its host (optional)")
	f.StringArrayVar(&addrs, "addr", nil, "an address or CIDR prefix the host's proxy may claim (repeatable)")
	addStateFlag(cmd, &state)
	return cmd
}

// hostClaimArgs reads `register --addr`: the host is the argument or --host (both
// only if equal), and each --addr a prefix or one address. agentFlags says whether
// --uid or --port was given, which belong to agents.
func hostClaimArgs(args []string, host string, addrs []string, agentFlags bool) (spiffeid.ID, []netip.Prefix, error) {
	var raw string
	switch {
	case agentFlags:
		return spiffeid.ID{}, nil, errors.New("--addr registers a host's addresses: --uid and --port are for agents")
	case len(args) == 1 && host != "" && args[0] != host:
		return spiffeid.ID{}, nil, fmt.Errorf("--addr: the host is %s or %s, not both", args[0], host)
	case len(args) == 1:
		raw = args[0]
	case host != "":
		raw = host
	default:
		return spiffeid.ID{}, nil, errors.New("--addr needs the host's SPIFFE ID, as the argument or --host")
	}
	h, err := argID("HOST-ID", raw)
	if err != nil {
		return spiffeid.ID{}, nil, err
	}
	prefixes, err := ca.ParseHostClaim(h, addrs)
	if err != nil {
		return spiffeid.ID{}, nil, fmt.Errorf("--addr: %w", err)
	}
	return h, prefixes, nil
}

// registerHost runs `register --addr`: it sets the addresses a host's proxy may claim.
func registerHost(cmd *cobra.Command, state string, args []string, host string, addrs []string, agentFlags bool) error {
	h, prefixes, err := hostClaimArgs(args, host, addrs, agentFlags)
	if err != nil {
		return err
	}
	c, err := ca.RegisterHost(cmd.Context(), state, h, prefixes)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(cmd.OutOrStdout(), "registered %s at %s\n", c.Host, prefixList(c.Prefixes))
	return err
}

// registerAgent runs `register SPIFFE-ID --host HOST-ID --uid UID [--port PORT]`.
func registerAgent(cmd *cobra.Command, state string, args []string, host string, uid int64, port uint16) error {
	switch {
	case len(args) != 1:
		return errors.New("SPIFFE-ID is required (or --addr to register a host's addresses)")
	case host == "":
		return errors.New("--host is required")
	case !cmd.Flags().Changed("uid"):
		return errors.New("--uid is required")
	}
	id, err := argID("SPIFFE-ID", args[0])
	if err != nil {
		return err
	}
	h, err := argID("--host", host)
	if err != nil {
		return err
	}
	if uid < 0 || uid > math.MaxUint32 {
		return fmt.Errorf("--uid %d is outside 0..%d", uid, uint32(math.MaxUint32))
	}
	e := meshapi.Entry{ID: id, Host: h, UID: uint32(uid), Port: port}
	if err := ca.RegisterEntry(cmd.Context(), state, e); err != nil {
		return err
	}
	_, err = fmt.Fprintf(cmd.OutOrStdout(), "registered %s\n", describeEntry(e))
	return err
}

func prefixList(ps []netip.Prefix) string {
	s := make([]string, len(ps))
	for i, p := range ps {
		s[i] = p.String()
	}
	return strings.Join(s, ",")
}

func newUnregisterCmd() *cobra.Command {
	var state string
	cmd := &cobra.Command{
		Use: "unregister SPIFFE-ID",
		Short: "Remove an agent's registration (its proxy stops renewing it and closes its connections), " +
			"or a host's address claim (its next registration learns one again)",
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			id, err := argID("SPIFFE-ID", args[0])
			if err != nil {
				return err
			}
			if meshapi.IsHostID(id) {
				err = ca.UnregisterHost(cmd.Context(), state, id)
			} else {
				err = ca.UnregisterEntry(cmd.Context(), state, id)
			}
			if err != nil {
				return err
			}
			_, err = fmt.Fprintf(cmd.OutOrStdout(), "unregistered %s\n", id)
			return err
		},
	}
	addStateFlag(cmd, &state)
	return cmd
}

func newListCmd() *cobra.Command {
	var state string
	cmd := &cobra.Command{
		Use:   "list",
		Short: "List the agent registration entries and the hosts' address claims",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			entries, err := ca.ListEntries(cmd.Context(), state)
			if err != nil {
				return err
			}
			hosts, err := ca.ListHosts(cmd.Context(), state)
			if err != nil {
				return err
			}
			w := newTable(cmd.OutOrStdout())
			w.printf("ID\tHOST\tUID\tPORT\n")
			for _, e := range entries {
				port := "-"
				if e.Port != 0 {
					port = strconv.Itoa(int(e.Port))
				}
				w.printf("%s\t%s\t%d\t%s\n", e.ID, e.Host, e.UID, port)
			}
			w.printf("\nHOST\tADDRESSES\tSOURCE\tSINCE\n")
			for _, h := range hosts {
				source := string(h.Source)
				if h.From.IsValid() {
					source += " from " + h.From.String()
				}
				w.printf("%s\t%s\t%s\t%s\n", h.Host, prefixList(h.Prefixes), source, h.At.Format(time.RFC3339))
			}
			return w.flush()
		},
	}
	addStateFlag(cmd, &state)
	return cmd
}

func describeEntry(e meshapi.Entry) string {
	s := fmt.Sprintf("%s on %s for uid %d", e.ID, e.Host, e.UID)
	if e.Port != 0 {
		s += fmt.Sprintf(", port %d", e.Port)
	}
	return s
}

// argID parses a SPIFFE ID given on the command line; what names the argument or flag.
func argID(what, s string) (spiffeid.ID, error) {
	id, err := node.ParseID(s)
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("%s: %w", what, err)
	}
	return id, nil
}

// addStateFlag adds the required --state flag of the verbs that use the CA's admin socket.
func addStateFlag(cmd *cobra.Command, state *string) {
	cmd.Flags().StringVar(state, "state", "", "state directory of the agentmesh ca running on this host")
	_ = cmd.MarkFlagRequired("state")
}
