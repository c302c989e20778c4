package proxy

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"net/http"
	"net/netip"
	"strconv"
	"strings"

	"golang.org/x/net/http/httpguts"
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
// maxRequestHead bytes) with http.ReadRequest and leaves anything after it (a
// body, a pipelined TLS ClientHello) in r. A *requestError carries the HTTP
// response for a malformed (400) or unusable (405) request; I/O errors come
// back as they are, io.ErrUnexpectedEOF for a head cut short.
//
// Message framing is checked strictly because the body is passed through
// unparsed: Content-Length and Transfer-Encoding together, conflicting
// Content-Lengths or a Transfer-Encoding other than chunked are refused, so
// the destination sees the request exactly as the client framed it.
func readHTTPRequest(r *bufio.Reader) (httpRequest, error) {
	hr := &headReader{r: r, left: maxRequestHead}
	// headReader hands over whole lines and nothing past the head, so what
	// follows the head stays in r.
	hreq, err := http.ReadRequest(bufio.NewReaderSize(hr, 512))
	// The reader's refusal, whatever the parser made of it: textproto
	// drops an error met while peeking for a continuation line.
	if re, ok := errors.AsType[*requestError](hr.err); ok {
		return httpRequest{}, re
	}
	if err != nil {
		if hr.err != nil && errors.Is(err, hr.err) {
			return httpRequest{}, hr.err
		}
		return httpRequest{}, httpError(http.StatusBadRequest, ReasonBadRequest, fmt.Errorf("%w: %w", ErrBadRequest, err))
	}
	method, target := hreq.Method, hreq.RequestURI
	if hreq.Proto != "HTTP/1.1" && hreq.Proto != "HTTP/1.0" {
		return httpRequest{}, httpError(http.StatusBadRequest, ReasonBadRequest,
			fmt.Errorf("%w: version %q", ErrBadRequest, hreq.Proto))
	}
	for name := range hreq.Header {
		// net/http keeps a name with a space before the colon (RFC 9112
		// 5.1 forbids it).
		if !httpguts.ValidHeaderFieldName(name) {
			return httpRequest{}, httpError(http.StatusBadRequest, ReasonBadRequest,
				fmt.Errorf("%w: header name %q", ErrBadRequest, name))
		}
	}
	if !isVisible(target) {
		return httpRequest{}, httpError(http.StatusBadRequest, ReasonBadRequest,
			fmt.Errorf("%w: request target %q", ErrBadRequest, target))
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
	// The target's own split, not hreq.URL: net/http keeps a fragment in
	// the query of a request URI and accepts an unbracketed IPv6 host.
	rest := target[len("http://"):]
	end := strings.IndexAny(rest, "/?#")
	if end < 0 {
		end = len(rest)
	}
	authority, path := rest[:end], rest[end:]
	if path, _, _ = strings.Cut(path, "#"); path == "" || path[0] == '?' {
		path = "/" + path
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
	if err := hr.checkFraming(hreq); err != nil {
		return httpRequest{}, httpError(http.StatusBadRequest, ReasonBadRequest, err)
	}
	req.head = rewriteHead(hreq, path, req.authority())
	return req, nil
}

// headReader feeds http.ReadRequest one whole line of the head per Read,
// charging it to the maxRequestHead budget, so that the parser's buffer never
// holds what follows the head. It also does what net/http leaves to a server:
// skip the empty lines before the request line (RFC 9112 2.2), refuse obs-fold
// (5.2), which net/http would join, and note the framing headers, which
// net/http takes out of the header it returns.
type headReader struct {
	r       *bufio.Reader
	left    int    // budget
	pending []byte // the line being handed over
	started bool   // the request line was read
	err     error  // the I/O error handed over, sticky
	// length and chunked: the head has a Content-Length, a Transfer-Encoding.
	length, chunked bool
}

func (h *headReader) Read(p []byte) (int, error) {
	for len(h.pending) == 0 {
		if h.err != nil {
			return 0, h.err
		}
		line, err := h.readLine()
		if err != nil {
			h.err = err
			return 0, err
		}
		switch {
		case !h.started && (string(line) == "\n" || string(line) == "\r\n"):
			continue
		case h.started && (line[0] == ' ' || line[0] == '\t'):
			h.err = httpError(http.StatusBadRequest, ReasonBadRequest,
				fmt.Errorf("%w: folded header line %q", ErrBadRequest, line))
			return 0, h.err
		}
		h.started = true
		h.length = h.length || hasPrefixFold(string(line), "Content-Length:")
		h.chunked = h.chunked || hasPrefixFold(string(line), "Transfer-Encoding:")
		h.pending = line
	}
	n := copy(p, h.pending)
	h.pending = h.pending[n:]
	return n, nil
}

// readLine reads one line with its ending, charging it to the budget. A line
// cut short by the end of input is io.ErrUnexpectedEOF, and so is the end of
// input once the request line was read.
func (h *headReader) readLine() ([]byte, error) {
	var line []byte
	for {
		frag, err := h.r.ReadSlice('\n')
		if len(frag) > h.left {
			return nil, httpError(http.StatusBadRequest, ReasonBadRequest,
				fmt.Errorf("%w: request head over %d bytes", ErrBadRequest, maxRequestHead))
		}
		h.left -= len(frag)
		line = append(line, frag...)
		switch {
		case err == nil:
			return line, nil
		case errors.Is(err, bufio.ErrBufferFull):
			continue
		case len(line) > 0 || h.started:
			err = unexpectedEOF(err)
		}
		return nil, err
	}
}

// checkFraming refuses bodies whose length client and destination could
// read differently. net/http has refused conflicting Content-Lengths and
// any Transfer-Encoding but chunked in HTTP/1.1; it ignores one in HTTP/1.0
// and drops Content-Length beside chunked.
func (h *headReader) checkFraming(req *http.Request) error {
	switch {
	case h.chunked && req.Proto != "HTTP/1.1":
		return fmt.Errorf("%w: Transfer-Encoding in %s", ErrBadRequest, req.Proto)
	case h.chunked && h.length:
		return fmt.Errorf("%w: both Content-Length and Transfer-Encoding", ErrBadRequest)
	}
	return nil
}

// rewriteHead builds the request to forward: origin form, Host from the URI
// (RFC 9112 3.2.2: a proxy replaces the client's), the client's other
// headers minus hop-by-hop ones and those its Connection header names, and
// "Connection: close". The headers go in net/http's order (sorted names).
func rewriteHead(req *http.Request, path, authority string) []byte {
	drop := map[string]bool{"Host": true}
	for _, h := range hopByHop {
		drop[http.CanonicalHeaderKey(h)] = true
	}
	for _, v := range req.Header.Values("Connection") {
		for opt := range strings.SplitSeq(v, ",") {
			drop[http.CanonicalHeaderKey(strings.Trim(opt, " \t"))] = true
		}
	}
	// A Connection header cannot take away the message's framing.
	delete(drop, "Content-Length")
	delete(drop, "Transfer-Encoding")
	header := req.Header
	if len(req.TransferEncoding) > 0 {
		// net/http moved it out of the header.
		header = header.Clone()
		header["Transfer-Encoding"] = req.TransferEncoding
	}
	var b bytes.Buffer
	fmt.Fprintf(&b, "%s %s %s\r\nHost: %s\r\n", req.Method, path, req.Proto, authority)
	_ = header.WriteSubset(&b, drop) // a bytes.Buffer does not fail
	b.WriteString("Connection: close\r\n\r\n")
	return b.Bytes()
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

// isVisible reports whether s has only visible ASCII (a request target).
func isVisible(s string) bool {
	for i := range len(s) {
		if s[i] <= ' ' || s[i] >= 0x7f {
			return false
		}
	}
	return true
}

// hasPrefixFold is strings.HasPrefix ignoring ASCII case (URI schemes).
func hasPrefixFold(s, prefix string) bool {
	return len(s) >= len(prefix) && strings.EqualFold(s[:len(prefix)], prefix)
}
