package authority

import (
	"context"
	"crypto/x509"
	"fmt"
	"net/http"
	"slices"
	"strings"

	"github.com/go-chi/chi/v5"
	"github.com/smallstep/certificates/api"
	"github.com/smallstep/certificates/api/render"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"go.step.sm/crypto/x509util"
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

// routeCerts serves, in place of step-ca's handlers (which serve the certificates it
// was started with), the anchors at /roots, /roots.pem and /root/{sha}, and the
// intermediates of the generations held at /intermediates and /intermediates.pem, in
// step-ca's formats.
func routeCerts(r chi.Router) {
	anchors := func(a *Authority) []*x509.Certificate { return a.anchors.Load().roots }
	intermediates := (*Authority).Intermediates
	r.MethodFunc(http.MethodGet, "/roots", certsJSON(anchors, func(c []api.Certificate) any {
		return &api.RootsResponse{Certificates: c}
	}))
	r.MethodFunc(http.MethodGet, "/roots.pem", certsPEM(anchors))
	r.MethodFunc(http.MethodGet, "/intermediates", certsJSON(intermediates, func(c []api.Certificate) any {
		return &api.IntermediatesResponse{Certificates: c}
	}))
	r.MethodFunc(http.MethodGet, "/intermediates.pem", certsPEM(intermediates))
	r.MethodFunc(http.MethodGet, "/root/{sha}", func(w http.ResponseWriter, r *http.Request) {
		sum := strings.ToLower(strings.ReplaceAll(chi.URLParam(r, "sha"), "-", ""))
		for _, c := range anchors(authorityOf(r.Context())) {
			if x509util.Fingerprint(c) == sum {
				render.JSON(w, r, &api.RootResponse{RootPEM: api.Certificate{Certificate: c}})
				return
			}
		}
		WriteError(w, http.StatusNotFound, fmt.Sprintf("root certificate with fingerprint %q was not found", sum))
	})
}

// certsJSON answers with the certificates list returns in the response wrap makes,
// with step-ca's status for these lists.
func certsJSON(list func(*Authority) []*x509.Certificate, wrap func([]api.Certificate) any) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		certs := list(authorityOf(r.Context()))
		out := make([]api.Certificate, len(certs))
		for i, c := range certs {
			out[i] = api.Certificate{Certificate: c}
		}
		render.JSONStatus(w, r, wrap(out), http.StatusCreated)
	}
}

// certsPEM answers with the certificates list returns, in PEM.
func certsPEM(list func(*Authority) []*x509.Certificate) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/x-pem-file")
		for _, c := range list(authorityOf(r.Context())) {
			if _, err := w.Write(pemCert(c)); err != nil {
				return
			}
		}
	}
}

// authorityOf is the Authority BaseContext put in a request's context.
func authorityOf(ctx context.Context) *Authority {
	a, _ := ctx.Value(authorityKey{}).(*Authority)
	return a
}
