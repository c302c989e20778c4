package policy

import (
	"errors"
	"net/netip"
	"strconv"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// PassthroughScheme starts an outbound destination outside the mesh: an address no proxy
// lives at, which a proxy with unknown: passthrough dials directly in plain TCP. An
// outbound rule's to lists such destinations next to SPIFFE IDs:
//
//	passthrough:*                 any address outside the mesh
//	passthrough:203.0.113.0/24    the addresses of a prefix (IPv4 or IPv6)
//	passthrough:2001:db8::7       one address
const PassthroughScheme = "passthrough:"

// addrPattern is one passthrough destination of an outbound rule.
type addrPattern struct {
	prefix netip.Prefix // the addresses selected; unused when any
	any    bool         // passthrough:*
}

// parseAddrPattern accepts only the normalised form, as parsePattern does for IDs: a
// prefix without host bits, no zone, no IPv4-mapped IPv6 (write the IPv4 form), so
// that what the operator reads is exactly what is matched.
func parseAddrPattern(s string) (addrPattern, error) {
	raw := strings.TrimPrefix(s, PassthroughScheme)
	if raw == "*" {
		return addrPattern{any: true}, nil
	}
	var p netip.Prefix
	if strings.Contains(raw, "/") {
		var err error
		if p, err = netip.ParsePrefix(raw); err != nil {
			return addrPattern{}, errors.New("not an address or prefix: " + err.Error())
		}
	} else {
		a, err := netip.ParseAddr(raw)
		if err != nil {
			return addrPattern{}, errors.New("not an address or prefix: " + err.Error())
		}
		if a.Zone() != "" {
			return addrPattern{}, errors.New("an address with a zone is not a destination")
		}
		p = netip.PrefixFrom(a, a.BitLen())
	}
	switch {
	case p.Addr().Is4In6():
		return addrPattern{}, errors.New("IPv4-mapped IPv6: write the IPv4 form")
	case p != p.Masked():
		return addrPattern{}, errors.New("host bits set (want " + PassthroughScheme + p.Masked().String() + ")")
	}
	return addrPattern{prefix: p}, nil
}

func (p addrPattern) match(a netip.Addr) bool {
	if !a.IsValid() {
		return false
	}
	return p.any || p.prefix.Contains(a.Unmap().WithZone(""))
}

func (p addrPattern) String() string {
	if p.any {
		return PassthroughScheme + "*"
	}
	if p.prefix.IsSingleIP() {
		return PassthroughScheme + p.prefix.Addr().String()
	}
	return PassthroughScheme + p.prefix.String()
}

// parseOutboundTo parses the to of an outbound rule: SPIFFE ID patterns and passthrough
// destinations, at least one of either.
func parseOutboundTo(doc *yamlDoc, path string, in []string) ([]pattern, []addrPattern, error) {
	if len(in) == 0 {
		return nil, nil, doc.fieldError(path, "at least one SPIFFE ID or "+PassthroughScheme+" destination required")
	}
	var ids []pattern
	var addrs []addrPattern
	for i, s := range in {
		field := path + "[" + strconv.Itoa(i) + "]"
		if strings.HasPrefix(s, PassthroughScheme) {
			p, err := parseAddrPattern(s)
			if err != nil {
				return nil, nil, doc.fieldError(field, err.Error())
			}
			addrs = append(addrs, p)
			continue
		}
		p, err := parsePattern(s)
		if err != nil {
			return nil, nil, doc.fieldError(field, err.Error())
		}
		ids = append(ids, p)
	}
	return ids, addrs, nil
}

// Passthrough decides whether the local identity src may reach addr outside the mesh: a
// destination no proxy lives at, which the proxy would dial directly in plain TCP. It
// is an outbound call like any other: a parsed policy without outbound rules allows it
// (Rule -1); otherwise the first rule whose from selects src and whose to lists a
// passthrough destination holding addr allows, and no match denies with Rule -1. A
// rule's SPIFFE IDs never select an address, nor its passthrough destinations an ID.
func (a *Authz) Passthrough(src spiffeid.ID, addr netip.Addr) Decision {
	d := Decision{Direction: DirectionOutbound, Rule: -1, Name: defaultRule, Src: src, Addr: addr}
	return a.decideOutbound(d, func(r *outboundRule) bool {
		for _, p := range r.toAddrs {
			if p.match(addr) {
				return true
			}
		}
		return false
	})
}

func joinAddrPatterns(ps []addrPattern) string {
	s := make([]string, len(ps))
	for i, p := range ps {
		s[i] = p.String()
	}
	return strings.Join(s, ", ")
}
