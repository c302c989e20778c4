package ca

import (
	"fmt"
	"net/netip"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/meshapi"
)

// ParseHostClaim parses the addresses an operator gives host to claim (`agentmesh
// register HOST --addr A...`): host must be a host ID, spiffe://TD/host/NAME, and each
// address one that ParseClaimPrefix accepts. Errors wrap ErrInvalidRequest, so a bad
// claim is refused before the CA is asked.
func ParseHostClaim(host spiffeid.ID, addrs []string) ([]netip.Prefix, error) {
	if !oneSegment(host.Path(), meshapi.HostPathPrefix) {
		return nil, invalidClaim("%s is not a host ID (spiffe://%s%sNAME)", host, host.TrustDomain().Name(), meshapi.HostPathPrefix)
	}
	prefixes := make([]netip.Prefix, 0, len(addrs))
	for _, a := range addrs {
		p, err := ParseClaimPrefix(a)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", a, err)
		}
		prefixes = append(prefixes, p)
	}
	return prefixes, nil
}
