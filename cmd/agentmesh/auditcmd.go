package main

import (
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/spf13/cobra"

	"github.com/agentmesh/agentmesh/audit"
)

func newAuditCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "audit", Short: "Work with audit logs"}
	cmd.AddCommand(&cobra.Command{
		Use:   "verify FILE...",
		Short: "Verify the hash chain of audit logs; exit non-zero naming the first bad record",
		Args:  cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			bad := false
			for _, path := range args {
				n, err := verifyFile(path)
				line := fmt.Sprintf("%s: OK (%d records)\n", path, n)
				if err != nil {
					bad = true
					line = fmt.Sprintf("%s: BAD after %d good records: %v\n", path, n, err)
				}
				if _, err := io.WriteString(cmd.OutOrStdout(), line); err != nil {
					return err
				}
			}
			if bad {
				return errors.New("audit verification failed")
			}
			return nil
		},
	})
	return cmd
}

func verifyFile(path string) (int, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer func() { _ = f.Close() }() // read only
	return audit.Verify(f)
}
