package meshclient

import (
	"context"
	"crypto/x509"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

func TestResponseErrorPermanent(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		status int
		want   bool
	}{
		{http.StatusBadRequest, true},
		{http.StatusUnauthorized, true},
		{http.StatusForbidden, true},
		{http.StatusNotFound, true},
		{http.StatusRequestTimeout, false},
		{http.StatusTooManyRequests, false},
		{http.StatusInternalServerError, false},
		{http.StatusBadGateway, false},
		{http.StatusServiceUnavailable, false},
		{http.StatusOK, false},
	} {
		if got := (&ResponseError{Op: "sign", Status: tc.status}).Permanent(); got != tc.want {
			t.Errorf("Permanent() for %d = %v, want %v", tc.status, got, tc.want)
		}
	}
}

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
				writeStepError(w, tc.status, "nope")
			}))
			defer srv.Close()
			c, err := NewClient(ClientConfig{URL: srv.URL, Roots: []*x509.Certificate{srv.Certificate()}, Token: fixedToken("t")})
			if err != nil {
				t.Fatal(err)
			}
			_, err = c.Enroll(context.Background(), id, newKey(t))
			var re *ResponseError
			if !errors.As(err, &re) || re.Status != tc.status || re.Message != "nope" || re.Op != "sign" {
				t.Fatalf("Enroll: %v, want a ResponseError %d", err, tc.status)
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
		if _, err := c.Enroll(context.Background(), id, newKey(t)); err == nil || permanent(err) {
			t.Errorf("Enroll to a closed port: %v, want a non-permanent error", err)
		}
	})

	t.Run("no token source", func(t *testing.T) {
		t.Parallel()
		c, err := NewClient(ClientConfig{URL: "https://127.0.0.1:1", Roots: []*x509.Certificate{{}}})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.Enroll(context.Background(), id, newKey(t)); !errors.Is(err, ErrNoToken) {
			t.Errorf("Enroll without a token source: %v, want ErrNoToken", err)
		}
	})
}

func TestParseSignResponse(t *testing.T) {
	t.Parallel()
	real, err := os.ReadFile(filepath.Join("testdata", "fuzz", "FuzzParseSignResponse", "step-ca-sign-answer"))
	if err != nil {
		t.Fatal(err)
	}
	answer := corpusBytes(t, real)
	chain, err := parseSignResponse(answer)
	if err != nil || len(chain) != 2 || !chain[1].IsCA || chain[0].IsCA {
		t.Fatalf("real answer: %d certificates, %v", len(chain), err)
	}
	for _, tc := range []struct {
		name string
		in   string
		n    int
	}{
		{"empty object", `{}`, 0},
		{"not json", `<html>`, 0},
		{"error answer", `{"status":401,"message":"no"}`, 0},
		{"bad pem", `{"certChain":["-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"]}`, 0},
		{"other pem type only", `{"crt":"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"}`, 0},
	} {
		got, err := parseSignResponse([]byte(tc.in))
		if err == nil || len(got) != tc.n {
			t.Errorf("%s: %d certificates, err %v", tc.name, len(got), err)
		}
	}
}

// corpusBytes decodes a one-[]byte fuzz corpus file.
func corpusBytes(t *testing.T, file []byte) []byte {
	t.Helper()
	s := strings.TrimSpace(strings.TrimPrefix(string(file), "go test fuzz v1\n"))
	s = strings.TrimSuffix(strings.TrimPrefix(s, "[]byte("), ")")
	out, err := strconv.Unquote(s)
	if err != nil {
		t.Fatal(err)
	}
	return []byte(out)
}

// FuzzParseSignResponse: answers from the network never panic the parser, and a nil
// error always comes with at least one certificate.
func FuzzParseSignResponse(f *testing.F) {
	f.Add([]byte(`{"crt":"","ca":"","certChain":[]}`))
	f.Add([]byte(`{"status":500,"message":"x"}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		chain, err := parseSignResponse(b)
		if err == nil && len(chain) == 0 {
			t.Fatal("no error and no certificate")
		}
		for _, c := range chain {
			if c == nil {
				t.Fatal("nil certificate")
			}
		}
		_ = stepErrorMessage(b)
	})
}
