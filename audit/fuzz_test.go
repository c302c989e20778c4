package audit

import (
	"bytes"
	"errors"
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
