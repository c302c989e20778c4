package audit

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"errors"
	"os"
	"testing"
)

// This file is in package audit, not audit_test, only because the Go fuzzer instruments the
// package under test for coverage guidance when the target is an internal test; from an
// external test package it mutated blindly (observed with go1.26.8). It uses the exported
// API only.

// FuzzVerify checks that Verify never panics and that its answer is self-consistent.
func FuzzVerify(f *testing.F) {
	f.Fuzz(func(t *testing.T, data []byte) {
		n, err := Verify(bytes.NewReader(data))
		newlines := bytes.Count(data, []byte("\n"))
		if n < 0 || n > newlines {
			t.Fatalf("n = %d with %d newlines", n, newlines)
		}
		if err == nil {
			if n != newlines || (len(data) > 0 && data[len(data)-1] != '\n') {
				t.Fatalf("accepted %d records of %d lines; data ends %q", n, newlines, data[max(0, len(data)-1):])
			}
			return
		}
		ve, ok := errors.AsType[*VerifyError](err)
		if !ok {
			t.Fatalf("err = %v (%T), want *VerifyError from a bytes.Reader", err, err)
		}
		if ve.Line != n+1 || ve.Seq != uint64(n)+1 || ve.Reason == "" {
			t.Fatalf("VerifyError %+v inconsistent with n = %d", ve, n)
		}
	})
}

// FuzzParseCheckpoint checks that ParseCheckpoint never panics and that what it accepts
// is a checkpoint whose text parses back to itself.
func FuzzParseCheckpoint(f *testing.F) {
	f.Fuzz(func(t *testing.T, text string) {
		c, err := ParseCheckpoint(text)
		if err != nil {
			if !errors.Is(err, ErrCheckpoint) {
				t.Fatalf("error %v does not wrap ErrCheckpoint", err)
			}
			return
		}
		again, err := ParseCheckpoint(c.Text())
		if err != nil || again != c {
			t.Fatalf("Text() of %+v parses to %+v, %v", c, again, err)
		}
	})
}

// FuzzParseVerifierKey checks that ParseVerifierKey never panics and that a key it accepts
// round-trips through Key.
func FuzzParseVerifierKey(f *testing.F) {
	f.Fuzz(func(t *testing.T, vkey string) {
		v, err := ParseVerifierKey(vkey)
		if err != nil {
			return
		}
		again, err := ParseVerifierKey(v.Key())
		if err != nil || !again.Equal(v) || again.KeyHash() != v.KeyHash() {
			t.Fatalf("key %q does not round-trip: %v", vkey, err)
		}
	})
}

// fuzzKey is a verifier for the fuzz targets, made afresh: the seeds in testdata are
// signed by keys it does not know, since the targets check parsing, not forgery.
var fuzzKey = func() *NoteVerifier {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		panic(err)
	}
	v, err := NewNoteVerifier("example.org/host/h1/audit", k.Public())
	if err != nil {
		panic(err)
	}
	return v
}()

// FuzzCheckInclusion checks that parsing and checking an inclusion proof document never
// panics, and that nothing it is fed passes without the key's signature.
func FuzzCheckInclusion(f *testing.F) {
	f.Fuzz(func(t *testing.T, doc []byte) {
		p, err := ParseInclusionProof(doc)
		if err != nil {
			return
		}
		if _, err := CheckInclusion(p, fuzzKey); err == nil {
			t.Fatalf("a proof not signed by the key was accepted: %q", doc)
		}
		_, _ = UnverifiedCheckpoint([]byte(p.Checkpoint))
		_, _ = UnverifiedCheckpoint(nil)
	})
}

// FuzzVerifyLog checks that VerifyLog never panics on a file of any content, agrees with
// Verify on the chain, and counts a record per complete good line.
func FuzzVerifyLog(f *testing.F) {
	f.Fuzz(func(t *testing.T, data []byte) {
		path := t.TempDir() + "/audit.log"
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Fatal(err)
		}
		rep, err := VerifyLog(path, VerifyOptions{})
		n, verr := Verify(bytes.NewReader(data))
		if err != nil {
			if _, ok := errors.AsType[*VerifyError](err); !ok {
				t.Fatalf("VerifyLog = %v, want a *VerifyError", err)
			}
			if verr == nil {
				t.Fatalf("VerifyLog = %v, Verify accepted %d records", err, n)
			}
			return
		}
		if uint64(n) != rep.Records {
			t.Fatalf("VerifyLog counts %d records, Verify %d", rep.Records, n)
		}
		if (verr != nil) != (rep.TornBytes > 0) {
			t.Fatalf("VerifyLog accepted with %d torn bytes, Verify = %v", rep.TornBytes, verr)
		}
	})
}
