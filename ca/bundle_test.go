package ca

import (
	"crypto/tls"
	"net/http"
	"testing"
	"time"

	"github.com/agentmesh/agentmesh/internal/testrun"
	"github.com/agentmesh/agentmesh/meshapi"
	"github.com/agentmesh/agentmesh/meshclient"
)

// The directory document carries the trust bundle, the CA's roots named by the
// digest proxies report, on the mesh API and on the admin socket; a proxy's Watch
// publishes it in its State.
func TestDirectoryCarriesBundle(t *testing.T) {
	cfg, _ := testConfig(t)
	ca := startCA(t, cfg)
	svid := enroll(t, ca, idSelf)
	want := meshapi.BundleVersion(ca.Roots())

	status, body := do(t, httpsClient(t, ca, tlsCert(svid)), http.MethodGet, ca.URL()+meshapi.Prefix+meshapi.DirectoryPath+"?wait=0s", nil)
	doc := decodeJSON[meshapi.DirectoryDocument](t, body)
	if status != http.StatusOK || doc.Bundle == nil || doc.Bundle.Version != want {
		t.Fatalf("directory: %d, bundle %+v, want version %s", status, doc.Bundle, want)
	}
	roots, err := meshapi.ParseBundle(doc.Bundle)
	if err != nil || len(roots) != 1 || !roots[0].Equal(ca.Roots()[0]) {
		t.Fatalf("bundle roots %v, %v; want the CA's root", roots, err)
	}
	admin, err := RequestDirectory(t.Context(), cfg.StateDir)
	if err != nil || admin.Bundle == nil || admin.Bundle.Version != want {
		t.Fatalf("admin directory bundle %+v, %v", admin.Bundle, err)
	}

	logger, _ := newTestLogger(t)
	w, err := meshclient.NewWatch(meshclient.Config{URL: ca.URL(), Roots: ca.Roots(), Logger: logger,
		Certificate: func() (*tls.Certificate, error) { return tlsCert(svid), nil }})
	if err != nil {
		t.Fatal(err)
	}
	testrun.Start(t, w.Run)
	st := newStateFollower(w, time.Now()).next(t, "a bundle", func(_, next *meshapi.State) bool {
		return next.BundleVersion() != ""
	})
	if st.BundleVersion() != want || len(st.Bundle()) != 1 || !st.Bundle()[0].Equal(ca.Roots()[0]) {
		t.Fatalf("published bundle %s of %d roots, want %s", st.BundleVersion(), len(st.Bundle()), want)
	}
}
