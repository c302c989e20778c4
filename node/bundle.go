package node

import (
	"crypto/x509"
	"errors"
	"fmt"
	"slices"
	"sync"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// errForeignBundle refuses a mesh state's bundle that does not hold the anchor of this
// proxy's own SVID: installing it would make the proxy distrust itself.
var errForeignBundle = errors.New("the mesh state's trust bundle does not hold the anchor of this proxy's SVID")

// bundleSources are the two sources of trust anchors: the CA root file and the roots
// the CA publishes in the mesh state. The bundle in force is their union while both
// list anchors: the file is the operator's word and a mesh state never removes what it
// lists, and the CA can publish a root (a coming CA, say) before it issues from it.
type bundleSources struct {
	mu   sync.Mutex // serialises the file's and the mesh state's installs
	file []*x509.Certificate
	mesh []*x509.Certificate
}

// union is the file's anchors, then the mesh state's that the file does not list.
func (b *bundleSources) union() []*x509.Certificate {
	out := slices.Clone(b.file)
	for _, c := range b.mesh {
		if !slices.ContainsFunc(out, c.Equal) {
			out = append(out, c)
		}
	}
	return out
}

// setBundle makes the root file's anchors next and installs the union with the mesh
// state's, when it differs from the bundle held.
func (a *applier) setBundle(next *x509bundle.Bundle) (changed bool, err error) {
	a.bundles.mu.Lock()
	defer a.bundles.mu.Unlock()
	a.bundles.file = next.X509Authorities()
	return a.installBundle()
}

// applyMeshBundle installs the CA's roots published in a mesh state (version names
// them), united with the root file's. The state came over the connection to the CA
// that the root file authenticates; a bundle that would not verify this proxy's own
// SVID is still refused and audited, and the one in force stays.
func (a *applier) applyMeshBundle(version string, roots []*x509.Certificate) {
	td := a.rot.ID().TrustDomain()
	svid, err := a.rot.GetX509SVID()
	if err == nil {
		_, _, err = x509svid.Verify(svid.Certificates, x509bundle.FromX509Authorities(td, roots))
	}
	if err != nil {
		err = fmt.Errorf("%w: version %s: %w", errForeignBundle, version, err)
		a.log.Error("trust bundle refused; the one in force stays", "source", "mesh", "err", err)
		if err := a.bundleRefused(err); err != nil {
			a.log.Error("audit trust bundle change", "err", err)
		}
		return
	}
	a.bundles.mu.Lock()
	defer a.bundles.mu.Unlock()
	a.bundles.mesh = roots
	changed, err := a.installBundle()
	switch {
	case err != nil:
		a.log.Error("trust bundle refused; the one in force stays", "source", "mesh", "err", err)
	case changed:
		a.log.Info("trust bundle updated", "source", "mesh", "version", version, "authorities", len(roots))
	}
}

// installBundle makes the union of the sources the trust bundle of the host's and every
// agent's rotator when it differs from the one held. The rotator audits each change of anchors; if the new bundle drops a
// CA, every ticket key is replaced too, so no session of that CA resumes. Called with
// bundles.mu held.
func (a *applier) installBundle() (changed bool, err error) {
	td := a.rot.ID().TrustDomain()
	next := x509bundle.FromX509Authorities(td, a.bundles.union())
	held, err := a.rot.GetX509BundleForTrustDomain(td)
	if err != nil || held.Equal(next) {
		return false, nil
	}
	if err := a.rot.SetBundle(next); err != nil {
		return false, err
	}
	if err := a.agents.setBundle(next); err != nil {
		a.log.Error("trust bundle refused by an agent's rotator", "err", err)
	}
	for _, ca := range held.X509Authorities() {
		if !next.HasX509Authority(ca) {
			a.live.ResetTicketKeys("ca_removed")
			break
		}
	}
	return true, nil
}
