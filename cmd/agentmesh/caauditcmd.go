package main

import (
	"encoding/json"
	"io"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/ca"
	"github.com/agentmesh/agentmesh/meshapi"
)

// newCAAuditCmd is `agentmesh ca audit`: the CA as the witness of the proxies' logs.
func newCAAuditCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "audit",
		Short: "The audit logs the CA witnesses",
		Args:  cobra.NoArgs,
	}
	cmd.AddCommand(newCAAuditForgetCmd())
	return cmd
}

func newCAAuditForgetCmd() *cobra.Command {
	var state, reason string
	cmd := &cobra.Command{
		Use:   "forget ORIGIN",
		Short: "Forget a witnessed audit log so that its host may start a new one (a replaced disk); audited",
		Long: `Forget what the CA holds of the audit log ORIGIN (e.g. example.org/host/h1/audit):
the key bound to it, its cosigned checkpoints and its state. The host's next checkpoint
starts a new log under the origin, with any key. Use it only when the host's log or its
audit key is known lost (a replaced disk or token, a reinstalled host): until then a log
that no longer extends the checkpoints the CA cosigned, or one signed by another key, is
refused, which is the point of the witness.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			wl, err := ca.ForgetAuditLog(cmd.Context(), state, ca.ForgetRequest{Origin: args[0], Reason: reason})
			if err != nil {
				return err
			}
			t := newTable(cmd.OutOrStdout())
			t.printf("forgot %s: key %s, latest checkpoint of %d records, last seen %s\n", wl.Origin, wl.Key,
				latestSize(*wl), wl.LastSeen.UTC().Format(time.RFC3339))
			return t.flush()
		},
	}
	addStateFlag(cmd, &state)
	cmd.Flags().StringVar(&reason, "reason", "", "why (recorded in the audit log)")
	return cmd
}

// latestSize is the size of a witnessed log's latest checkpoint, 0 when it does not
// parse (the status shows the state, not a verification).
func latestSize(wl meshapi.WitnessedLog) uint64 {
	text, _, _ := strings.Cut(wl.Latest, "\n\n") // a signed note: text, blank line, signatures
	c, err := audit.ParseCheckpoint(text + "\n")
	if err != nil {
		return 0
	}
	return c.Size
}

// printWitness writes the CA's status of the audit logs it witnesses (its own first):
// origin, state, size of the latest cosigned checkpoint, when last seen.
func printWitness(w io.Writer, logs []meshapi.WitnessedLog, asJSON bool, now time.Time) error {
	if asJSON {
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(logs)
	}
	t := newTable(w)
	t.printf("ORIGIN\tSTATE\tSIZE\tLAST SEEN\tWITNESSES\n")
	for _, wl := range logs {
		seen := "-"
		if !wl.LastSeen.IsZero() {
			seen = now.Sub(wl.LastSeen).Round(time.Second).String() + " ago"
		}
		t.printf("%s\t%s\t%d\t%s\t%d\n", wl.Origin, wl.State, latestSize(wl), seen, len(wl.WitnessKeys))
	}
	if len(logs) == 0 {
		t.printf("(no audit log witnessed yet)\n")
	}
	return t.flush()
}
