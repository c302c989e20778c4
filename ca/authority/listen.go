package authority

import (
	"context"
	"fmt"
	"net"
	"os"
	"slices"
	"strconv"

	"go.step.sm/crypto/x509util"
)

// Listen binds the HTTPS listener step-ca is served on (listen; port 0 picks a free
// port) and names the endpoint: the URL local clients use and the DNS names of the
// serving certificate (dnsNames, or defaults, plus the URL's host), the first of which
// is the audience of bootstrap tokens. Call it once, after Open and before Start or
// Token.
func (a *Authority) Listen(ctx context.Context, listen string, dnsNames []string) error {
	var lc net.ListenConfig
	ln, err := lc.Listen(ctx, "tcp", listen)
	if err != nil {
		return fmt.Errorf("listen %s: %w", listen, err)
	}
	a.ln = ln
	port := strconv.Itoa(ln.Addr().(*net.TCPAddr).Port)
	urlHost := localURLHost(listen, ln.Addr())
	a.url = "https://" + net.JoinHostPort(urlHost, port)
	a.dnsNames = serverNames(dnsNames, listen, urlHost)
	audience := "https://" + net.JoinHostPort(a.dnsNames[0], port) + "/1.0/sign"
	a.tokens, err = newTokenIssuer(a.cfg.TrustDomain, a.provKey, a.provisioner.Key.KeyID, audience,
		func() string { return x509util.Fingerprint(a.Root()) }, a.cfg.TokenLifetime)
	return err
}

// Addr is the bound address of the HTTPS listener.
func (a *Authority) Addr() net.Addr { return a.ln.Addr() }

// URL is the base URL local clients use for the HTTPS API, https://127.0.0.1:PORT when
// the listener is on all interfaces, else https://LISTEN-HOST:PORT. Its host is always in
// the serving certificate.
func (a *Authority) URL() string { return a.url }

// specificHost returns the host of a listen address when it names one interface (not
// empty, not 0.0.0.0 or ::).
func specificHost(listen string) (string, bool) {
	host, _, err := net.SplitHostPort(listen)
	if err != nil || host == "" {
		return "", false
	}
	if ip := net.ParseIP(host); ip != nil && ip.IsUnspecified() {
		return "", false
	}
	return host, true
}

// serverNames returns the names of the serving certificate: the configured ones or
// the defaults, plus urlHost when missing.
func serverNames(configured []string, listen, urlHost string) []string {
	names := configured
	if len(names) == 0 {
		names = []string{"localhost", "127.0.0.1", "::1"}
		if h, ok := specificHost(listen); ok {
			names = append(names, h)
		}
		if h, err := os.Hostname(); err == nil && h != "" {
			names = append(names, h)
		}
	}
	names = append(names, urlHost)
	out := make([]string, 0, len(names))
	for _, n := range names {
		if n != "" && !slices.Contains(out, n) {
			out = append(out, n)
		}
	}
	return out
}

// localURLHost is the host local clients should use to reach a listener bound at
// bound, configured as listen: the listen host when specific, else loopback.
func localURLHost(listen string, bound net.Addr) string {
	if h, ok := specificHost(listen); ok {
		return h
	}
	if tcp, ok := bound.(*net.TCPAddr); ok && tcp.IP != nil && !tcp.IP.IsUnspecified() {
		return tcp.IP.String()
	}
	return "127.0.0.1"
}
