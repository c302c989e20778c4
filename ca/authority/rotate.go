package authority

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"net/url"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/meshapi"
)

// Every change of generations is persisted (savePKI) before it is published in a.pki,
// and each is idempotent: a CA killed during one re-runs it after restart.

// ProbePath is the path of the SPIFFE ID of the test chains Probe issues.
const ProbePath = "/agentmesh/probe"

// probeLifetime is how long a test chain is valid: as long as a rotation step may last.
const probeLifetime = 24 * time.Hour

// Active is the generation the authority issues from.
func (a *Authority) Active() Generation { return a.pki.Load().active.Generation }

// Next is the generation a rotation prepared, if any.
func (a *Authority) Next() (Generation, bool) { return held(a.pki.Load().next) }

// Previous is the generation a rotation replaced and that is not destroyed yet, if any.
func (a *Authority) Previous() (Generation, bool) { return held(a.pki.Load().previous) }

func held(g *generation) (Generation, bool) {
	if g == nil {
		return Generation{}, false
	}
	return g.Generation, true
}

// activeChain is step-ca's signer: the active generation's intermediate and key.
func (a *Authority) activeChain() ([]*x509.Certificate, crypto.Signer, error) {
	g := a.pki.Load().active
	return []*x509.Certificate{g.Intermediate}, g.intermediateSigner, nil
}

// Prepare makes the next generation for a rotation of kind: its keys generated inside
// the token (a key that exists already, left by a Prepare a crash interrupted, is
// reused) and its certificates, a root rotation's cross-signed both ways. A generation
// already prepared is returned as it is. An HSM failure returns an error wrapping
// ErrHSM and persists nothing; the keys it generated are removed again.
func (a *Authority) Prepare(kind meshapi.AnchorKind) (Generation, error) {
	if kind != meshapi.RotateIntermediate && kind != meshapi.RotateRoot {
		return Generation{}, fmt.Errorf("%w: unknown rotation kind %q", ErrGenerationState, kind)
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	st := a.pki.Load()
	if st.next != nil {
		if got := st.next.Kind(st.active.Generation); got != kind {
			return Generation{}, fmt.Errorf("%w: generation %d is prepared for a rotation of the %s", ErrGenerationState, st.next.N, got)
		}
		return st.next.Generation, nil
	}
	if st.previous != nil {
		return Generation{}, fmt.Errorf("%w: generation %d is not destroyed yet", ErrGenerationState, st.previous.N)
	}
	n := st.last + 1
	g, err := newGeneration(a.km, st.active, kind, n, a.cfg.TrustDomain, time.Now())
	if err != nil {
		// Nothing refers to generation n's keys: remove what this attempt generated.
		_ = deleteKeys(a.km, []string{RootKeyURI(n), IntermediateKeyURI(n)})
		return Generation{}, err
	}
	st = st.with(func(s *pkiState) { s.next, s.last = g, n })
	if err := savePKI(a.cfg.StateDir, st); err != nil {
		return Generation{}, err
	}
	a.pki.Store(st)
	return g.Generation, nil
}

// newGeneration makes generation n after cur: an intermediate rotation's keeps cur's
// root and root key.
func newGeneration(km keyStore, cur *generation, kind meshapi.AnchorKind, n int, td spiffeid.TrustDomain, now time.Time) (*generation, error) {
	g := &generation{
		Generation: Generation{N: n, Root: cur.Root, RootKey: cur.RootKey, IntermediateKey: IntermediateKeyURI(n)},
		rootSigner: cur.rootSigner,
	}
	var err error
	if kind == meshapi.RotateRoot {
		g.RootKey = RootKeyURI(n)
		if g.rootSigner, err = loadOrCreateKey(km, g.RootKey); err != nil {
			return nil, err
		}
		if g.Root, err = createRoot(g.rootSigner, td, n, now); err != nil {
			return nil, err
		}
		newByOld, err := crossSign(g.Root, cur.Root, cur.rootSigner, td, now)
		if err != nil {
			return nil, err
		}
		oldByNew, err := crossSign(cur.Root, g.Root, g.rootSigner, td, now)
		if err != nil {
			return nil, err
		}
		g.Cross = []*x509.Certificate{newByOld, oldByNew}
	}
	if g.intermediateSigner, err = loadOrCreateKey(km, g.IntermediateKey); err != nil {
		return nil, err
	}
	if g.Intermediate, err = createIntermediate(g.Root, g.rootSigner, g.intermediateSigner.Public(), td, n, now); err != nil {
		return nil, err
	}
	return g, nil
}

// Activate makes the next generation the active one and the active one the previous:
// from then on every certificate is issued by the new intermediate, root.crt and
// intermediate.crt hold the new generation's, and the TLS serving certificate is
// reissued at once. Once activated, it only completes what a crash interrupted.
func (a *Authority) Activate() error {
	return a.swap(func(s *pkiState) error {
		switch {
		case s.next != nil && s.previous == nil:
			s.previous, s.active, s.next = s.active, s.next, nil
		case s.next == nil && s.previous != nil: // activated already
		default:
			return fmt.Errorf("%w: no generation prepared to activate", ErrGenerationState)
		}
		return nil
	})
}

// Revert undoes Activate (a rotation aborted after activation): the previous generation
// is active again and the one it replaced is the next, to be discarded. It reissues the
// serving certificate, and is idempotent.
func (a *Authority) Revert() error {
	return a.swap(func(s *pkiState) error {
		switch {
		case s.previous != nil && s.next == nil:
			s.next, s.active, s.previous = s.active, s.previous, nil
		case s.previous == nil && s.next != nil: // reverted already, or never activated
		default:
			return fmt.Errorf("%w: no previous generation to revert to", ErrGenerationState)
		}
		return nil
	})
}

// swap applies change to the generations, persists them even when change is a no-op
// (a crash may have left root.crt behind pki.json) and serves a certificate of the
// active generation.
func (a *Authority) swap(change func(*pkiState) error) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	var err error
	st := a.pki.Load().with(func(s *pkiState) { err = change(s) })
	if err != nil {
		return err
	}
	if err := savePKI(a.cfg.StateDir, st); err != nil {
		return err
	}
	a.pki.Store(st)
	return a.ensureServingCert()
}

// ensureServingCert reissues the TLS serving certificate unless the active
// intermediate issued it. Before Start there is none: Start issues it.
func (a *Authority) ensureServingCert() error {
	auth := a.step.Load()
	if auth == nil {
		return nil
	}
	if c := a.servingCert.Load(); c != nil && c.Leaf.CheckSignatureFrom(a.Intermediate()) == nil {
		return nil
	}
	return a.issueServingCert(auth)
}

// DestroyPrevious deletes from the token the keys of the previous generation that the
// active one does not use (an intermediate rotation keeps the root key), removes its
// files and forgets it. It is idempotent, and completes a deletion a crash or an HSM
// failure interrupted.
func (a *Authority) DestroyPrevious() error {
	return a.forget(func(s *pkiState) **generation { return &s.previous })
}

// DiscardNext is DestroyPrevious for the next generation (a rotation aborted).
func (a *Authority) DiscardNext() error {
	return a.forget(func(s *pkiState) **generation { return &s.next })
}

// forget drops the generation in slot: the keys to delete are persisted first, so that
// a deletion interrupted is retried rather than leaving keys in the token.
func (a *Authority) forget(slot func(*pkiState) **generation) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	st := a.pki.Load()
	if g := *slot(st); g != nil {
		st = st.with(func(s *pkiState) {
			*slot(s) = nil
			s.deleting = append(s.deleting, keysOnlyOf(g, s.held()...)...)
		})
		if err := savePKI(a.cfg.StateDir, st); err != nil {
			return err
		}
		a.pki.Store(st)
	}
	if len(st.deleting) > 0 {
		if err := deleteKeys(a.km, st.deleting); err != nil {
			return err
		}
		st = st.with(func(s *pkiState) { s.deleting = nil })
		if err := savePKI(a.cfg.StateDir, st); err != nil {
			return err
		}
		a.pki.Store(st)
	}
	return removeStaleFiles(a.cfg.StateDir, st)
}

// Probe returns a test chain (PEM: leaf, then g's intermediate) issued by g's
// intermediate key: an X509-SVID for ProbePath with a throwaway key, valid for a day.
// It verifies with g's root only, so a proxy that verifies it proves it trusts that
// root.
func (a *Authority) Probe(g Generation) (string, error) {
	h, ok := a.pki.Load().find(g)
	if !ok {
		return "", fmt.Errorf("%w: generation %d is not held", ErrGenerationState, g.N)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return "", fmt.Errorf("probe key: %w", err)
	}
	now := time.Now()
	notAfter := now.Add(probeLifetime)
	if h.Intermediate.NotAfter.Before(notAfter) {
		notAfter = h.Intermediate.NotAfter
	}
	tmpl := &x509.Certificate{
		SerialNumber: randomSerial(),
		NotBefore:    now.Add(-time.Minute),
		NotAfter:     notAfter,
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		URIs:         []*url.URL{spiffeid.RequireFromPath(a.cfg.TrustDomain, ProbePath).URL()},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, h.Intermediate, key.Public(), h.intermediateSigner)
	if err != nil {
		return "", fmt.Errorf("%w: sign probe: %w", ErrHSM, err)
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})) + string(pemCert(h.Intermediate)), nil
}
