package node

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/rotator"
)

// heldIdentity is what a rotation needs of an identity's rotator.
type heldIdentity interface {
	ID() spiffeid.ID
	Rotate(ctx context.Context, req rotator.RotateRequest) (rotator.RotateResult, error)
	TLSCertificate() (*tls.Certificate, error)
}

// ticketKeyResetter drops every session-ticket key (the proxy).
type ticketKeyResetter interface{ ResetTicketKeys(cause string) }

// rotation is the operator's rotation (control socket, fleet command, configuration
// change) of the identities this proxy holds.
type rotation struct {
	tickets ticketKeyResetter
	revoker lineageRevoker
	logger  *slog.Logger
}

// now rotates id's rotator now. For a compromised key the proxy drops every
// session-ticket key and the CA revokes every certificate of the identity's lineage but
// the new one (asked with the new SVID, since a proxy may revoke its own identity's
// lineage except the certificate it presents): the old serial, and any fork a thief
// renewed from the stolen key before the rotation.
func (r rotation) now(ctx context.Context, rot heldIdentity, req rotator.RotateRequest) (rotator.RotateResult, error) {
	if req.Compromised {
		r.tickets.ResetTicketKeys("compromise")
	}
	res, err := rot.Rotate(ctx, req)
	if err != nil || !req.Compromised || res.OldSerial == "" {
		return res, err
	}
	cert, err := rot.TLSCertificate()
	if err != nil {
		return res, fmt.Errorf("rotated, but cannot revoke serial %s: %w", res.OldSerial, err)
	}
	leaf := cert.Leaf
	if leaf == nil {
		if leaf, err = x509.ParseCertificate(cert.Certificate[0]); err != nil {
			return res, fmt.Errorf("rotated, but cannot revoke serial %s: %w", res.OldSerial, err)
		}
	}
	keep := leaf.SerialNumber.String()
	serials, err := r.revoker.RevokeLineage(ctx, *cert, rot.ID(), keep, "key-compromise: "+req.Reason)
	if err != nil {
		return res, fmt.Errorf("rotated, but the CA did not revoke the lineage of serial %s: %w", res.OldSerial, err)
	}
	r.logger.Info("compromised lineage revoked", "spiffe_id", rot.ID().String(), "serial", keep,
		"serials", serials, "initiator", req.Actor.Initiator)
	return res, nil
}

// of binds the rotation to one identity (the control socket's answer).
func (r rotation) of(rot heldIdentity) rotateFunc {
	return func(ctx context.Context, req rotator.RotateRequest) (rotator.RotateResult, error) {
		return r.now(ctx, rot, req)
	}
}

// all rotates every identity in order (the host's first, then every agent's: fleet
// commands and rotation policy changes) and reports the first one's result.
func (r rotation) all(ctx context.Context, rots []heldIdentity, req rotator.RotateRequest) (rotator.RotateResult, error) {
	var first rotator.RotateResult
	var errs []error
	for i, rot := range rots {
		res, err := r.now(ctx, rot, req)
		if i == 0 {
			first = res
		}
		errs = append(errs, err)
	}
	return first, errors.Join(errs...)
}
