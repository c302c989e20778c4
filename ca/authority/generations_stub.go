package authority

// Temporary stand-in for the generations of keys and certificates, so that the CA's
// rotation coordinator builds and runs before they exist: a prepared generation reuses
// the active keys and certificates. Replaced by the real implementation.

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/agentmesh/agentmesh/meshapi"
)

// Generation is one generation of the CA's root and intermediate.
type Generation struct {
	N                        int
	Root, Intermediate       *x509.Certificate
	RootKey, IntermediateKey string
	Cross                    []*x509.Certificate
}

type stubGenerations struct {
	mu             sync.Mutex
	init           bool
	active         Generation
	next, previous *Generation
	anchors        []*x509.Certificate
}

var stubGens sync.Map // *Authority -> *stubGenerations

func (a *Authority) gens() *stubGenerations {
	v, _ := stubGens.LoadOrStore(a, &stubGenerations{})
	g := v.(*stubGenerations)
	g.mu.Lock()
	if !g.init {
		g.init = true
		g.active = Generation{N: 1, Root: a.certs.root, Intermediate: a.certs.intermediate}
		g.anchors = []*x509.Certificate{a.certs.root}
		var st stubState
		if b, err := os.ReadFile(filepath.Join(a.cfg.StateDir, "pki-stub.json")); err == nil && json.Unmarshal(b, &st) == nil {
			g.active.N = st.Active
			if st.Next != 0 {
				n := g.active
				n.N = st.Next
				g.next = &n
			}
			if st.Previous != 0 {
				p := g.active
				p.N = st.Previous
				g.previous = &p
			}
		}
	}
	g.mu.Unlock()
	return g
}

type stubState struct{ Active, Next, Previous int }

// save persists which generations exist (g.mu held).
func (a *Authority) save(g *stubGenerations) {
	st := stubState{Active: g.active.N}
	if g.next != nil {
		st.Next = g.next.N
	}
	if g.previous != nil {
		st.Previous = g.previous.N
	}
	b, _ := json.Marshal(st)
	_ = os.WriteFile(filepath.Join(a.cfg.StateDir, "pki-stub.json"), b, 0o600)
}

func (a *Authority) Active() Generation {
	g := a.gens()
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.active
}

func (a *Authority) Next() (Generation, bool) {
	g := a.gens()
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.next == nil {
		return Generation{}, false
	}
	return *g.next, true
}

func (a *Authority) Previous() (Generation, bool) {
	g := a.gens()
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.previous == nil {
		return Generation{}, false
	}
	return *g.previous, true
}

func (a *Authority) Prepare(_ meshapi.AnchorKind) (Generation, error) {
	g := a.gens()
	g.mu.Lock()
	defer g.mu.Unlock()
	defer a.save(g)
	if g.next == nil {
		n := g.active
		n.N++
		g.next = &n
	}
	return *g.next, nil
}

func (a *Authority) Activate() error {
	g := a.gens()
	g.mu.Lock()
	defer g.mu.Unlock()
	defer a.save(g)
	if g.next != nil {
		prev := g.active
		g.active, g.previous, g.next = *g.next, &prev, nil
	}
	return nil
}

func (a *Authority) Revert() error {
	g := a.gens()
	g.mu.Lock()
	defer g.mu.Unlock()
	defer a.save(g)
	if g.previous != nil {
		next := g.active
		g.active, g.next, g.previous = *g.previous, &next, nil
	}
	return nil
}

func (a *Authority) DestroyPrevious() error {
	g := a.gens()
	g.mu.Lock()
	defer g.mu.Unlock()
	defer a.save(g)
	g.previous = nil
	return nil
}

func (a *Authority) DiscardNext() error {
	g := a.gens()
	g.mu.Lock()
	defer g.mu.Unlock()
	defer a.save(g)
	g.next = nil
	return nil
}

func (a *Authority) SetAnchors(roots []*x509.Certificate) {
	g := a.gens()
	g.mu.Lock()
	defer g.mu.Unlock()
	g.anchors = roots
}

func (a *Authority) Anchors() []*x509.Certificate {
	g := a.gens()
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.anchors
}

// Probe issues a test SVID under the active intermediate key (the stub's every
// generation shares it).
func (a *Authority) Probe(gen Generation) (string, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return "", err
	}
	u := &url.URL{Scheme: "spiffe", Host: a.cfg.TrustDomain.Name(), Path: "/agentmesh/probe"}
	now := time.Now()
	tmpl := &x509.Certificate{SerialNumber: randomSerial(), NotBefore: now.Add(-time.Minute), NotAfter: now.Add(24 * time.Hour),
		URIs: []*url.URL{u}, KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, gen.Intermediate, &key.PublicKey, a.certs.intermediateSigner)
	if err != nil {
		return "", err
	}
	var b strings.Builder
	_ = pem.Encode(&b, &pem.Block{Type: "CERTIFICATE", Bytes: der})
	_ = pem.Encode(&b, &pem.Block{Type: "CERTIFICATE", Bytes: gen.Intermediate.Raw})
	return b.String(), nil
}
