package meshapi

import (
	"net/netip"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

var testTD = spiffeid.RequireTrustDomainFromString("mesh.test")

func addrs(s ...string) []netip.Addr {
	out := make([]netip.Addr, len(s))
	for i, a := range s {
		out[i] = netip.MustParseAddr(a)
	}
	return out
}

var idA = spiffeid.RequireFromPath(testTD, "/host/a")
