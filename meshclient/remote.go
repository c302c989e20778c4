package meshclient

import (
	"context"
	"crypto/tls"
	"net/http"

	"github.com/agentmesh/agentmesh/meshapi"
)

// RevokeRemote asks the CA at cfg.URL to revoke, over mTLS with cert (an SVID of the
// trust domain): POST /mesh/v1/revoke. An operator SVID (/admin/...) may revoke any
// identity or serial; any other SVID only a serial of its own identity, which is how a
// proxy revokes its previous certificate after rotating away from a compromised key
// (with its new SVID). cfg.Token is not used. A refusal is a *meshapi.ResponseError with Op
// "revoke": 400 for a bad request, 401 for a certificate that is not a valid SVID, 403
// for a request the certificate may not make (or a revoked certificate), 404 for a
// serial unknown to the CA (operators only: others get 403).
func RevokeRemote(ctx context.Context, cfg ClientConfig, cert tls.Certificate, req meshapi.RevokeRequest) (*meshapi.RevokeResult, error) {
	answer, err := meshPost(ctx, cfg, cert, "revoke", meshapi.RevokePath, req)
	if err != nil {
		return nil, err
	}
	return meshapi.DecodeRevokeResult(answer)
}

// meshPost sends req as JSON to the mesh API's path at cfg.URL over mTLS with cert
// and returns the answer of a 200; any other status is a *meshapi.ResponseError with op.
func meshPost(ctx context.Context, cfg ClientConfig, cert tls.Certificate, op, path string, req any) ([]byte, error) {
	c, err := NewClient(cfg)
	if err != nil {
		return nil, err
	}
	tr := c.transport(&cert, false)
	defer tr.CloseIdleConnections()
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	return postJSON(ctx, &http.Client{Transport: tr}, op, c.base+meshapi.Prefix+path, req, http.StatusOK)
}

// ReinstateRemote asks the CA at cfg.URL to reinstate, over mTLS with cert, an
// operator SVID (/admin/...): POST /mesh/v1/reinstate. A refusal is a *meshapi.ResponseError
// with Op "reinstate" (403 for any other SVID, 409 for an identity not revoked).
func ReinstateRemote(ctx context.Context, cfg ClientConfig, cert tls.Certificate, req meshapi.ReinstateRequest) (*meshapi.ReinstateResult, error) {
	b, err := meshPost(ctx, cfg, cert, "reinstate", meshapi.ReinstatePath, req)
	if err != nil {
		return nil, err
	}
	return meshapi.DecodeReinstateResult(b)
}
