package ca

import (
	"bytes"
	"context"
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/agentmesh/agentmesh/internal/softhsmtest"
	"github.com/agentmesh/agentmesh/internal/testca"
	"github.com/agentmesh/agentmesh/internal/testlog"
	"github.com/agentmesh/agentmesh/meshclient"
)

var testTD = spiffeid.RequireTrustDomainFromString("mesh.test")

// requireSoftHSM skips the test when the SoftHSM2 module is not installed (fails it
// when CI=true).
func requireSoftHSM(tb testing.TB) {
	tb.Helper()
	softhsmtest.Require(tb)
}

// logBuffer collects a test's log output; it is printed when the test fails and lets
// tests assert that secrets never reach the log.
type logBuffer = testlog.Buffer

func newTestLogger(tb testing.TB) (*slog.Logger, *logBuffer) { return testlog.New(tb) }

// testConfig is a CA on 127.0.0.1:0 in a fresh state directory, issuing 1-minute
// SVIDs, logging into the returned buffer.
func testConfig(tb testing.TB) (Config, *logBuffer) {
	tb.Helper()
	logger, logs := newTestLogger(tb)
	return Config{
		StateDir:     filepath.Join(tb.TempDir(), "state"), // New creates it 0700
		TrustDomain:  testTD,
		Listen:       "127.0.0.1:0",
		SVIDLifetime: time.Minute,
		Logger:       logger,
	}, logs
}

// runningCA is a Server whose Run is in progress.
type runningCA struct {
	*Server
	stop func() error
}

// startCA creates and runs a CA; the test's cleanup stops it and waits for Run.
func startCA(tb testing.TB, cfg Config) *runningCA {
	tb.Helper()
	return startCAWith(tb, cfg, nil)
}

// startCAWith is startCA with a hook that can adjust the Server between New and Run
// (before any goroutine of Run reads it).
func startCAWith(tb testing.TB, cfg Config, beforeRun func(*Server)) *runningCA {
	tb.Helper()
	requireSoftHSM(tb)
	start := time.Now()
	srv, err := New(context.Background(), cfg)
	if err != nil {
		tb.Fatalf("New: %v", err)
	}
	tb.Logf("New: %v", time.Since(start))
	if beforeRun != nil {
		beforeRun(srv)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Run(ctx) }()
	var once sync.Once
	var runErr error
	stop := func() error {
		once.Do(func() {
			cancel()
			runErr = <-done
		})
		return runErr
	}
	tb.Cleanup(func() {
		if err := stop(); err != nil {
			tb.Errorf("Run: %v", err)
		}
	})
	return &runningCA{Server: srv, stop: stop}
}

// newClient returns a client of ca whose Enroll uses tokens from ca.Token for id.
func newClient(tb testing.TB, ca *runningCA, token func(context.Context) (string, error)) *meshclient.Client {
	tb.Helper()
	c, err := meshclient.NewClient(meshclient.ClientConfig{URL: ca.URL(), Roots: ca.Roots(), Token: token})
	if err != nil {
		tb.Fatalf("NewClient: %v", err)
	}
	return c
}

// fixedToken is a token source returning tok.
func fixedToken(tok string) func(context.Context) (string, error) {
	return func(context.Context) (string, error) { return tok, nil }
}

func newKey(tb testing.TB) crypto.Signer { return testca.NewKey(tb) }

// enroll gets a token for id from ca and enrols a new key with it.
func enroll(tb testing.TB, ca *runningCA, id spiffeid.ID) *x509svid.SVID {
	tb.Helper()
	tok, err := ca.Token(id)
	if err != nil {
		tb.Fatalf("Token: %v", err)
	}
	key := newKey(tb)
	chain, err := newClient(tb, ca, fixedToken(tok)).Enroll(context.Background(), id, key)
	if err != nil {
		tb.Fatalf("Enroll: %v", err)
	}
	return &x509svid.SVID{ID: id, Certificates: chain, PrivateKey: key}
}

// permanent reports whether err is classified as permanent the way the rotator does.
func permanent(err error) bool {
	var p interface{ Permanent() bool }
	return errors.As(err, &p) && p.Permanent()
}

// httpsClient talks to ca over TLS, presenting cert when not nil.
func httpsClient(tb testing.TB, ca *runningCA, cert *tls.Certificate) *http.Client {
	tb.Helper()
	pool := x509.NewCertPool()
	for _, r := range ca.Roots() {
		pool.AddCert(r)
	}
	tc := &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	if cert != nil {
		tc.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return cert, nil }
	}
	tr := &http.Transport{TLSClientConfig: tc, DisableKeepAlives: true}
	tb.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, Timeout: 10 * time.Second}
}

// tlsCert turns an SVID into the client certificate that authenticates it.
func tlsCert(svid *x509svid.SVID) *tls.Certificate {
	c := &tls.Certificate{PrivateKey: svid.PrivateKey, Leaf: svid.Certificates[0]}
	for _, crt := range svid.Certificates {
		c.Certificate = append(c.Certificate, crt.Raw)
	}
	return c
}

// do sends a request to ca and returns the status and body.
func do(tb testing.TB, hc *http.Client, method, url string, body any) (int, []byte) {
	tb.Helper()
	var r io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			tb.Fatal(err)
		}
		r = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(context.Background(), method, url, r)
	if err != nil {
		tb.Fatal(err)
	}
	resp, err := hc.Do(req)
	if err != nil {
		tb.Fatalf("%s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		tb.Fatal(err)
	}
	return resp.StatusCode, b
}
