package meshapi

import (
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/agentmesh/agentmesh/internal/testca"
)

// The trust bundle a directory carries decodes to the CA's roots, named by the digest a
// proxy reports; a document without one decodes to none, and a bundle that is not CA
// certificates in PEM, or whose version does not name them, refuses the document.
func TestDecodeBundle(t *testing.T) {
	t.Parallel()
	ca, coming := testca.New(t, testca.WithTrustDomain(testTD)), testca.New(t, testca.WithTrustDomain(testTD))
	roots := append(ca.Roots(), coming.Roots()...)
	good := NewBundleDocument(roots)
	leaf := NewBundleDocument(ca.SVID(t, idA).Certificates[:1])
	for _, tc := range []struct {
		name   string
		bundle *BundleDocument
		want   []string // the roots' subjects; nil: no bundle
		err    string   // "": accepted
	}{
		{name: "none", bundle: nil},
		{name: "two roots", bundle: good, want: []string{roots[0].Subject.String(), roots[1].Subject.String()}},
		{name: "wrong version", bundle: &BundleDocument{Version: "0123456789abcdef", Roots: good.Roots}, err: "does not name its roots"},
		{name: "no roots", bundle: &BundleDocument{Version: BundleVersion(nil)}, err: "no roots"},
		{name: "trailing text", bundle: &BundleDocument{Version: good.Version, Roots: good.Roots + "junk"}, err: "not PEM"},
		{name: "a leaf", bundle: leaf, err: "is not a CA"},
		{name: "a key", bundle: &BundleDocument{Version: good.Version, Roots: "-----BEGIN PRIVATE KEY-----\nAA==\n-----END PRIVATE KEY-----\n"}, err: "PRIVATE KEY block"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b, err := json.Marshal(DirectoryDocument{Version: 3, Bundle: tc.bundle})
			if err != nil {
				t.Fatal(err)
			}
			st, err := DecodeState(b, idA)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("DecodeState = %v, want an error with %q", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, c := range st.Bundle() {
				got = append(got, c.Subject.String())
			}
			if !slices.Equal(got, tc.want) {
				t.Fatalf("roots %v, want %v", got, tc.want)
			}
			if want := ""; tc.bundle != nil {
				want = BundleVersion(roots)
				if st.BundleVersion() != want {
					t.Fatalf("version %q, want %q", st.BundleVersion(), want)
				}
			} else if st.BundleVersion() != want {
				t.Fatalf("version %q without a bundle", st.BundleVersion())
			}
			// The directory keeps the bundle across a deny-list, and a new directory
			// brings its own.
			if next := st.WithDenyList(&DenyList{Version: 1}); next.BundleVersion() != st.BundleVersion() {
				t.Fatal("a deny-list changed the bundle")
			}
		})
	}
}

// An older document (no bundle field) and one of this version both decode; the field
// is left out when there is no bundle.
func TestBundleOptional(t *testing.T) {
	t.Parallel()
	b, err := json.Marshal(DirectoryDocument{Version: 1})
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(b), "bundle") {
		t.Fatalf("document without a bundle encodes one: %s", b)
	}
	seed := filepath.Join("testdata", "fuzz", "FuzzDirectoryResponse", "bundle")
	raw, err := os.ReadFile(seed)
	if err != nil {
		t.Fatal(err)
	}
	st, err := DecodeState(corpusBytes(t, raw), idA)
	if err != nil || len(st.Bundle()) != 1 || st.BundleVersion() == "" {
		t.Fatalf("seed %s: %v, %d roots", seed, err, len(st.Bundle()))
	}
}
