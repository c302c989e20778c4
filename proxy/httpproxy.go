package proxy

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"net/http"
	"net/netip"
	"net/url"
	"strconv"
	"strings"
)

// HTTP/1.1 proxying as the explicit listener speaks it (RFC 9110, 9112):
// CONNECT host:port, answered "200 Connection Established" and then spliced,
// and absolute-URI requests (GET http://host:port/path), rewritten to origin
// form and forwarded with the rest of the connection. One request per
// connection on that path: the forwarded request says "Connection: close".
const (
	// maxRequestHead bounds the request line plus headers: what a client
	// can make the proxy hold before a destination is known.
	maxRequestHead = 16 << 10

	connectEstablished = "HTTP/1.1 200 Connection Established\r\n\r\n"
)

// httpRequest is a parsed proxy request.
type httpRequest struct {
	method  string
	connect bool       // CONNECT: splice after "200 Connection Established"
	addr    netip.Addr // the destination when the request names an IP literal
	host    string     // else the host name to resolve
	port    uint16     // never 0
	// head is, for an absolute-URI request, the request to forward: origin
	// form, Host from the URI, hop-by-hop headers removed, "Connection:
	// close". Nil for CONNECT.
	head []byte
}

// authority is host:port as the request named it, for logs and records.
func (r httpRequest) authority() string {
	h := r.host
	if r.addr.IsValid() {
		h = r.addr.String()
	}
	return joinHostPort(h, r.port)
}

// hopByHop are the headers that describe the client's connection to the
// proxy, not the request (RFC 9110 7.6.1), and are never forwarded. Upgrade
// goes too: with one request per connection there is nothing to upgrade
// (clients tunnel WebSockets with CONNECT).
var hopByHop = []string{"Connection", "Proxy-Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE", "Upgrade"}

// readHTTPRequest reads one request head (request line and headers, at most
// maxRequestHead bytes) and leaves anything after it (a body, a pipelined
// TLS ClientHello) in r. A *requestError carries the HTTP response for a
// malformed (400) or unusable (405) request; I/O errors come back as they
// are, io.ErrUnexpectedEOF for a head cut short.
//
// Message framing is checked strictly because the body is passed through
// unparsed: Content-Length and Transfer-Encoding together, conflicting
// Content-Lengths or a Transfer-Encoding other than chunked are refused, so
// the destination sees the request exactly as the client framed it.
func readHTTPRequest(r *bufio.Reader) (httpRequest, error) {
	budget := maxRequestHead
	line, err := readLine(r, &budget)
	for err == nil && len(line) == 0 { // RFC 9112 2.2: ignore leading empty lines
		line, err = readLine(r, &budget)
	}
	if err != nil {
		return httpRequest{}, err
	}
	method, target, version, err := parseRequestLine(line)
	if err != nil {
		return httpRequest{}, err
	}
	var fields []headerField
	for {
		line, err := readLine(r, &budget)
		if err != nil {
			return httpRequest{}, unexpectedEOF(err)
		}
		if len(line) == 0 {
			break
		}
		f, err := parseHeaderField(line)
		if err != nil {
			return httpRequest{}, err
		}
		fields = append(fields, f)
	}

	req := httpRequest{method: method, connect: method == http.MethodConnect}
	if req.connect {
		// RFC 9110 9.3.6: authority form, and the port is not optional.
		host, port, bracketed, err := splitAuthority(target)
		if err == nil && port == "" {
			err = fmt.Errorf("%w: CONNECT target %q has no port", ErrBadRequest, target)
		}
		if err == nil {
			req.addr, req.host, req.port, err = parseHostPort(host, port, bracketed)
		}
		if err != nil {
			return httpRequest{}, httpError(http.StatusBadRequest, ReasonBadRequest, err)
		}
		return req, nil
	}
	if !hasPrefixFold(target, "http://") {
		if strings.HasPrefix(target, "/") || target == "*" {
			// The client talks to us as if we were the server: there is
			// no destination. Only proxy requests are served here.
			return httpRequest{}, httpError(http.StatusMethodNotAllowed, ReasonUnsupportedRequest,
				fmt.Errorf("%w: %s %q is not a proxy request", ErrUnsupportedRequest, method, target))
		}
		return httpRequest{}, httpError(http.StatusBadRequest, ReasonBadRequest,
			fmt.Errorf("%w: target %q is not an http:// URI (use CONNECT for anything else)", ErrBadRequest, target))
	}
	rest := target[len("http://"):]
	end := strings.IndexAny(rest, "/?#")
	if end < 0 {
		end = len(rest)
	}
	authority, path := rest[:end], rest[end:]
	if path, _, _ = strings.Cut(path, "#"); path == "" || path[0] == '?' {
		path = "/" + path
	}
	if _, err := url.ParseRequestURI(path); err != nil {
		return httpRequest{}, httpError(http.StatusBadRequest, ReasonBadRequest,
			fmt.Errorf("%w: request path %q: %w", ErrBadRequest, path, err))
	}
	host, port, bracketed, err := splitAuthority(authority)
	if port == "" {
		port = "80" // RFC 9110 4.2.1: absent or empty, the scheme's default
	}
	if err == nil {
		req.addr, req.host, req.port, err = parseHostPort(host, port, bracketed)
	}
	if err != nil {
		return httpRequest{}, httpError(http.StatusBadRequest, ReasonBadRequest, err)
	}
	if err := checkFraming(fields, version); err != nil {
		return httpRequest{}, httpError(http.StatusBadRequest, ReasonBadRequest, err)
	}
	req.head = rewriteHead(method, path, version, req.authority(), fields)
	return req, nil
}

// readLine reads one line of the head, charging it to budget, without the
// line ending (CRLF, or a bare LF as RFC 9112 2.2 allows).
func readLine(r *bufio.Reader, budget *int) ([]byte, error) {
	var line []byte
	for {
		frag, err := r.ReadSlice('\n')
		if len(frag) > *budget {
			return nil, httpError(http.StatusBadRequest, ReasonBadRequest,
				fmt.Errorf("%w: request head over %d bytes", ErrBadRequest, maxRequestHead))
		}
		*budget -= len(frag)
		line = append(line, frag...)
		if err == nil {
			break
		}
		if !errors.Is(err, bufio.ErrBufferFull) {
			if len(line) > 0 {
				return nil, unexpectedEOF(err)
			}
			return nil, err
		}
	}
	line = line[:len(line)-1]
	return bytes.TrimSuffix(line, []byte("\r")), nil
}

// parseRequestLine splits "METHOD SP target SP HTTP/1.x".
func parseRequestLine(line []byte) (method, target, version string, err error) {
	parts := strings.Split(string(line), " ")
	if len(parts) != 3 || !isToken(parts[0]) || parts[1] == "" || !isVisible(parts[1]) {
		return "", "", "", httpError(http.StatusBadRequest, ReasonBadRequest,
			fmt.Errorf("%w: request line %q", ErrBadRequest, line))
	}
	if parts[2] != "HTTP/1.1" && parts[2] != "HTTP/1.0" {
		return "", "", "", httpError(http.StatusBadRequest, ReasonBadRequest,
			fmt.Errorf("%w: version %q", ErrBadRequest, parts[2]))
	}
	return parts[0], parts[1], parts[2], nil
}

// headerField is one header line, name and value as the client sent them
// (the value without surrounding whitespace).
type headerField struct{ name, value string }

func parseHeaderField(line []byte) (headerField, error) {
	name, value, ok := strings.Cut(string(line), ":")
	// No whitespace before the colon (RFC 9112 5.1), no obs-fold (5.2), no
	// control characters but HTAB in the value.
	if !ok || !isToken(name) || !isFieldValue(value) {
		return headerField{}, httpError(http.StatusBadRequest, ReasonBadRequest,
			fmt.Errorf("%w: header line %q", ErrBadRequest, line))
	}
	return headerField{name: name, value: strings.Trim(value, " \t")}, nil
}

// checkFraming refuses bodies whose length client and destination could
// read differently.
func checkFraming(fields []headerField, version string) error {
	var length, te string
	for _, f := range fields {
		switch {
		case strings.EqualFold(f.name, "Content-Length"):
			if _, err := strconv.ParseUint(f.value, 10, 63); err != nil || (length != "" && length != f.value) {
				return fmt.Errorf("%w: Content-Length %q", ErrBadRequest, f.value)
			}
			length = f.value
		case strings.EqualFold(f.name, "Transfer-Encoding"):
			if te != "" || !strings.EqualFold(f.value, "chunked") || version != "HTTP/1.1" {
				return fmt.Errorf("%w: Transfer-Encoding %q", ErrBadRequest, f.value)
			}
			te = f.value
		}
	}
	if length != "" && te != "" {
		return fmt.Errorf("%w: both Content-Length and Transfer-Encoding", ErrBadRequest)
	}
	return nil
}

// rewriteHead builds the request to forward: origin form, Host from the URI
// (RFC 9112 3.2.2: a proxy replaces the client's), the client's other
// headers in order minus hop-by-hop ones and those its Connection header
// names, and "Connection: close".
func rewriteHead(method, path, version, authority string, fields []headerField) []byte {
	drop := map[string]bool{"host": true}
	for _, h := range hopByHop {
		drop[strings.ToLower(h)] = true
	}
	for _, f := range fields {
		if strings.EqualFold(f.name, "Connection") {
			for opt := range strings.SplitSeq(f.value, ",") {
				drop[strings.ToLower(strings.Trim(opt, " \t"))] = true
			}
		}
	}
	// A Connection header cannot take away the message's framing.
	delete(drop, "content-length")
	delete(drop, "transfer-encoding")

	b := make([]byte, 0, 256)
	b = fmt.Appendf(b, "%s %s %s\r\nHost: %s\r\n", method, path, version, authority)
	for _, f := range fields {
		if !drop[strings.ToLower(f.name)] {
			b = fmt.Appendf(b, "%s: %s\r\n", f.name, f.value)
		}
	}
	return append(b, "Connection: close\r\n\r\n"...)
}

// httpError is a refusal with its complete HTTP response.
func httpError(status int, reason Reason, err error) *requestError {
	return &requestError{reason: reason, reply: httpResponse(status, reason), err: err}
}

// httpResponse is a short plain-text response naming the reason; the
// connection closes after it.
func httpResponse(status int, reason Reason) []byte {
	body := "agentmesh: " + string(reason) + "\n"
	b := fmt.Appendf(nil, "HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\nConnection: close\r\n",
		status, http.StatusText(status), len(body))
	if status == http.StatusMethodNotAllowed {
		b = append(b, "Allow: CONNECT\r\n"...)
	}
	b = append(b, "\r\n"...)
	return append(b, body...)
}

// splitAuthority splits "host[:port]" or "[v6][:port]"; port is "" when
// absent. A userinfo part ("user@host") is left in host, where parseHost
// refuses it.
func splitAuthority(s string) (host, port string, bracketed bool, err error) {
	if !strings.HasPrefix(s, "[") {
		host, port, _ = strings.Cut(s, ":")
		return host, port, false, nil
	}
	end := strings.IndexByte(s, ']')
	if end < 0 {
		return "", "", true, fmt.Errorf("%w: authority %q", ErrBadRequest, s)
	}
	host, rest := s[1:end], s[end+1:]
	if rest != "" {
		var ok bool
		if port, ok = strings.CutPrefix(rest, ":"); !ok {
			return "", "", true, fmt.Errorf("%w: authority %q", ErrBadRequest, s)
		}
	}
	return host, port, true, nil
}

// parseHostPort validates the host and the port of an authority.
func parseHostPort(host, port string, bracketed bool) (netip.Addr, string, uint16, error) {
	n, err := strconv.ParseUint(port, 10, 16)
	if err != nil || n == 0 || port[0] == '+' {
		return netip.Addr{}, "", 0, fmt.Errorf("%w: port %q", ErrBadRequest, port)
	}
	addr, name, err := parseHost(host)
	if err != nil {
		return netip.Addr{}, "", 0, err
	}
	if bracketed != (addr.IsValid() && addr.Is6()) {
		// "[name]" and an unbracketed IPv6 address are both malformed.
		return netip.Addr{}, "", 0, fmt.Errorf("%w: host %q", ErrBadRequest, host)
	}
	return addr, name, uint16(n), nil
}

// parseHost takes an IP literal as an address and anything else as a host
// name, which must look like one (letters, digits, '-', '_' and dots): a
// name goes to the resolver and into logs, so nothing else is let through.
func parseHost(host string) (netip.Addr, string, error) {
	if a, err := netip.ParseAddr(host); err == nil {
		if a.Zone() != "" || a.IsUnspecified() {
			return netip.Addr{}, "", fmt.Errorf("%w: address %q", ErrBadRequest, host)
		}
		return a.Unmap(), "", nil
	}
	if host == "" || len(host) > 253 || host[0] == '.' || strings.Contains(host, "..") {
		return netip.Addr{}, "", fmt.Errorf("%w: host %q", ErrBadRequest, host)
	}
	for i := range len(host) {
		c := host[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '.') {
			return netip.Addr{}, "", fmt.Errorf("%w: host %q", ErrBadRequest, host)
		}
	}
	return netip.Addr{}, host, nil
}

// joinHostPort is net.JoinHostPort with a numeric port.
func joinHostPort(host string, port uint16) string {
	if strings.Contains(host, ":") {
		return "[" + host + "]:" + strconv.Itoa(int(port))
	}
	return host + ":" + strconv.Itoa(int(port))
}

// isToken reports whether s is an RFC 9110 token (methods, header names).
func isToken(s string) bool {
	if s == "" {
		return false
	}
	for i := range len(s) {
		c := s[i]
		if c <= ' ' || c >= 0x7f || strings.IndexByte(`"(),/:;<=>?@[\]{}`, c) >= 0 {
			return false
		}
	}
	return true
}

// isVisible reports whether s has only visible ASCII (a request target).
func isVisible(s string) bool {
	for i := range len(s) {
		if s[i] <= ' ' || s[i] >= 0x7f {
			return false
		}
	}
	return true
}

// isFieldValue reports whether s may be a header value: no control
// characters other than HTAB (so no CR, LF or NUL); obs-text is allowed.
func isFieldValue(s string) bool {
	for i := range len(s) {
		if c := s[i]; (c < ' ' && c != '\t') || c == 0x7f {
			return false
		}
	}
	return true
}

// hasPrefixFold is strings.HasPrefix ignoring ASCII case (URI schemes).
func hasPrefixFold(s, prefix string) bool {
	return len(s) >= len(prefix) && strings.EqualFold(s[:len(prefix)], prefix)
}
