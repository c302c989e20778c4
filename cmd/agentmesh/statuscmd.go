package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"time"

	"github.com/spf13/cobra"

	"github.com/agentmesh/agentmesh/ca"
	"github.com/agentmesh/agentmesh/node"
	"github.com/agentmesh/agentmesh/rotator"
)

func newStatusCmd() *cobra.Command {
	var adminAddr, caState string
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show a proxy's identities, their serials and when each renews; with --state, the CA's witnessed audit logs",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if caState != "" {
				logs, err := ca.WitnessStatus(cmd.Context(), caState)
				if err != nil {
					return err
				}
				return printWitness(cmd.OutOrStdout(), logs, asJSON, time.Now())
			}
			req, err := http.NewRequestWithContext(cmd.Context(), http.MethodGet, "http://"+adminAddr+"/status", nil)
			if err != nil {
				return err
			}
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				return fmt.Errorf("ask proxy admin %s: %w", adminAddr, err)
			}
			defer resp.Body.Close()
			body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
			if err != nil {
				return err
			}
			if asJSON {
				_, err = cmd.OutOrStdout().Write(body)
				return err
			}
			var st node.StatusDocument
			if err := json.Unmarshal(body, &st); err != nil {
				return fmt.Errorf("decode status: %w", err)
			}
			return printStatus(cmd.OutOrStdout(), st)
		},
	}
	cmd.Flags().StringVar(&adminAddr, "admin", "127.0.0.1:15020", "the proxy's admin address")
	cmd.Flags().StringVar(&caState, "state", "", "state directory of the agentmesh ca running on this host: show the audit logs it witnesses and their state (ok, stale, inconsistent)")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}

func printStatus(w io.Writer, st node.StatusDocument) error {
	tw := newTable(w)
	tw.printf("proxy  ready=%t", st.Ready)
	if st.NotReady != "" {
		tw.printf("  (%s)", st.NotReady)
	}
	tw.printf("\n")
	for _, id := range st.Identities {
		tw.printf("%s  ready=%t", id.SPIFFEID, id.Ready)
		if !id.RenewAt.IsZero() {
			tw.printf("  renews %s", id.RenewAt.Format(time.RFC3339))
		}
		if id.Error != "" {
			tw.printf("  (%s)", id.Error)
		}
		tw.printf("\n")
		tw.printf("  VERSION\tSTATE\tCAUSE\tSERIAL\tNOT BEFORE\tNOT AFTER\tHANDSHAKES\tUNTIL\n")
		var keys []rotator.CredentialStatus
		if id.Current != nil {
			keys = append(keys, *id.Current)
		}
		keys = append(append(keys, id.Overlap...), id.Retired...)
		for _, k := range keys {
			until := "-"
			switch {
			case !k.DrainBy.IsZero():
				until = "drained by " + k.DrainBy.Format(time.RFC3339)
			case !k.OverlapUntil.IsZero():
				until = "overlap until " + k.OverlapUntil.Format(time.RFC3339)
			}
			tw.printf("  %d\t%s\t%s\t%s\t%s\t%s\t%d\t%s\n", k.Version, k.State, k.Cause, k.Serial,
				k.NotBefore.Format(time.RFC3339), k.NotAfter.Format(time.RFC3339), k.Handshakes, until)
		}
	}
	tw.printf("session-ticket keys\n")
	tw.printf("  VERSION\tSTATE\tCREATED\tENCRYPTS UNTIL\tDECRYPTS UNTIL\n")
	for _, k := range st.TicketKeys {
		tw.printf("  %d\t%s\t%s\t%s\t%s\n", k.Version, k.State, k.Created.Format(time.RFC3339),
			k.EncryptUntil.Format(time.RFC3339), k.DecryptUntil.Format(time.RFC3339))
	}
	return tw.flush()
}
