package main

import (
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/agentmesh/agentmesh/meshapi"
	"github.com/agentmesh/agentmesh/meshclient"

	"github.com/spf13/cobra"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/ca"
)

func newReinstateCmd() *cobra.Command {
	var (
		reason string
		adm    adminFlags
	)
	cmd := &cobra.Command{
		Use:   "reinstate SPIFFE-ID --reason R",
		Short: "Let a revoked identity enrol again; its certificates from before the revocation stay refused",
		Long: `Reinstate SPIFFE-ID, revoked with "agentmesh revoke": the CA issues tokens, registration
entries and certificates for it again, so it enrols with a new token. Every certificate of it
issued before the revocation stays refused: the CA never renews or registers one, and the
deny-list keeps denying them on every proxy until they have all expired.

Only an administrator may reinstate, through the same paths as revoke: root or the CA's user
on the CA host (the admin socket in --state), or the holder of an admin SVID
(spiffe://TRUST-DOMAIN/admin/NAME) given with --ca, --root, --cert and --key. Audited on the CA.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			id, err := spiffeid.FromString(args[0])
			if err != nil {
				return fmt.Errorf("invalid SPIFFE ID %q: %w", args[0], err)
			}
			if strings.TrimSpace(reason) == "" {
				return errors.New("--reason is required")
			}
			req := meshapi.ReinstateRequest{SPIFFEID: id.String(), Reason: reason}
			res, err := adminCall(cmd.Context(), &adm, req, ca.RequestReinstate, meshclient.ReinstateRemote)
			if err != nil {
				return err
			}
			_, err = fmt.Fprintf(cmd.OutOrStdout(), "reinstated: %s; certificates with NotBefore before %s stay refused\n",
				res.SPIFFEID, res.Cutoff.Format(time.RFC3339Nano))
			return err
		},
	}
	f := cmd.Flags()
	f.StringVar(&reason, "reason", "", "why (recorded in the audit log)")
	adm.register(f)
	return cmd
}
