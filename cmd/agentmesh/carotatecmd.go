package main

import (
	"encoding/json"
	"fmt"
	"io"
	"time"

	"github.com/spf13/cobra"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/ca"
	"github.com/agentmesh/agentmesh/meshapi"
)

// newCARotateCmd is `agentmesh ca rotate intermediate|root`.
func newCARotateCmd() *cobra.Command {
	var (
		state, reason string
		exclude       []string
		renewWindow   time.Duration
	)
	cmd := &cobra.Command{
		Use:   "rotate intermediate|root",
		Short: "Rotate the CA's intermediate, or its root, gated on every proxy's acknowledgement",
		Long: `Start a rotation of the CA's trust anchors through the admin socket of the CA running
with --state: the new key is generated in the HSM at once (prepare), then the rotation moves
through distribute, activate, retire and destroy, each phase entered only once every proxy
has acknowledged the one before. Follow it with 'agentmesh ca rotation status'.`,
		Args:      cobra.ExactArgs(1),
		ValidArgs: []string{string(meshapi.RotateIntermediate), string(meshapi.RotateRoot)},
		RunE: func(cmd *cobra.Command, args []string) error {
			req := meshapi.RotateRequest{Kind: meshapi.AnchorKind(args[0]), Reason: reason,
				RenewWindowMS: renewWindow.Milliseconds()}
			for _, e := range exclude {
				id, err := argID("--exclude", e)
				if err != nil {
					return err
				}
				req.Exclude = append(req.Exclude, id)
			}
			st, err := ca.StartRotation(cmd.Context(), state, req)
			if err != nil {
				return err
			}
			return printRotation(cmd.OutOrStdout(), st, time.Now())
		},
	}
	addStateFlag(cmd, &state)
	f := cmd.Flags()
	f.StringArrayVar(&exclude, "exclude", nil, "host ID whose acknowledgements are not awaited (repeatable; audited)")
	f.DurationVar(&renewWindow, "renew-window", 0, "window proxies spread their early renewals over (default: the CA's)")
	f.StringVar(&reason, "reason", "", "why (recorded in the audit log)")
	return cmd
}

// newCARotationCmd is `agentmesh ca rotation status|abort|exclude`.
func newCARotationCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "rotation",
		Short: "Follow, abort or unblock the rotation of the CA's trust anchors",
		Args:  cobra.NoArgs,
	}
	cmd.AddCommand(newCARotationStatusCmd(), newCARotationAbortCmd(), newCARotationExcludeCmd())
	return cmd
}

func newCARotationStatusCmd() *cobra.Command {
	var (
		state  string
		asJSON bool
	)
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show the running (or last) rotation: phase, time in it, proxies not acknowledged",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			st, err := ca.RotationStatus(cmd.Context(), state)
			if err != nil {
				return err
			}
			if asJSON {
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				return enc.Encode(st)
			}
			return printRotation(cmd.OutOrStdout(), st, time.Now())
		},
	}
	addStateFlag(cmd, &state)
	cmd.Flags().BoolVar(&asJSON, "json", false, "print the status as JSON")
	return cmd
}

func newCARotationAbortCmd() *cobra.Command {
	return rotationVerb("abort", "Abort the running rotation (before retire): back to the old anchor, acknowledged again",
		cobra.NoArgs, func(cmd *cobra.Command, _ []string, state, reason string) (*meshapi.RotationStatus, error) {
			return ca.AbortRotation(cmd.Context(), state, reason)
		})
}

func newCARotationExcludeCmd() *cobra.Command {
	return rotationVerb("exclude HOST-ID", "Stop awaiting a proxy's acknowledgements in the running rotation (audited)",
		cobra.ExactArgs(1), func(cmd *cobra.Command, args []string, state, reason string) (*meshapi.RotationStatus, error) {
			id, err := argID("HOST-ID", args[0])
			if err != nil {
				return nil, err
			}
			return ca.ExcludeFromRotation(cmd.Context(), state, meshapi.RotationExclude{Host: id, Reason: reason})
		})
}

// rotationVerb is a verb of `agentmesh ca rotation` that changes the running rotation
// with --state and --reason, and prints its status.
func rotationVerb(use, short string, args cobra.PositionalArgs,
	call func(cmd *cobra.Command, args []string, state, reason string) (*meshapi.RotationStatus, error),
) *cobra.Command {
	var state, reason string
	cmd := &cobra.Command{
		Use:   use,
		Short: short,
		Args:  args,
		RunE: func(cmd *cobra.Command, args []string) error {
			st, err := call(cmd, args, state, reason)
			if err != nil {
				return err
			}
			return printRotation(cmd.OutOrStdout(), st, time.Now())
		},
	}
	addStateFlag(cmd, &state)
	cmd.Flags().StringVar(&reason, "reason", "", "why (recorded in the audit log)")
	return cmd
}

// printRotation writes the human status: the phase and the time in it, what it waits
// for, every proxy that has not acknowledged with its last heartbeat, the anchors.
func printRotation(w io.Writer, st *meshapi.RotationStatus, now time.Time) error {
	t := newTable(w)
	if st.ID == 0 {
		t.printf("no rotation of the trust anchors\n")
	} else {
		t.printf("rotation %d (%s): phase %s for %v\n", st.ID, st.Kind, st.Phase,
			(time.Duration(st.PhaseMS) * time.Millisecond).Round(time.Millisecond))
		if st.Waiting != "" {
			t.printf("waiting for %s\n", st.Waiting)
		}
		printMissing(t, st, now)
	}
	for _, a := range st.Anchors {
		t.printf("anchor\t%s\t%.16s\texpires %s\n", a.Subject, a.Fingerprint, a.NotAfter.UTC().Format(time.RFC3339))
	}
	return t.flush()
}

// printMissing lists the members that have not acknowledged the current phase.
func printMissing(t *table, st *meshapi.RotationStatus, now time.Time) {
	members := make(map[spiffeid.ID]meshapi.RotationMember, len(st.Members))
	for _, m := range st.Members {
		members[m.ID] = m
	}
	for _, id := range st.Missing {
		m := members[id]
		hb := "never"
		if !m.LastHeartbeat.IsZero() {
			hb = fmt.Sprintf("%s (%v ago)", m.LastHeartbeat.UTC().Format(time.RFC3339),
				now.Sub(m.LastHeartbeat).Round(time.Second))
		}
		live := "down"
		if m.Live {
			live = "live"
		}
		t.printf("missing\t%s\t%s\tlast heartbeat %s\n", id, live, hb)
	}
}
