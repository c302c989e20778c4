package svidrules_test

import (
	"crypto/x509"
	"errors"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/internal/svidrules"
	"github.com/agentmesh/agentmesh/internal/testca"
)

func TestCheckLeaf(t *testing.T) {
	t.Parallel()
	ca := testca.New(t)
	id := spiffeid.RequireFromString("spiffe://example.org/host/a")
	tests := []struct {
		name string
		eku  []x509.ExtKeyUsage
		ku   x509.KeyUsage // 0: digitalSignature, the mesh's; -1: no key usage extension
		id   spiffeid.ID
		role svidrules.Role
		want svidrules.Rule // "" for none
	}{
		{name: "both_usages_client", eku: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}, id: id, role: svidrules.Client},
		{name: "both_usages_server", eku: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}, id: id, role: svidrules.Server},
		{name: "no_extension", id: id, role: svidrules.Client},
		{name: "any_usage", eku: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}, id: id, role: svidrules.Server},
		{name: "server_only_as_client", eku: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}, id: id, role: svidrules.Client, want: svidrules.RuleKeyUsage},
		{name: "client_only_as_server", eku: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}, id: id, role: svidrules.Server, want: svidrules.RuleKeyUsage},
		{name: "code_signing_as_client", eku: []x509.ExtKeyUsage{x509.ExtKeyUsageCodeSigning}, id: id, role: svidrules.Client, want: svidrules.RuleKeyUsage},
		{name: "id_2048_bytes", id: testca.LongID(t, ca.TrustDomain(), 2048), role: svidrules.Client},
		{name: "no_key_usage", ku: -1, id: id, role: svidrules.Client, want: svidrules.RuleDigitalSignature},
		{name: "key_encipherment_only", ku: x509.KeyUsageKeyEncipherment, id: id, role: svidrules.Server, want: svidrules.RuleDigitalSignature},
		{name: "digital_signature_and_more", ku: x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment, id: id, role: svidrules.Server},
		{name: "id_2049_bytes", id: testca.LongID(t, ca.TrustDomain(), 2049), role: svidrules.Client, want: svidrules.RuleIDLength},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			opts := []testca.IssueOption{testca.WithExtKeyUsage(tc.eku...)}
			switch {
			case tc.ku < 0:
				opts = append(opts, testca.WithKeyUsage(0))
			case tc.ku > 0:
				opts = append(opts, testca.WithKeyUsage(tc.ku))
			}
			leaf := ca.SVID(t, tc.id, opts...).Certificates[0]
			checkRule(t, svidrules.CheckLeaf(leaf, tc.role), tc.want)
		})
	}
}

func TestCheckDepth(t *testing.T) {
	t.Parallel()
	ca := testca.New(t)
	id := spiffeid.RequireFromString("spiffe://example.org/host/a")
	tests := []struct {
		name  string
		chain []*x509.Certificate
		max   int
		want  svidrules.Rule
	}{
		{name: "mesh_chain", chain: ca.SVID(t, id).Certificates, max: 1},
		{name: "root_sent_along", chain: append(ca.SVID(t, id).Certificates, ca.Roots()...), max: 1},
		{name: "leaf_only", chain: ca.SVID(t, id).Certificates[:1], max: 1},
		{name: "two_of_two", chain: ca.DeepSVID(t, id, 2).Certificates, max: 2},
		{name: "two_of_one", chain: ca.DeepSVID(t, id, 2).Certificates, max: 1, want: svidrules.RuleChainDepth},
		{name: "five_of_four", chain: ca.DeepSVID(t, id, 5).Certificates, max: svidrules.MaxIntermediatesLimit, want: svidrules.RuleChainDepth},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			checkRule(t, svidrules.CheckDepth(tc.chain, ca.Roots(), tc.max), tc.want)
		})
	}
}

func checkRule(t *testing.T, err error, want svidrules.Rule) {
	t.Helper()
	if want == "" {
		if err != nil {
			t.Fatalf("refused: %v", err)
		}
		return
	}
	var v *svidrules.ViolationError
	if !errors.As(err, &v) || v.Rule != want || !errors.Is(err, svidrules.ErrViolation) {
		t.Fatalf("got %v, want a violation of %s", err, want)
	}
}
