package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/agentmesh/agentmesh/rotator"
)

func newStatusCmd() *cobra.Command {
	var adminAddr string
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show a proxy's identities, their serials and when each renews",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
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
			var st struct{ Identities []rotator.Status }
			if err := json.Unmarshal(body, &st); err != nil {
				return fmt.Errorf("decode status: %w", err)
			}
			return printStatus(cmd.OutOrStdout(), st.Identities)
		},
	}
	cmd.Flags().StringVar(&adminAddr, "admin", "127.0.0.1:15020", "the proxy's admin address")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}

func printStatus(w io.Writer, ids []rotator.Status) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "IDENTITY\tSTATE\tSERIAL\tNOT AFTER\tRENEW AT / OVERLAP UNTIL")
	for _, s := range ids {
		if s.Current == nil {
			fmt.Fprintf(tw, "%s\tnone\t-\t-\t%s\n", s.SPIFFEID, s.Error)
			continue
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", s.SPIFFEID, s.Current.State, s.Current.Serial,
			s.Current.NotAfter.Format(time.RFC3339), s.RenewAt.Format(time.RFC3339))
		for _, o := range s.Overlap {
			fmt.Fprintf(tw, "\t%s\t%s\t%s\t%s\n", o.State, o.Serial, o.NotAfter.Format(time.RFC3339), o.OverlapUntil.Format(time.RFC3339))
		}
	}
	return tw.Flush()
}
