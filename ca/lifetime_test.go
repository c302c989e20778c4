package ca

import (
	"context"
	"fmt"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/agentmesh/agentmesh/meshapi"
)

// SVIDs live for Config.SVIDLifetime (back-dated by min(1m, lifetime/10)), from the
// 10-second minimum up; renewal keeps the lifetime.
func TestSVIDLifetimes(t *testing.T) {
	for _, tc := range []struct {
		name     string
		lifetime time.Duration
	}{
		{"10s minimum", 10 * time.Second},
		{"1m", time.Minute},
		{"1h default", 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg, _ := testConfig(t)
			cfg.SVIDLifetime = tc.lifetime
			want := tc.lifetime
			if want == 0 {
				want = defaultSVIDLifetime
			}
			ca := startCA(t, cfg)
			id := spiffeid.RequireFromPath(testTD, "/workload/lifetime")
			before := time.Now()
			svid := enroll(t, ca, id)
			checkSVID(t, ca, svid.Certificates, id)
			checkLifetime(t, svid.Certificates[0], want, backdate(want), before, time.Now())

			before = time.Now()
			key := newKey(t)
			chain, err := newClient(t, ca, nil).Renew(context.Background(), svid, key)
			if err != nil {
				t.Fatalf("Renew: %v", err)
			}
			checkLifetime(t, chain[0], want, backdate(want), before, time.Now())
			renewed := &x509svid.SVID{ID: id, Certificates: chain, PrivateKey: key}
			if _, err := newClient(t, ca, nil).Renew(context.Background(), renewed, newKey(t)); err != nil {
				t.Fatalf("second Renew: %v", err)
			}
		})
	}
}

// A client asking step-ca directly for more than the maximum is refused (403, permanent),
// not silently given a longer certificate; within the bounds it gets what it asks.
func TestRequestedLifetimeIsBounded(t *testing.T) {
	cfg, _ := testConfig(t)
	ca := startCA(t, cfg) // 1-minute maximum
	for _, tc := range []struct {
		name     string
		notAfter string
		status   int
		lifetime time.Duration
	}{
		{"2m over a 1m maximum", "2m", http.StatusForbidden, 0},
		{"30s within bounds", "30s", http.StatusCreated, 30 * time.Second},
		{"1m at the maximum", "1m", http.StatusCreated, time.Minute},
	} {
		t.Run(tc.name, func(t *testing.T) {
			id := spiffeid.RequireFromPath(testTD, "/workload/greedy")
			tok, err := ca.Token(id)
			if err != nil {
				t.Fatal(err)
			}
			csr, err := meshapi.NewCSR(id, newKey(t))
			if err != nil {
				t.Fatal(err)
			}
			before := time.Now()
			status, body := do(t, httpsClient(t, ca, nil), http.MethodPost, ca.URL()+"/1.0/sign",
				map[string]string{"csr": csr, "ott": tok, "notAfter": tc.notAfter})
			if status != tc.status {
				t.Fatalf("sign with notAfter %s: %d %s, want %d", tc.notAfter, status, body, tc.status)
			}
			if status != http.StatusCreated {
				if re := (&meshapi.ResponseError{Status: status}); !re.Permanent() {
					t.Errorf("status %d is not permanent", status)
				}
				return
			}
			chain, err := meshapi.ParseSignResponse(body)
			if err != nil {
				t.Fatal(err)
			}
			checkLifetime(t, chain[0], tc.lifetime, backdate(cfg.SVIDLifetime), before, time.Now())
		})
	}
}

// Token and issuance are safe for concurrent use (the HSM signs tokens, SVIDs and
// renewals from several goroutines at once).
func TestConcurrentIssuance(t *testing.T) {
	cfg, _ := testConfig(t)
	ca := startCA(t, cfg)
	const workers = 8
	errs := make(chan error, workers)
	var wg sync.WaitGroup
	for i := range workers {
		wg.Go(func() {
			id := spiffeid.RequireFromPath(testTD, fmt.Sprintf("/workload/c%d", i))
			tok, err := ca.Token(id)
			if err != nil {
				errs <- err
				return
			}
			key := newKey(t)
			client := newClient(t, ca, fixedToken(tok))
			chain, err := client.Enroll(context.Background(), id, key)
			if err != nil {
				errs <- err
				return
			}
			_, err = client.Renew(context.Background(), &x509svid.SVID{ID: id, Certificates: chain, PrivateKey: key}, newKey(t))
			errs <- err
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
}
