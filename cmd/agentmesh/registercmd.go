package main

import (
	"fmt"
	"math"
	"strconv"
	"text/tabwriter"

	"github.com/spf13/cobra"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/ca"
)

// The registration verbs talk to the admin socket of the agentmesh ca on this host: only
// root or the CA's own user may change or read the entries.

func newRegisterCmd() *cobra.Command {
	var (
		state, host string
		uid         int64
		port        uint16
	)
	cmd := &cobra.Command{
		Use:   "register SPIFFE-ID --host HOST-ID --uid UID [--port PORT]",
		Short: "Register an agent identity: the proxy of --host holds it for the processes of --uid",
		Long: `Register SPIFFE-ID (spiffe://TRUST-DOMAIN/agent/NAME) as an agent of the host whose
proxy is HOST-ID (spiffe://TRUST-DOMAIN/host/NAME). That proxy, and no other, obtains and
rotates SVIDs for it, and presents them for connections opened by processes of UID on its
host. --port names where the agent listens on its host, so authorization policy can name it
as a destination.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
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
			e := ca.Entry{ID: id, Host: h, UID: uint32(uid), Port: port}
			if err := ca.RegisterEntry(cmd.Context(), state, e); err != nil {
				return err
			}
			_, err = fmt.Fprintf(cmd.OutOrStdout(), "registered %s\n", describeEntry(e))
			return err
		},
	}
	f := cmd.Flags()
	f.StringVar(&host, "host", "", "SPIFFE ID of the proxy of the agent's host (required)")
	f.Int64Var(&uid, "uid", -1, "uid the agent's processes run as (required)")
	f.Uint16Var(&port, "port", 0, "port the agent listens on, on its host (optional)")
	addStateFlag(cmd, &state)
	_ = cmd.MarkFlagRequired("host")
	_ = cmd.MarkFlagRequired("uid")
	return cmd
}

func newUnregisterCmd() *cobra.Command {
	var state string
	cmd := &cobra.Command{
		Use:   "unregister SPIFFE-ID",
		Short: "Remove an agent's registration: its proxy stops renewing it and closes its connections",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			id, err := argID("SPIFFE-ID", args[0])
			if err != nil {
				return err
			}
			if err := ca.UnregisterEntry(cmd.Context(), state, id); err != nil {
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
		Short: "List the agent registration entries",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			entries, err := ca.ListEntries(cmd.Context(), state)
			if err != nil {
				return err
			}
			w := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
			fmt.Fprintln(w, "ID\tHOST\tUID\tPORT")
			for _, e := range entries {
				port := "-"
				if e.Port != 0 {
					port = strconv.Itoa(int(e.Port))
				}
				fmt.Fprintf(w, "%s\t%s\t%d\t%s\n", e.ID, e.Host, e.UID, port)
			}
			return w.Flush()
		},
	}
	addStateFlag(cmd, &state)
	return cmd
}

func describeEntry(e ca.Entry) string {
	s := fmt.Sprintf("%s on %s for uid %d", e.ID, e.Host, e.UID)
	if e.Port != 0 {
		s += fmt.Sprintf(", port %d", e.Port)
	}
	return s
}

// argID parses a SPIFFE ID given on the command line; what names the argument or flag.
func argID(what, s string) (spiffeid.ID, error) {
	id, err := parseID(s)
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
