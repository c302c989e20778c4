package meshclient

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/internal/testca"
	"github.com/agentmesh/agentmesh/meshapi"
)

func TestNewClientValidates(t *testing.T) {
	t.Parallel()
	root := &x509.Certificate{}
	for _, tc := range []struct {
		name string
		cfg  ClientConfig
		ok   bool
	}{
		{"ok", ClientConfig{URL: "https://ca.mesh.test:9443", Roots: []*x509.Certificate{root}}, true},
		{"http", ClientConfig{URL: "http://ca.mesh.test:9443", Roots: []*x509.Certificate{root}}, false},
		{"no host", ClientConfig{URL: "https:///x", Roots: []*x509.Certificate{root}}, false},
		{"garbage", ClientConfig{URL: "::", Roots: []*x509.Certificate{root}}, false},
		{"no roots", ClientConfig{URL: "https://ca.mesh.test:9443"}, false},
		{"negative timeout", ClientConfig{URL: "https://ca:1", Roots: []*x509.Certificate{root}, Timeout: -1}, false},
	} {
		_, err := NewClient(tc.cfg)
		if tc.ok != (err == nil) || (err != nil && !errors.Is(err, ErrInvalidConfig)) {
			t.Errorf("%s: NewClient = %v", tc.name, err)
		}
	}
}

// Errors are classified the way the rotator needs: a refusal is permanent, an outage or
// throttling is not. The CA side is a fake only because the real one cannot be made to
// answer 429 or 503 on demand.
func TestClientErrorClassification(t *testing.T) {
	t.Parallel()
	id := spiffeid.RequireFromPath(testTD, "/agent/x")
	for _, tc := range []struct {
		status    int
		permanent bool
	}{
		{http.StatusBadRequest, true},
		{http.StatusUnauthorized, true},
		{http.StatusForbidden, true},
		{http.StatusRequestTimeout, false},
		{http.StatusTooManyRequests, false},
		{http.StatusInternalServerError, false},
		{http.StatusServiceUnavailable, false},
	} {
		t.Run(http.StatusText(tc.status), func(t *testing.T) {
			t.Parallel()
			srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
				w.WriteHeader(tc.status)
				_, _ = fmt.Fprintf(w, `{"status":%d,"message":"nope"}`, tc.status)
			}))
			defer srv.Close()
			c, err := NewClient(ClientConfig{URL: srv.URL, Roots: []*x509.Certificate{srv.Certificate()}, Token: fixedToken("t")})
			if err != nil {
				t.Fatal(err)
			}
			_, err = c.Enroll(context.Background(), id, testca.NewKey(t))
			var re *meshapi.ResponseError
			if !errors.As(err, &re) || re.Status != tc.status || re.Message != "nope" || re.Op != "sign" {
				t.Fatalf("Enroll: %v, want a meshapi.ResponseError %d", err, tc.status)
			}
			if permanent(err) != tc.permanent {
				t.Errorf("permanent = %v, want %v", permanent(err), tc.permanent)
			}
		})
	}

	t.Run("connection refused", func(t *testing.T) {
		t.Parallel()
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := ln.Addr().String()
		_ = ln.Close()
		c, err := NewClient(ClientConfig{URL: "https://" + addr, Roots: []*x509.Certificate{{}}, Token: fixedToken("t")})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.Enroll(context.Background(), id, testca.NewKey(t)); err == nil || permanent(err) {
			t.Errorf("Enroll to a closed port: %v, want a non-permanent error", err)
		}
	})

	t.Run("no token source", func(t *testing.T) {
		t.Parallel()
		c, err := NewClient(ClientConfig{URL: "https://127.0.0.1:1", Roots: []*x509.Certificate{{}}})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.Enroll(context.Background(), id, testca.NewKey(t)); !errors.Is(err, ErrNoToken) {
			t.Errorf("Enroll without a token source: %v, want ErrNoToken", err)
		}
	})
}
