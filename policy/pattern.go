package policy

import (
	"errors"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// pattern is one SPIFFE ID selector of an authorization rule: either an exact ID or,
// when written with a trailing "/*", every ID strictly below a base ID.
type pattern struct {
	base   spiffeid.ID
	prefix bool // matches base's descendants only, never base itself
}

// parsePattern accepts only the normalised form of a SPIFFE ID (optionally followed
// by "/*"). spiffeid already refuses percent-encoding, uppercase trust domains, dot
// and empty segments, a trailing slash, query and fragment; comparing with String()
// also refuses anything the parser would have rewritten, so what the operator reads
// in the file is exactly what is matched.
func parsePattern(s string) (pattern, error) {
	p := pattern{}
	raw := s
	if strings.HasSuffix(s, "/*") {
		p.prefix = true
		raw = strings.TrimSuffix(s, "/*")
	}
	if strings.Contains(raw, "*") {
		return pattern{}, errors.New(`"*" is only allowed as a whole last segment ("/*")`)
	}
	id, err := spiffeid.FromString(raw)
	if err != nil {
		return pattern{}, err
	}
	if id.String() != raw {
		return pattern{}, errors.New("not in normalised form (want " + id.String() + ")")
	}
	p.base = id
	return p, nil
}

// match reports whether id is selected. Comparison is byte-wise on normalised IDs, so
// case or encoding variants never match; a prefix requires a "/" boundary, so
// spiffe://td/a/* never selects spiffe://td/ab nor spiffe://td/a.
func (p pattern) match(id spiffeid.ID) bool {
	if id.IsZero() || p.base.IsZero() {
		return false
	}
	if id.TrustDomain() != p.base.TrustDomain() {
		return false
	}
	if !p.prefix {
		return id.Path() == p.base.Path()
	}
	base, path := p.base.Path(), id.Path()
	return len(path) > len(base)+1 && path[len(base)] == '/' && strings.HasPrefix(path, base)
}

func (p pattern) String() string {
	if p.prefix {
		return p.base.String() + "/*"
	}
	return p.base.String()
}

func matchAny(ps []pattern, id spiffeid.ID) bool {
	for _, p := range ps {
		if p.match(id) {
			return true
		}
	}
	return false
}
