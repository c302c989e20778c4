package node

import (
	"crypto/x509"
	"slices"
	"sync"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// anchorSetter takes the bundle in force for the mesh client's connections to the CA
// and its deny-list verification.
type anchorSetter interface {
	Set(roots []*x509.Certificate)
}

// bundleSources are where the bundle in force comes from: the roots the CA publishes
// in the mesh state, and the CA root file's anchors but those the CA withdrew (it
// published them, then a later state no longer did: a root retired by a rotation). The
// file is the operator's word, which may add anchors of another CA; the CA's word
// retires its own. United with every anchor of the bundle held before that one of the
// SVIDs held needs (it verifies the SVID, which the rest does not). So a proxy never
// drops the anchor of its own SVIDs, whatever the mesh state says (a proxy back from a
// partition may see the last step of a rotation first), and drops a retired root by
// itself once every SVID it holds was renewed under the new one.
type bundleSources struct {
	mu        sync.Mutex // serialises the file's and the mesh state's installs and renewals' recomputations
	file      []*x509.Certificate
	mesh      []*x509.Certificate
	withdrawn []*x509.Certificate // published by the CA once, not any more
}

// setMesh makes roots the published ones: those published before and not now are
// withdrawn, those published now are not.
func (b *bundleSources) setMesh(roots []*x509.Certificate) {
	for _, c := range b.mesh {
		if !slices.ContainsFunc(roots, c.Equal) && !slices.ContainsFunc(b.withdrawn, c.Equal) {
			b.withdrawn = append(b.withdrawn, c)
		}
	}
	b.withdrawn = slices.DeleteFunc(b.withdrawn, func(c *x509.Certificate) bool { return slices.ContainsFunc(roots, c.Equal) })
	b.mesh = roots
}

// base is the published roots, then the file's that are neither published nor
// withdrawn.
func (b *bundleSources) base() []*x509.Certificate {
	out := slices.Clone(b.mesh)
	for _, c := range b.file {
		if !slices.ContainsFunc(out, c.Equal) && !slices.ContainsFunc(b.withdrawn, c.Equal) {
			out = append(out, c)
		}
	}
	return out
}

// inForce is base united with the anchors of held that an SVID of svids needs: one
// that base does not verify and that anchor does. Pure but for the clock of
// verification.
func inForce(base, held []*x509.Certificate, svids []*x509svid.SVID) []*x509.Certificate {
	out := slices.Clone(base)
	if len(svids) == 0 {
		return out
	}
	td := svids[0].ID.TrustDomain()
	for _, s := range svids {
		if _, _, err := x509svid.Verify(s.Certificates, x509bundle.FromX509Authorities(td, out)); err == nil {
			continue
		}
		for _, a := range held {
			if slices.ContainsFunc(out, a.Equal) {
				continue
			}
			if _, _, err := x509svid.Verify(s.Certificates, x509bundle.FromX509Authorities(td, []*x509.Certificate{a})); err == nil {
				out = append(out, a)
			}
		}
	}
	return out
}

// svids are the SVIDs held now: the host's, then every agent's that has one.
func (a *applier) svids() []*x509svid.SVID {
	var out []*x509svid.SVID
	if s, err := a.rot.GetX509SVID(); err == nil {
		out = append(out, s)
	}
	for _, r := range a.agents.rotators() {
		if s, err := r.GetX509SVID(); err == nil {
			out = append(out, s)
		}
	}
	return out
}

// setBundle makes the root file's anchors next.
func (a *applier) setBundle(next *x509bundle.Bundle) (changed bool, err error) {
	a.bundles.mu.Lock()
	defer a.bundles.mu.Unlock()
	a.bundles.file = next.X509Authorities()
	return a.installBundle()
}

// applyMeshBundle makes the CA's roots published in a mesh state (version names them)
// the published ones. The state came over the connection to the CA that the bundle in
// force authenticates.
func (a *applier) applyMeshBundle(version string, roots []*x509.Certificate) {
	a.bundles.mu.Lock()
	defer a.bundles.mu.Unlock()
	a.bundles.setMesh(roots)
	changed, err := a.installBundle()
	switch {
	case err != nil:
		a.log.Error("trust bundle refused; the one in force stays", "source", "mesh", "err", err)
	case changed:
		a.log.Info("trust bundle updated", "source", "mesh", "version", version, "authorities", len(roots))
	}
}

// recomputeBundle installs the bundle in force again after a renewal: an anchor only
// the replaced SVID needed leaves.
func (a *applier) recomputeBundle() {
	a.bundles.mu.Lock()
	defer a.bundles.mu.Unlock()
	if changed, err := a.installBundle(); err != nil {
		a.log.Error("trust bundle refused; the one in force stays", "source", "renewal", "err", err)
	} else if changed {
		a.log.Info("trust bundle updated", "source", "renewal")
	}
}

// installBundle makes the bundle in force the trust bundle of the host's and every
// agent's rotator and of the mesh client when it differs from the one held. The
// rotator audits each change of anchors; if the new bundle drops a CA, every ticket key
// is replaced too, so no session of that CA resumes. Called with bundles.mu held.
func (a *applier) installBundle() (changed bool, err error) {
	td := a.rot.ID().TrustDomain()
	held, err := a.rot.GetX509BundleForTrustDomain(td)
	if err != nil {
		return false, nil
	}
	next := x509bundle.FromX509Authorities(td, inForce(a.bundles.base(), held.X509Authorities(), a.svids()))
	if next.Empty() {
		return false, nil
	}
	if held.Equal(next) {
		// An agent's rotator made while the bundle changed may hold the one before it:
		// the same bundle changes nothing in the others.
		if err := a.agents.setBundle(next); err != nil {
			a.log.Error("trust bundle refused by an agent's rotator", "err", err)
		}
		return false, nil
	}
	if err := a.rot.SetBundle(next); err != nil {
		return false, err
	}
	if err := a.agents.setBundle(next); err != nil {
		a.log.Error("trust bundle refused by an agent's rotator", "err", err)
	}
	if a.caAnchors != nil {
		a.caAnchors.Set(next.X509Authorities())
	}
	for _, ca := range held.X509Authorities() {
		if !next.HasX509Authority(ca) {
			a.live.ResetTicketKeys("ca_removed")
			break
		}
	}
	return true, nil
}

// bundleInForce is the bundle the host's rotator holds.
func (a *applier) bundleInForce() *x509bundle.Bundle {
	b, err := a.rot.GetX509BundleForTrustDomain(a.rot.ID().TrustDomain())
	if err != nil {
		return x509bundle.New(a.rot.ID().TrustDomain())
	}
	return b
}
