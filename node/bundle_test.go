package node

import (
	"crypto/x509"
	"slices"
	"testing"

	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/agentmesh/agentmesh/internal/testca"
)

// TestBundleInForce: the published roots, the file's the CA did not withdraw (an
// operator's extra CA stays; a retired root leaves, and comes back if published
// again), and the held anchors an SVID still needs.
func TestBundleInForce(t *testing.T) {
	t.Parallel()
	old, next, extra := testca.New(t), testca.New(t), testca.New(t)
	rOld, rNext, rExtra := old.Roots()[0], next.Roots()[0], extra.Roots()[0]
	onOld, onNext := old.SVID(t, testHost), next.SVID(t, testHost)
	for _, tc := range []struct {
		name   string
		file   []*x509.Certificate
		meshes [][]*x509.Certificate // published in turn
		held   []*x509.Certificate
		svids  []*x509svid.SVID
		want   []*x509.Certificate
	}{
		{name: "file before any mesh state", file: []*x509.Certificate{rOld}, want: []*x509.Certificate{rOld}},
		{name: "published with the operator's extra", file: []*x509.Certificate{rOld, rExtra},
			meshes: [][]*x509.Certificate{{rOld}}, want: []*x509.Certificate{rOld, rExtra}},
		{name: "overlap", file: []*x509.Certificate{rOld}, meshes: [][]*x509.Certificate{{rOld}, {rOld, rNext}},
			want: []*x509.Certificate{rOld, rNext}},
		{name: "retired root withdrawn, no SVID needs it", file: []*x509.Certificate{rOld, rExtra},
			meshes: [][]*x509.Certificate{{rOld}, {rOld, rNext}, {rNext}}, held: []*x509.Certificate{rOld, rNext, rExtra},
			svids: []*x509svid.SVID{onNext}, want: []*x509.Certificate{rNext, rExtra}},
		{name: "retired root kept while an SVID needs it", file: []*x509.Certificate{rOld},
			meshes: [][]*x509.Certificate{{rOld}, {rNext}}, held: []*x509.Certificate{rOld},
			svids: []*x509svid.SVID{onNext, onOld}, want: []*x509.Certificate{rNext, rOld}},
		{name: "withdrawn then published again", file: []*x509.Certificate{rOld},
			meshes: [][]*x509.Certificate{{rOld}, {rNext}, {rOld}}, want: []*x509.Certificate{rOld}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := bundleSources{file: tc.file}
			for _, m := range tc.meshes {
				b.setMesh(m)
			}
			got := inForce(b.base(), tc.held, tc.svids)
			if !slices.EqualFunc(got, tc.want, (*x509.Certificate).Equal) {
				t.Fatalf("bundle in force of %d anchors, want %d in order", len(got), len(tc.want))
			}
		})
	}
}
