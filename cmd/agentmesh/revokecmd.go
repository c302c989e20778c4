package main

import (
	"crypto/tls"
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/spf13/cobra"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.step.sm/crypto/pemutil"

	"github.com/agentmesh/agentmesh/ca"
)

func newRevokeCmd() *cobra.Command {
	var (
		state, serial, reason  string
		caURL, root, cert, key string
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
			req := ca.RevokeRequest{Serial: serial, Reason: reason}
			if len(args) == 1 {
				id, err := spiffeid.FromString(args[0])
				if err != nil {
					return fmt.Errorf("invalid SPIFFE ID %q: %w", args[0], err)
				}
				req.SPIFFEID = id.String()
			}
			if (req.SPIFFEID == "") == (serial == "") {
				return errors.New("name exactly one of SPIFFE-ID or --serial")
			}
			if strings.TrimSpace(reason) == "" {
				return errors.New("--reason is required")
			}
			var (
				res *ca.RevokeResult
				err error
			)
			switch {
			case state != "" && caURL == "":
				res, err = ca.RequestRevoke(cmd.Context(), state, req)
			case caURL != "" && state == "":
				res, err = revokeRemote(cmd, caURL, root, cert, key, req)
			default:
				return errors.New("give either --state (on the CA host) or --ca with an admin certificate")
			}
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
	f.StringVar(&state, "state", "", "state directory of the agentmesh ca running on this host")
	f.StringVar(&caURL, "ca", "", "https URL of agentmesh ca, for an administrator with an admin SVID")
	f.StringVar(&root, "root", "", "the CA's root certificate (with --ca)")
	f.StringVar(&cert, "cert", "", "the admin SVID, PEM, leaf first (with --ca)")
	f.StringVar(&key, "key", "", "the admin SVID's private key, PEM, mode 0600 or tighter (with --ca)")
	return cmd
}

// revokeRemote revokes through the CA's mTLS API with an admin SVID read from files.
func revokeRemote(cmd *cobra.Command, caURL, root, certFile, keyFile string, req ca.RevokeRequest) (*ca.RevokeResult, error) {
	cfg, pair, err := adminCredential(caURL, root, certFile, keyFile)
	if err != nil {
		return nil, err
	}
	return ca.RevokeRemote(cmd.Context(), cfg, pair, req)
}

// adminCredential reads an admin SVID and the CA's root for the CA's mTLS API.
func adminCredential(caURL, root, certFile, keyFile string) (ca.ClientConfig, tls.Certificate, error) {
	if root == "" || certFile == "" || keyFile == "" {
		return ca.ClientConfig{}, tls.Certificate{}, errors.New("--ca needs --root, --cert and --key")
	}
	fi, err := os.Stat(keyFile)
	if err != nil {
		return ca.ClientConfig{}, tls.Certificate{}, fmt.Errorf("--key: %w", err)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return ca.ClientConfig{}, tls.Certificate{}, fmt.Errorf("--key %s is readable by others (mode %v): chmod 600 it", keyFile, fi.Mode().Perm())
	}
	pair, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return ca.ClientConfig{}, tls.Certificate{}, fmt.Errorf("admin certificate: %w", err)
	}
	roots, err := pemutil.ReadCertificateBundle(root)
	if err != nil {
		return ca.ClientConfig{}, tls.Certificate{}, fmt.Errorf("--root: %w", err)
	}
	return ca.ClientConfig{URL: caURL, Roots: roots}, pair, nil
}
