package meshapi

import (
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

func TestParseSignResponse(t *testing.T) {
	t.Parallel()
	corpus, err := os.ReadFile(filepath.Join("testdata", "fuzz", "FuzzParseSignResponse", "step-ca-sign-answer"))
	if err != nil {
		t.Fatal(err)
	}
	answer := corpusBytes(t, corpus)
	chain, err := ParseSignResponse(answer)
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
		got, err := ParseSignResponse([]byte(tc.in))
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
		chain, err := ParseSignResponse(b)
		if err == nil && len(chain) == 0 {
			t.Fatal("no error and no certificate")
		}
		for _, c := range chain {
			if c == nil {
				t.Fatal("nil certificate")
			}
		}
		_ = ErrorMessage(b)
	})
}

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
