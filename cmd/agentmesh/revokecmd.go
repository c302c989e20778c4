package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/agentmesh/agentmesh/meshapi"
	"github.com/agentmesh/agentmesh/meshclient"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.step.sm/crypto/pemutil"

	"github.com/agentmesh/agentmesh/ca"
)

func newRevokeCmd() *cobra.Command {
	var (
		serial, reason string
		adm            adminFlags
	)
	cmd := &cobra.Command{
		Use:   "revoke [SPIFFE-ID]",
		Short: "Revoke an identity or one certificate; every proxy enforces it within a second",
		Long: `Revoke SPIFFE-ID (every certificate of it issued before the revocation, and no new one
until "agentmesh reinstate") or, with --serial, one certificate. The CA revokes the serials in
step-ca (renewal refused, CRL regenerated) and publishes a new signed deny-list; every proxy
then refuses new and resumed handshakes of the revoked credential and closes the live
connections it authenticated. The list keeps the entry until every certificate it covers has
expired.

Only an administrator may revoke: root or the CA's user on the CA host (through the admin
socket in --state), or, from anywhere, the holder of an admin SVID
(spiffe://TRUST-DOMAIN/admin/NAME) given with --ca, --root, --cert and --key.`,
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			req, err := revokeRequest(args, serial, reason)
			if err != nil {
				return err
			}
			res, err := adminCall(cmd.Context(), &adm, req, ca.RequestRevoke, meshclient.RevokeRemote)
			if err != nil {
				return err
			}
			_, err = fmt.Fprintf(cmd.OutOrStdout(), "revoked: deny-list version %d, serials %s\n",
				res.ListVersion, strings.Join(res.Serials, " "))
			return err
		},
	}
	f := cmd.Flags()
	f.StringVar(&serial, "serial", "", "revoke one certificate by serial number (decimal)")
	f.StringVar(&reason, "reason", "", "why (recorded in the audit log and the CRL), e.g. key-compromise")
	adm.register(f)
	return cmd
}

// revokeRequest reads revoke's command line: exactly one of SPIFFE-ID or --serial, and
// a reason.
func revokeRequest(args []string, serial, reason string) (meshapi.RevokeRequest, error) {
	req := meshapi.RevokeRequest{Serial: serial, Reason: reason}
	if len(args) == 1 {
		id, err := spiffeid.FromString(args[0])
		if err != nil {
			return req, fmt.Errorf("invalid SPIFFE ID %q: %w", args[0], err)
		}
		req.SPIFFEID = id.String()
	}
	if (req.SPIFFEID == "") == (serial == "") {
		return req, errors.New("name exactly one of SPIFFE-ID or --serial")
	}
	if strings.TrimSpace(reason) == "" {
		return req, errors.New("--reason is required")
	}
	return req, nil
}

// adminFlags say how an administrator reaches the CA: through its admin socket on the
// CA host (--state), or through its mTLS API with an admin SVID (--ca, --root, --cert,
// --key).
type adminFlags struct{ state, caURL, root, cert, key string }

var errAdminFlags = errors.New("give either --state (on the CA host) or --ca with an admin certificate")

func (a *adminFlags) register(f *pflag.FlagSet) {
	f.StringVar(&a.state, "state", "", "state directory of the agentmesh ca running on this host")
	f.StringVar(&a.caURL, "ca", "", "https URL of agentmesh ca, for an administrator with an admin SVID")
	f.StringVar(&a.root, "root", "", "the CA's root certificate (with --ca)")
	f.StringVar(&a.cert, "cert", "", "the admin SVID, PEM, leaf first (with --ca)")
	f.StringVar(&a.key, "key", "", "the admin SVID's private key, PEM, mode 0600 or tighter (with --ca)")
}

// remote reports whether the flags name the mTLS API (true) or the admin socket
// (false); ok is false unless exactly one of them is named.
func (a *adminFlags) remote() (remote, ok bool) {
	return a.caURL != "", (a.state == "") != (a.caURL == "")
}

// adminCall sends req the way the flags name: local (the admin socket in --state) or
// remote (the CA's mTLS API, authenticated with the admin SVID).
func adminCall[Req, Res any](ctx context.Context, a *adminFlags, req Req,
	local func(context.Context, string, Req) (Res, error),
	remote func(context.Context, meshclient.ClientConfig, tls.Certificate, Req) (Res, error)) (Res, error) {
	var zero Res
	isRemote, ok := a.remote()
	switch {
	case !ok:
		return zero, errAdminFlags
	case !isRemote:
		return local(ctx, a.state, req)
	}
	cfg, pair, err := a.credential()
	if err != nil {
		return zero, err
	}
	return remote(ctx, cfg, pair, req)
}

// credential reads the admin SVID and the CA's root for the CA's mTLS API.
func (a *adminFlags) credential() (meshclient.ClientConfig, tls.Certificate, error) {
	caURL, root, certFile, keyFile := a.caURL, a.root, a.cert, a.key
	if root == "" || certFile == "" || keyFile == "" {
		return meshclient.ClientConfig{}, tls.Certificate{}, errors.New("--ca needs --root, --cert and --key")
	}
	fi, err := os.Stat(keyFile)
	if err != nil {
		return meshclient.ClientConfig{}, tls.Certificate{}, fmt.Errorf("--key: %w", err)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return meshclient.ClientConfig{}, tls.Certificate{}, fmt.Errorf("--key %s is readable by others (mode %v): chmod 600 it", keyFile, fi.Mode().Perm())
	}
	pair, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return meshclient.ClientConfig{}, tls.Certificate{}, fmt.Errorf("admin certificate: %w", err)
	}
	roots, err := pemutil.ReadCertificateBundle(root)
	if err != nil {
		return meshclient.ClientConfig{}, tls.Certificate{}, fmt.Errorf("--root: %w", err)
	}
	return meshclient.ClientConfig{URL: caURL, Roots: roots}, pair, nil
}
