package authority

import (
	"context"
	"crypto/x509"
	"net/http"
	"slices"

	"github.com/go-chi/chi/v5"
	"github.com/smallstep/certificates/api"
	"github.com/smallstep/certificates/api/render"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
)

// anchorSet is the roots the authority trusts, in the forms its users need.
type anchorSet struct {
	roots  []*x509.Certificate
	pool   *x509.CertPool
	bundle *x509bundle.Bundle
}

// SetAnchors sets the roots the authority trusts for client certificates
// (VerifyClientChain), serves at /roots and returns from Anchors and Bundle. Open sets
// the roots of every generation held; a rotation narrows or widens them per phase. The
// caller may not modify roots afterwards.
func (a *Authority) SetAnchors(roots []*x509.Certificate) {
	set := &anchorSet{roots: slices.Clone(roots), pool: x509.NewCertPool()}
	for _, r := range roots {
		set.pool.AddCert(r)
	}
	set.bundle = x509bundle.FromX509Authorities(a.cfg.TrustDomain, set.roots)
	a.anchors.Store(set)
}

// Anchors is the roots the authority trusts now (SetAnchors). The caller may not modify
// the certificates.
func (a *Authority) Anchors() []*x509.Certificate { return slices.Clone(a.anchors.Load().roots) }

// Bundle is the trust domain's bundle of the anchors, for x509svid.Verify.
func (a *Authority) Bundle() *x509bundle.Bundle { return a.anchors.Load().bundle }

// Intermediates is the intermediate of every generation held, active first: a chain a
// client presents may end at any of them.
func (a *Authority) Intermediates() []*x509.Certificate {
	var out []*x509.Certificate
	for _, g := range a.pki.Load().held() {
		out = append(out, g.Intermediate)
	}
	return out
}

// authorityKey is the context key of the Authority serving a request (BaseContext).
type authorityKey struct{}

// routeRoots serves the anchors at /roots and /roots.pem in step-ca's formats, in place
// of step-ca's handlers, which serve the roots it was started with.
func routeRoots(r chi.Router) {
	r.MethodFunc(http.MethodGet, "/roots", func(w http.ResponseWriter, r *http.Request) {
		roots := anchorsOf(r.Context())
		resp := &api.RootsResponse{Certificates: make([]api.Certificate, len(roots))}
		for i, c := range roots {
			resp.Certificates[i] = api.Certificate{Certificate: c}
		}
		render.JSONStatus(w, r, resp, http.StatusCreated) // step-ca's status for /roots
	})
	r.MethodFunc(http.MethodGet, "/roots.pem", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/x-pem-file")
		for _, c := range anchorsOf(r.Context()) {
			if _, err := w.Write(pemCert(c)); err != nil {
				return
			}
		}
	})
}

func anchorsOf(ctx context.Context) []*x509.Certificate {
	a, _ := ctx.Value(authorityKey{}).(*Authority)
	return a.anchors.Load().roots
}
