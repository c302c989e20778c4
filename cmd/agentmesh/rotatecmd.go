package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"path/filepath"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/ca"
	"github.com/agentmesh/agentmesh/internal/unixhttp"
	"github.com/agentmesh/agentmesh/node"
	"github.com/agentmesh/agentmesh/rotator"
)

func newRotateCmd() *cobra.Command {
	var (
		state, reason    string
		compromised, all bool
	)
	cmd := &cobra.Command{
		Use:   "rotate [SPIFFE-ID]",
		Short: "Rotate an identity now: on this proxy, or on every proxy of the mesh with --all",
		Long: `Rotate now, outside the schedule. On a proxy host, --state is the proxy's state
directory and SPIFFE-ID (default: the proxy's own) the identity to rotate; the old key goes to
overlap as in a scheduled rotation. With --compromised the old key is treated as compromised
instead: it stops being presented at once, its serial is revoked at the CA, its connections are
closed and every session-ticket key is replaced.

On the CA host, --all with the CA's --state asks every proxy of the mesh to rotate (delivered
through the directory's watch within a second).`,
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if strings.TrimSpace(reason) == "" {
				return errors.New("--reason is required")
			}
			if all {
				if len(args) > 0 || compromised {
					return errors.New("--all takes no SPIFFE-ID and no --compromised")
				}
				return rotateFleet(cmd, state, reason)
			}
			req := node.ControlRequest{Reason: reason, Compromised: compromised}
			if len(args) == 1 {
				id, err := spiffeid.FromString(args[0])
				if err != nil {
					return fmt.Errorf("invalid SPIFFE ID %q: %w", args[0], err)
				}
				req.SPIFFEID = id.String()
			}
			res, err := requestRotate(cmd.Context(), state, req)
			if err != nil {
				return err
			}
			_, err = fmt.Fprintf(cmd.OutOrStdout(), "rotated: version %d serial %s -> version %d serial %s\n",
				res.OldVersion, res.OldSerial, res.NewVersion, res.NewSerial)
			return err
		},
	}
	f := cmd.Flags()
	f.StringVar(&state, "state", "/var/lib/agentmesh/proxy", "state directory of the proxy (or, with --all, of the CA)")
	f.StringVar(&reason, "reason", "", "why (recorded in the audit log)")
	f.BoolVar(&compromised, "compromised", false, "the current key is compromised: revoke its serial and drop it at once")
	f.BoolVar(&all, "all", false, "rotate every proxy of the mesh (on the CA host)")
	return cmd
}

// rotateFleet runs `rotate --all` on the CA host: every proxy of the mesh rotates.
func rotateFleet(cmd *cobra.Command, state, reason string) error {
	f, err := ca.RequestFleetRotation(cmd.Context(), state, reason)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(cmd.OutOrStdout(), "fleet rotation %d published at %s\n", f.ID, f.At.Format(time.RFC3339Nano))
	return err
}

// requestRotate sends POST /rotate to the control socket of the proxy in stateDir.
func requestRotate(ctx context.Context, stateDir string, req node.ControlRequest) (*rotator.RotateResult, error) {
	body, err := json.Marshal(req)
	if err != nil {
		return nil, err
	}
	sock := filepath.Join(stateDir, node.ControlSocket)
	status, b, err := unixhttp.Do(ctx, unixhttp.Request{Socket: sock, Method: http.MethodPost, Path: "/rotate",
		Body: body, Limit: 64 << 10, Timeout: time.Minute})
	switch {
	case err != nil:
		return nil, fmt.Errorf("control socket (is agentmesh proxy running with this state directory?): %w", err)
	case status != http.StatusOK:
		return nil, fmt.Errorf("rotate refused (%d): %s", status, strings.TrimSpace(string(b)))
	}
	var res rotator.RotateResult
	if err := json.Unmarshal(b, &res); err != nil {
		return nil, fmt.Errorf("rotate: malformed answer: %w", err)
	}
	return &res, nil
}
