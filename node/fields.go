package node

import (
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"strconv"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/proxy"
)

// convert validates each entry of a list section and converts it, naming the field of
// the first invalid one.
func convert[In, Out any](section string, in []In, conv func(In) (Out, string, error)) ([]Out, error) {
	var out []Out
	for i, e := range in {
		v, field, err := conv(e)
		if err != nil {
			return nil, fieldError(fmt.Sprintf("%s[%d].%s", section, i, field), err)
		}
		out = append(out, v)
	}
	return out, nil
}

func (r RouteSettings) route() (proxy.Route, string, error) {
	out := proxy.Route{Listen: r.Listen, Peer: r.Peer}
	if err := checkHostPort(r.Listen); err != nil {
		return out, "listen", err
	}
	if err := checkHostPort(r.Peer); err != nil {
		return out, "peer", err
	}
	id, err := parseID(r.PeerID)
	if err != nil {
		return out, "peer_id", err
	}
	out.PeerID = id
	port, err := checkPort(r.TargetPort)
	if err != nil {
		return out, "target_port", err
	}
	out.TargetPort = port
	if r.Transport != "" && !knownTransport(r.Transport) {
		return out, "transport", fmt.Errorf("unknown transport %q: tls, h2 or quic", r.Transport)
	}
	out.Transport = r.Transport
	return out, "", nil
}

// knownTransport reports whether t names a tunnel transport this build speaks.
func knownTransport(t string) bool { return t == "tls" || t == "h2" || t == "quic" }

func (s ServiceSettings) service() (proxy.Service, string, error) {
	port, err := checkPort(s.Port)
	if err != nil {
		return proxy.Service{}, "port", err
	}
	out := proxy.Service{Port: port}
	if len(s.Allow) == 0 {
		return out, "allow", errors.New("at least one SPIFFE ID is required (the default is deny)")
	}
	for i, a := range s.Allow {
		id, err := parseID(a)
		if err != nil {
			return out, fmt.Sprintf("allow[%d]", i), err
		}
		out.Allow = append(out.Allow, id)
	}
	return out, "", nil
}

// ParseID parses a SPIFFE ID written in a file or on a command line.
func ParseID(s string) (spiffeid.ID, error) { return parseID(s) }

func parseID(s string) (spiffeid.ID, error) {
	if s == "" {
		return spiffeid.ID{}, fmt.Errorf("required: a SPIFFE ID (spiffe://trust-domain/path)")
	}
	id, err := spiffeid.FromString(s)
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("invalid SPIFFE ID %q: %w", s, err)
	}
	return id, nil
}

func checkHostPort(addr string) error {
	if addr == "" {
		return errors.New("required: host:port")
	}
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("invalid address %q: %w", addr, err)
	}
	if n, err := strconv.Atoi(port); err != nil || n < 0 || n > 65535 {
		return fmt.Errorf("invalid port in %q", addr)
	}
	return nil
}

func checkPort(p int) (uint16, error) {
	if p < 1 || p > 65535 {
		return 0, fmt.Errorf("port %d out of range 1-65535", p)
	}
	return uint16(p), nil
}

func resolve(base, p string) string {
	if p == "" || filepath.IsAbs(p) {
		return p
	}
	return filepath.Join(base, p)
}

func orDefault(s, def string) string {
	if s == "" {
		return def
	}
	return s
}
