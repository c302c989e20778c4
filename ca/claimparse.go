package ca

import (
	"fmt"
	"net/netip"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// IsHostID reports whether id names a host's proxy (spiffe://TD/host/...), as opposed to
// an agent or an administrator.
func IsHostID(id spiffeid.ID) bool { return strings.HasPrefix(id.Path(), hostPathPrefix) }

// ParseHostClaim parses the addresses an operator gives host to claim (`agentmesh
// register HOST --addr A...`): host must be a host ID, spiffe://TD/host/NAME, and each
// address one that ParseClaimPrefix accepts. Errors wrap ErrInvalidRequest, so a bad
// claim is refused before the CA is asked.
func ParseHostClaim(host spiffeid.ID, addrs []string) ([]netip.Prefix, error) {
	if !oneSegment(host.Path(), hostPathPrefix) {
		return nil, invalidClaim("%s is not a host ID (spiffe://%s%sNAME)", host, host.TrustDomain().Name(), hostPathPrefix)
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
