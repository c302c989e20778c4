package meshapi

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/internal/svidrules"
)

// The mesh API, under /mesh/v1 on the HTTPS API. Every request must present an
// X509-SVID of the CA's trust domain; see docs/directory.md.
const (
	Prefix          = "/mesh/v1"
	RegisterPath    = "/register"
	DirectoryPath   = "/directory"
	RevokePath      = "/revoke"
	RevocationsPath = "/revocations"
	// ReinstatePath takes a ReinstateRequest, from /admin/* SVIDs.
	ReinstatePath = "/reinstate"
	// AgentTokenPath is where a proxy asks for a bootstrap token for an agent
	// registered to its host.
	AgentTokenPath = "/agents/token"

	// MaxRegisterBody bounds a registration, its ProxyStatus included.
	MaxRegisterBody = 512 << 10
	// MaxDirectoryResponse bounds a directory document a client reads: ~250 bytes an
	// entry, so room for tens of thousands of proxies.
	MaxDirectoryResponse = 16 << 20
	DefaultWatchWait     = 25 * time.Second
	MaxWatchWait         = 60 * time.Second
	// WatchGrace is added to a long-poll's wait for the server's write deadline and
	// the client's request timeout.
	WatchGrace = 10 * time.Second

	MaxAddresses     = 32
	maxTransports    = 8
	maxTransportLen  = 32
	maxBundleVersion = 128

	// HostPathPrefix is the path prefix of proxy (host) IDs, the only ones that may
	// register: an agent's SVID must not be able to claim a host's addresses.
	HostPathPrefix = "/host/"
	// AdminPathPrefix is the path prefix of operator IDs, the only ones that may
	// revoke over the mesh API.
	AdminPathPrefix = "/admin/"
)

// HostRegistration is a validated register request: what a proxy claims, under the ID
// its certificate proves. Addresses are unmapped, zone-less, sorted and unique.
type HostRegistration struct {
	ID            spiffeid.ID
	Addresses     []netip.Addr
	TunnelPort    uint16
	Transports    []string
	BundleVersion string
}

// IsHostID reports whether id names a proxy: /host/<name>.
func IsHostID(id spiffeid.ID) bool {
	return strings.HasPrefix(id.Path(), HostPathPrefix) && len(id.Path()) > len(HostPathPrefix)
}

// DecodeStrict decodes exactly one JSON value with no unknown fields from r.
func DecodeStrict(r io.Reader, v any) error {
	dec := json.NewDecoder(r)
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return err
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return errors.New("trailing data after the JSON object")
	}
	return nil
}

// ParseRegistration validates a register request for id and normalises it: addresses
// unmapped (::ffff:10.0.0.1 is 10.0.0.1, as peers look it up), sorted and unique;
// transports default to ["tls"] and are deduplicated in order.
func ParseRegistration(id spiffeid.ID, req RegisterRequest) (HostRegistration, error) {
	reg := HostRegistration{ID: id, BundleVersion: req.BundleVersion}
	if len(req.Addresses) == 0 || len(req.Addresses) > MaxAddresses {
		return reg, fmt.Errorf("addresses: need 1 to %d, got %d", MaxAddresses, len(req.Addresses))
	}
	for _, s := range req.Addresses {
		a, err := netip.ParseAddr(s)
		if err != nil {
			return reg, fmt.Errorf("addresses: %w", err)
		}
		if err := CheckAdvertisable(a); err != nil {
			return reg, fmt.Errorf("addresses: %w", err)
		}
		reg.Addresses = append(reg.Addresses, a.Unmap())
	}
	slices.SortFunc(reg.Addresses, netip.Addr.Compare)
	reg.Addresses = slices.Compact(reg.Addresses)

	if req.TunnelPort < 1 || req.TunnelPort > 65535 {
		return reg, fmt.Errorf("tunnel_port %d is outside 1-65535", req.TunnelPort)
	}
	reg.TunnelPort = uint16(req.TunnelPort)

	transports, err := NormaliseTransports(req.Transports)
	if err != nil {
		return reg, err
	}
	reg.Transports = transports

	if len(req.BundleVersion) > maxBundleVersion || !Printable(req.BundleVersion) {
		return reg, fmt.Errorf("bundle_version: at most %d printable ASCII characters", maxBundleVersion)
	}
	return reg, nil
}

// CheckAdvertisable refuses addresses no peer could dial: zoned (meaningful on one host
// only), unspecified, multicast.
func CheckAdvertisable(a netip.Addr) error {
	switch {
	case a.Zone() != "":
		return fmt.Errorf("%s has a zone", a)
	case a.Unmap().IsUnspecified():
		return fmt.Errorf("%s is unspecified", a)
	case a.IsMulticast():
		return fmt.Errorf("%s is multicast", a)
	}
	return nil
}

// NormaliseTransports checks transport names (lowercase letters, digits and '-',
// unknown ones allowed so that newer proxies can advertise them and older peers
// ignore them) and drops duplicates, keeping the order of preference.
func NormaliseTransports(in []string) ([]string, error) {
	if len(in) == 0 {
		return []string{"tls"}, nil
	}
	if len(in) > maxTransports {
		return nil, fmt.Errorf("transports: at most %d", maxTransports)
	}
	out := make([]string, 0, len(in))
	for _, t := range in {
		if !validTransport(t) {
			return nil, fmt.Errorf("transports: %q is not a transport name", t)
		}
		if !slices.Contains(out, t) {
			out = append(out, t)
		}
	}
	return out, nil
}

func validTransport(t string) bool {
	if t == "" || len(t) > maxTransportLen {
		return false
	}
	for _, c := range t {
		if (c < 'a' || c > 'z') && (c < '0' || c > '9') && c != '-' {
			return false
		}
	}
	return true
}

// Printable reports whether s is printable ASCII.
func Printable(s string) bool {
	for i := range len(s) {
		if s[i] < 0x20 || s[i] > 0x7e {
			return false
		}
	}
	return true
}

// ParseWatchQuery reads the long-poll parameters: since (a version, default 0) and
// wait (a Go duration such as "25s", default 25s, capped at 60s; 0 answers at once).
func ParseWatchQuery(since, wait string) (uint64, time.Duration, error) {
	var v uint64
	if since != "" {
		var err error
		if v, err = strconv.ParseUint(since, 10, 64); err != nil {
			return 0, 0, fmt.Errorf("since %q is not a version", since)
		}
	}
	d := DefaultWatchWait
	if wait != "" {
		var err error
		if d, err = time.ParseDuration(wait); err != nil || d < 0 {
			return 0, 0, fmt.Errorf("wait %q is not a non-negative duration such as 25s", wait)
		}
	}
	return v, min(d, MaxWatchWait), nil
}

// CheckWorkloadID returns an error wrapping ErrInvalidID unless id is a workload ID
// in td: not empty, in td, with a path, of at most svidrules.MaxIDLength bytes.
func CheckWorkloadID(td spiffeid.TrustDomain, id spiffeid.ID) error {
	switch {
	case id.IsZero():
		return fmt.Errorf("%w: empty", ErrInvalidID)
	case !id.MemberOf(td):
		return fmt.Errorf("%w: %s is not in trust domain %s", ErrInvalidID, id, td.Name())
	case id.Path() == "":
		return fmt.Errorf("%w: %s has no path", ErrInvalidID, id)
	case len(id.String()) > svidrules.MaxIDLength:
		return fmt.Errorf("%w: %d bytes, a SPIFFE ID has at most %d", ErrInvalidID, len(id.String()), svidrules.MaxIDLength)
	}
	return nil
}
