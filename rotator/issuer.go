package rotator

import (
	"context"
	"crypto"
	"crypto/x509"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// Issuer obtains certificates from a CA. Both methods return the chain leaf first.
// Errors for which a retry cannot help implement `Permanent() bool` returning true;
// after such an error on Renew the rotator falls back to Enroll.
type Issuer interface {
	// Enroll obtains a first certificate for id and the public half of key, with a
	// bootstrap credential the Issuer holds.
	Enroll(ctx context.Context, id spiffeid.ID, key crypto.Signer) ([]*x509.Certificate, error)
	// Renew obtains a certificate for the public half of key, authenticating with current.
	Renew(ctx context.Context, current *x509svid.SVID, key crypto.Signer) ([]*x509.Certificate, error)
}

// Auditor records rotations. *audit.Log satisfies it.
type Auditor interface {
	Append(e audit.Event) error
}
