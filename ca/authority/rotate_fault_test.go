package authority

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/go-chi/chi/v5"
	"go.step.sm/crypto/kms/apiv1"
	"go.step.sm/crypto/x509util"

	"github.com/agentmesh/agentmesh/meshapi"
)

// An abort after activation: Revert makes the old generation active again (and serves
// a certificate from it), DiscardNext deletes the new generation's keys, and the next
// rotation takes a new generation number.
func TestRevertAndDiscard(t *testing.T) {
	a := openRotating(t, "rot-revert")
	startServing(t, a.Authority)
	g1 := a.Active()
	g2, err := a.Prepare(meshapi.RotateIntermediate)
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Activate(); err != nil {
		t.Fatal(err)
	}
	for range 2 {
		if err := a.Revert(); err != nil {
			t.Fatal(err)
		}
	}
	sameGeneration(t, "active after Revert", a.Active(), g1)
	if next, ok := a.Next(); !ok || next.N != g2.N {
		t.Fatalf("next after Revert: %d %v", next.N, ok)
	}
	if _, ok := a.Previous(); ok {
		t.Fatal("a previous generation after Revert")
	}
	if got := servingIssuer(t, a.Authority); got != g1.Intermediate.Subject.CommonName {
		t.Fatalf("serving certificate issued by %s after Revert", got)
	}
	checkFiles(t, a.cfg.StateDir, g1)

	a.restart(t)
	for range 2 {
		if err := a.DiscardNext(); err != nil {
			t.Fatal(err)
		}
	}
	if _, ok := a.Next(); ok || hasKey(t, a.Authority, g2.IntermediateKey) || !hasKey(t, a.Authority, g1.IntermediateKey) {
		t.Fatalf("after DiscardNext: next held %v, its key %v", ok, hasKey(t, a.Authority, g2.IntermediateKey))
	}
	if err := a.Activate(); !errors.Is(err, ErrGenerationState) {
		t.Fatalf("Activate with nothing prepared: %v", err)
	}
	g3, err := a.Prepare(meshapi.RotateRoot)
	if err != nil || g3.N != 3 {
		t.Fatalf("prepared generation %d after a discarded 2: %v", g3.N, err)
	}
	if err := a.DiscardNext(); err != nil {
		t.Fatal(err)
	}
	if hasKey(t, a.Authority, g3.RootKey) || hasKey(t, a.Authority, g3.IntermediateKey) || !hasKey(t, a.Authority, g1.RootKey) {
		t.Fatal("DiscardNext of a root rotation left its keys, or deleted the active root key")
	}
}

// failingKeys refuses to generate one key and to delete another, as a token that is
// full, read-only or unreachable.
type failingKeys struct {
	keyStore
	refuse, refuseDelete string
}

func (k failingKeys) DeleteKey(uri string) error {
	if uri == k.refuseDelete {
		return errTokenFull
	}
	return k.keyStore.DeleteKey(uri)
}

var errTokenFull = errors.New("CKR_DEVICE_MEMORY")

func (k failingKeys) CreateKey(req *apiv1.CreateKeyRequest) (*apiv1.CreateKeyResponse, error) {
	if req.Name == k.refuse {
		return nil, errTokenFull
	}
	return k.keyStore.CreateKey(req)
}

// An HSM refusing key generation (here the second key of a root rotation) fails
// Prepare with ErrHSM, leaves the state directory as it was and no new key in the
// token; once the token works again, Prepare succeeds.
func TestPrepareHSMRefusal(t *testing.T) {
	a := openRotating(t, "rot-fault")
	g1 := a.Active()
	a.km = failingKeys{keyStore: a.km, refuse: IntermediateKeyURI(2)}
	_, err := a.Prepare(meshapi.RotateRoot)
	if !errors.Is(err, ErrHSM) || !errors.Is(err, errTokenFull) {
		t.Fatalf("Prepare with the token refusing: %v, want ErrHSM", err)
	}
	if _, ok := a.Next(); ok {
		t.Fatal("a next generation after a failed Prepare")
	}
	sameGeneration(t, "active after a failed Prepare", a.Active(), g1)
	if hasKey(t, a.Authority, RootKeyURI(2)) {
		t.Fatal("the failed Prepare left its root key in the token")
	}
	for _, f := range []string{filePKI, filepath.Base(genFile("", 2, genRoot))} {
		if _, err := os.Stat(filepath.Join(a.cfg.StateDir, f)); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("the failed Prepare wrote %s: %v", f, err)
		}
	}
	a.restart(t)
	sameGeneration(t, "active after restart", a.Active(), g1)
	if g2, err := a.Prepare(meshapi.RotateRoot); err != nil || g2.N != 2 {
		t.Fatalf("Prepare on a working token: generation %d, %v", g2.N, err)
	}
}

// The anchors are what /roots serves, what the bundle holds and what client
// certificates must chain to; a generation's serving certificate follows Activate.
func TestAnchorsServed(t *testing.T) {
	a := openRotating(t, "rot-anchors")
	startServing(t, a.Authority)
	mux := chi.NewRouter()
	Route(mux)
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() { _ = a.Serve(srv) }()
	t.Cleanup(func() { _ = srv.Close() })

	g1 := a.Active()
	g2, err := a.Prepare(meshapi.RotateRoot)
	if err != nil {
		t.Fatal(err)
	}
	client := probeChain(t, a.Authority, g2)
	if err := a.VerifyClientChain(client, time.Now()); err == nil {
		t.Fatal("a client certificate of the new root verifies before it is an anchor")
	}
	a.SetAnchors([]*x509.Certificate{g1.Root, g2.Root})
	if err := a.VerifyClientChain(client, time.Now()); err != nil {
		t.Fatalf("client certificate of the new root with both anchors: %v", err)
	}
	if n := len(a.Bundle().X509Authorities()); n != 2 {
		t.Fatalf("bundle of %d anchors", n)
	}
	checkServedRoots(t, a.Authority, g1.Root, g1.Root, g2.Root)
	if code := servedStatus(t, a.Authority, g1.Root, "/1.0/root/"+x509util.Fingerprint(g2.Root)); code != http.StatusOK {
		t.Fatalf("GET /1.0/root/ of the new root: %d", code)
	}

	if err := a.Activate(); err != nil {
		t.Fatal(err)
	}
	a.SetAnchors([]*x509.Certificate{g2.Root})
	checkServedRoots(t, a.Authority, g2.Root, g2.Root)
	if code := servedStatus(t, a.Authority, g2.Root, "/root/"+x509util.Fingerprint(g1.Root)); code != http.StatusNotFound {
		t.Fatalf("GET /root/ of the retired root: %d", code)
	}
	if err := a.VerifyClientChain(probeChain(t, a.Authority, g1), time.Now()); err == nil {
		t.Fatal("a client certificate of the retired root verifies")
	}
}

// servedStatus is the status of GET path over TLS trusting only trust.
func servedStatus(t *testing.T, a *Authority, trust *x509.Certificate, path string) int {
	t.Helper()
	c := trustingClient(trust)
	defer c.CloseIdleConnections()
	resp, err := c.Get(a.URL() + path)
	if err != nil {
		t.Fatalf("GET %s: %v", path, err)
	}
	_ = resp.Body.Close()
	return resp.StatusCode
}

func trustingClient(trust *x509.Certificate) *http.Client {
	pool := x509.NewCertPool()
	pool.AddCert(trust)
	return &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
}

// checkServedRoots fetches /roots.pem and /1.0/roots over TLS trusting only trust (so
// the serving certificate must chain to it) and checks they are want.
func checkServedRoots(t *testing.T, a *Authority, trust *x509.Certificate, want ...*x509.Certificate) {
	t.Helper()
	c := trustingClient(trust)
	defer c.CloseIdleConnections()
	get := func(path string) []byte {
		resp, err := c.Get(a.URL() + path)
		if err != nil {
			t.Fatalf("GET %s: %v", path, err)
		}
		defer func() { _ = resp.Body.Close() }()
		b, err := io.ReadAll(resp.Body)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	var got []*x509.Certificate
	for b, rest := pem.Decode(get("/roots.pem")); b != nil; b, rest = pem.Decode(rest) {
		cert, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, cert)
	}
	var js struct {
		Crts []string `json:"crts"`
	}
	if err := json.Unmarshal(get("/1.0/roots"), &js); err != nil {
		t.Fatal(err)
	}
	if len(got) != len(want) || len(js.Crts) != len(want) {
		t.Fatalf("served %d roots in PEM, %d in JSON, want %d", len(got), len(js.Crts), len(want))
	}
	for i := range want {
		if !got[i].Equal(want[i]) {
			t.Fatalf("served root %d is %s, want %s", i, got[i].Subject, want[i].Subject)
		}
	}
}

// Open checks every generation's keys against its certificates: a prepared generation
// whose key left the token behind the CA's back is an HSM error, not a silent loss.
func TestOpenChecksGenerationKeys(t *testing.T) {
	a := openRotating(t, "rot-open")
	g2, err := a.Prepare(meshapi.RotateIntermediate)
	if err != nil {
		t.Fatal(err)
	}
	if err := a.km.DeleteKey(g2.IntermediateKey); err != nil {
		t.Fatal(err)
	}
	if err := a.Close(nil); err != nil {
		t.Fatal(err)
	}
	b, err := Open(t.Context(), a.cfg)
	if err == nil {
		_ = b.Close(nil)
	}
	a.Authority = nil
	if !errors.Is(err, ErrHSM) {
		t.Fatalf("Open with generation 2's key missing: %v, want ErrHSM", err)
	}
}

// A DestroyPrevious the token fails (or a crash interrupts) after it forgot the
// generation still deletes its key when run again after a restart.
func TestDestroyResumes(t *testing.T) {
	a := openRotating(t, "rot-destroy")
	g1 := a.Active()
	if _, err := a.Prepare(meshapi.RotateIntermediate); err != nil {
		t.Fatal(err)
	}
	if err := a.Activate(); err != nil {
		t.Fatal(err)
	}
	a.km = failingKeys{keyStore: a.km, refuseDelete: g1.IntermediateKey}
	if err := a.DestroyPrevious(); !errors.Is(err, ErrHSM) {
		t.Fatalf("DestroyPrevious with the token failing: %v, want ErrHSM", err)
	}
	if !hasKey(t, a.Authority, g1.IntermediateKey) {
		t.Fatal("the key is gone although the token refused")
	}
	a.restart(t)
	if _, ok := a.Previous(); ok {
		t.Fatal("the generation being destroyed is held again after restart")
	}
	if err := a.DestroyPrevious(); err != nil {
		t.Fatal(err)
	}
	if hasKey(t, a.Authority, g1.IntermediateKey) {
		t.Fatal("the interrupted deletion was not completed")
	}
}
