// Command agentmesh runs the agentmesh CA, the per-host proxy and the operator verbs.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := newRoot().ExecuteContext(ctx)
	stop()
	if err != nil {
		var ee exitError
		if errors.As(err, &ee) {
			// A bare exit status: the command has said all there is to say.
			if err != error(ee) { //nolint:errorlint // identity, not a match: only a wrapped status has words to print
				fmt.Fprintln(os.Stderr, "agentmesh:", err)
			}
			os.Exit(int(ee))
		}
		fmt.Fprintln(os.Stderr, "agentmesh:", err)
		os.Exit(1)
	}
}

// exitError carries a specific exit code out of a command.
type exitError int

func (e exitError) Error() string { return fmt.Sprintf("exit status %d", int(e)) }

func newRoot() *cobra.Command {
	root := &cobra.Command{
		Use:           "agentmesh",
		Short:         "Mutual TLS between agents with short-lived SPIFFE identities that rotate themselves",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.AddCommand(newCACmd(), newTokenCmd(), newProxyCmd(), newAuditCmd(), newStatusCmd(), newRedirectCmd(), newRevokeCmd(), newReinstateCmd(), newRotateCmd(),
		newRegisterCmd(), newUnregisterCmd(), newListCmd(), newPolicyCmd())
	return root
}
