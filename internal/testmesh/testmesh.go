// Package testmesh holds the names the mesh packages' tests share: their trust domain
// and address lists.
package testmesh

import (
	"net/netip"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// TD is the trust domain of the tests.
var TD = spiffeid.RequireTrustDomainFromString("mesh.test")

// Addrs parses each of s as an IP address.
func Addrs(s ...string) (out []netip.Addr) {
	for _, a := range s {
		out = append(out, netip.MustParseAddr(a))
	}
	return out
}
