package proxy

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"net/http"
	"net/netip"
	"reflect"
	"strings"
	"testing"
)

func TestReadHTTPRequest(t *testing.T) {
	t.Parallel()
	const (
		resp400 = "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 23\r\nConnection: close\r\n\r\nagentmesh: bad_request\n"
		resp405 = "HTTP/1.1 405 Method Not Allowed\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 31\r\nConnection: close\r\nAllow: CONNECT\r\n\r\nagentmesh: unsupported_request\n"
	)
	huge := "GET http://example.com/ HTTP/1.1\r\nX-Big: " + strings.Repeat("a", maxRequestHead) + "\r\n\r\n"
	tests := []struct {
		name       string
		in         string
		want       httpRequest // head compared separately
		wantHead   string
		rest       string
		wantReason Reason
		wantReply  string
		wantIOErr  error
	}{
		{
			name: "connect_name", in: "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\nProxy-Connection: Keep-Alive\r\n\r\n",
			want: httpRequest{method: "CONNECT", connect: true, host: "example.com", port: 443},
		},
		{
			name: "connect_ipv4_pipelined", in: "CONNECT 10.0.0.7:8443 HTTP/1.1\r\n\r\n\x16\x03\x01", rest: "\x16\x03\x01",
			want: httpRequest{method: "CONNECT", connect: true, addr: netip.MustParseAddr("10.0.0.7"), port: 8443},
		},
		{
			name: "connect_ipv6", in: "CONNECT [2001:db8::5]:443 HTTP/1.1\r\n\r\n",
			want: httpRequest{method: "CONNECT", connect: true, addr: netip.MustParseAddr("2001:db8::5"), port: 443},
		},
		{
			name: "connect_http10_bare_lf", in: "CONNECT example.com:443 HTTP/1.0\n\n",
			want: httpRequest{method: "CONNECT", connect: true, host: "example.com", port: 443},
		},
		{
			name: "connect_leading_empty_line", in: "\r\nCONNECT example.com:443 HTTP/1.1\r\n\r\n",
			want: httpRequest{method: "CONNECT", connect: true, host: "example.com", port: 443},
		},
		{
			name:     "absolute_get",
			in:       "GET http://example.com:8080/a/b?c=d HTTP/1.1\r\nHost: example.com:8080\r\nUser-Agent: curl/8\r\nProxy-Connection: Keep-Alive\r\nAccept: */*\r\n\r\n",
			want:     httpRequest{method: "GET", host: "example.com", port: 8080},
			wantHead: "GET /a/b?c=d HTTP/1.1\r\nHost: example.com:8080\r\nAccept: */*\r\nUser-Agent: curl/8\r\nConnection: close\r\n\r\n",
		},
		{
			name:     "absolute_default_port_no_path_upper_scheme",
			in:       "HEAD HTTP://example.com HTTP/1.0\r\n\r\n",
			want:     httpRequest{method: "HEAD", host: "example.com", port: 80},
			wantHead: "HEAD / HTTP/1.0\r\nHost: example.com:80\r\nConnection: close\r\n\r\n",
		},
		{
			name:     "absolute_query_only_fragment_dropped",
			in:       "GET http://10.0.0.7?x=1#frag HTTP/1.1\r\n\r\n",
			want:     httpRequest{method: "GET", addr: netip.MustParseAddr("10.0.0.7"), port: 80},
			wantHead: "GET /?x=1 HTTP/1.1\r\nHost: 10.0.0.7:80\r\nConnection: close\r\n\r\n",
		},
		{
			name:     "absolute_ipv6_empty_port",
			in:       "GET http://[::1]:/x HTTP/1.1\r\n\r\n",
			want:     httpRequest{method: "GET", addr: netip.MustParseAddr("::1"), port: 80},
			wantHead: "GET /x HTTP/1.1\r\nHost: [::1]:80\r\nConnection: close\r\n\r\n",
		},
		{
			name: "absolute_post_body_left_hop_by_hop_removed",
			in: "POST http://example.com/up HTTP/1.1\r\nHost: evil.example\r\nConnection: keep-alive, X-Secret, Content-Length\r\nX-Secret: s\r\n" +
				"Keep-Alive: 300\r\nTE: trailers\r\nUpgrade: websocket\r\nProxy-Authorization: Basic eDp5\r\nContent-Length: 5\r\nX-Kept:  spaced \t\r\n\r\nhello",
			rest:     "hello",
			want:     httpRequest{method: "POST", host: "example.com", port: 80},
			wantHead: "POST /up HTTP/1.1\r\nHost: example.com:80\r\nContent-Length: 5\r\nX-Kept: spaced\r\nConnection: close\r\n\r\n",
		},
		{
			name:     "absolute_chunked",
			in:       "PUT http://example.com/x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
			rest:     "0\r\n\r\n",
			want:     httpRequest{method: "PUT", host: "example.com", port: 80},
			wantHead: "PUT /x HTTP/1.1\r\nHost: example.com:80\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
		},
		{name: "origin_form", in: "GET / HTTP/1.1\r\nHost: proxy\r\n\r\n", wantReason: ReasonUnsupportedRequest, wantReply: resp405},
		{name: "asterisk_form", in: "OPTIONS * HTTP/1.1\r\n\r\n", wantReason: ReasonUnsupportedRequest, wantReply: resp405},
		{name: "https_absolute", in: "GET https://example.com/ HTTP/1.1\r\n\r\n", wantReason: ReasonBadRequest, wantReply: resp400},
		{name: "connect_without_port", in: "CONNECT example.com HTTP/1.1\r\n\r\n", wantReason: ReasonBadRequest, wantReply: resp400},
		{name: "connect_empty_port", in: "CONNECT example.com: HTTP/1.1\r\n\r\n", wantReason: ReasonBadRequest, wantReply: resp400},
		{name: "connect_port_zero", in: "CONNECT example.com:0 HTTP/1.1\r\n\r\n", wantReason: ReasonBadRequest, wantReply: resp400},
		{name: "connect_port_too_big", in: "CONNECT example.com:65536 HTTP/1.1\r\n\r\n", wantReason: ReasonBadRequest, wantReply: resp400},
		{name: "connect_absolute_uri", in: "CONNECT http://example.com:443/ HTTP/1.1\r\n\r\n", wantReason: ReasonBadRequest, wantReply: resp400},
		{name: "connect_unbracketed_ipv6", in: "CONNECT ::1:443 HTTP/1.1\r\n\r\n", wantReason: ReasonBadRequest, wantReply: resp400},
		{name: "connect_bracketed_name", in: "CONNECT [example.com]:443 HTTP/1.1\r\n\r\n", wantReason: ReasonBadRequest, wantReply: resp400},
		{name: "connect_unspecified", in: "CONNECT 0.0.0.0:443 HTTP/1.1\r\n\r\n", wantReason: ReasonBadRequest, wantReply: resp400},
		{name: "userinfo", in: "GET http://user:pw@example.com/ HTTP/1.1\r\n\r\n", wantReason: ReasonBadRequest, wantReply: resp400},
		{name: "bad_host_chars", in: "GET http://exa%6dple.com/ HTTP/1.1\r\n\r\n", wantReason: ReasonBadRequest, wantReply: resp400},
		{name: "empty_host", in: "GET http:///x HTTP/1.1\r\n\r\n", wantReason: ReasonBadRequest, wantReply: resp400},
		{name: "bad_path_escape", in: "GET http://example.com/%zz HTTP/1.1\r\n\r\n", wantReason: ReasonBadRequest, wantReply: resp400},
		{name: "http2_preface", in: "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", wantReason: ReasonBadRequest, wantReply: resp400},
		{name: "http12", in: "GET http://example.com/ HTTP/1.2\r\n\r\n", wantReason: ReasonBadRequest, wantReply: resp400},
		{name: "obs_fold_after_request_line", in: "GET http://example.com/ HTTP/1.1\r\n X-A: b\r\n\r\n", wantReason: ReasonBadRequest, wantReply: resp400},
		{name: "gzip_http10", in: "POST http://example.com/ HTTP/1.0\r\nTransfer-Encoding: gzip\r\n\r\n", wantReason: ReasonBadRequest, wantReply: resp400},
		{name: "http09", in: "GET http://example.com/\r\n\r\n", wantReason: ReasonBadRequest, wantReply: resp400},
		{name: "double_space", in: "GET  http://example.com/ HTTP/1.1\r\n\r\n", wantReason: ReasonBadRequest, wantReply: resp400},
		{name: "bad_method_token", in: "G(T http://example.com/ HTTP/1.1\r\n\r\n", wantReason: ReasonBadRequest, wantReply: resp400},
		{name: "tls_client_hello", in: "\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", wantReason: ReasonBadRequest, wantReply: resp400},
		{name: "space_before_colon", in: "GET http://example.com/ HTTP/1.1\r\nHost : x\r\n\r\n", wantReason: ReasonBadRequest, wantReply: resp400},
		{name: "obs_fold", in: "GET http://example.com/ HTTP/1.1\r\nX-A: b\r\n c\r\n\r\n", wantReason: ReasonBadRequest, wantReply: resp400},
		{name: "header_without_colon", in: "GET http://example.com/ HTTP/1.1\r\nnocolon\r\n\r\n", wantReason: ReasonBadRequest, wantReply: resp400},
		{name: "bare_cr_in_value", in: "GET http://example.com/ HTTP/1.1\r\nX-A: b\rc\r\n\r\n", wantReason: ReasonBadRequest, wantReply: resp400},
		{name: "nul_in_value", in: "GET http://example.com/ HTTP/1.1\r\nX-A: b\x00c\r\n\r\n", wantReason: ReasonBadRequest, wantReply: resp400},
		{name: "content_length_and_chunked", in: "POST http://example.com/ HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", wantReason: ReasonBadRequest, wantReply: resp400},
		{name: "conflicting_content_length", in: "POST http://example.com/ HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", wantReason: ReasonBadRequest, wantReply: resp400},
		{name: "negative_content_length", in: "POST http://example.com/ HTTP/1.1\r\nContent-Length: -1\r\n\r\n", wantReason: ReasonBadRequest, wantReply: resp400},
		{name: "gzip_transfer_encoding", in: "POST http://example.com/ HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", wantReason: ReasonBadRequest, wantReply: resp400},
		{name: "chunked_http10", in: "POST http://example.com/ HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", wantReason: ReasonBadRequest, wantReply: resp400},
		{name: "head_too_large", in: huge, wantReason: ReasonBadRequest, wantReply: resp400},
		{name: "empty", in: "", wantIOErr: io.EOF},
		{name: "truncated_request_line", in: "GET http://exam", wantIOErr: io.ErrUnexpectedEOF},
		{name: "truncated_headers", in: "GET http://example.com/ HTTP/1.1\r\nHost: x\r\n", wantIOErr: io.ErrUnexpectedEOF},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			r := bufio.NewReader(strings.NewReader(tc.in))
			got, err := readHTTPRequest(r)
			checkRequestError(t, err, tc.wantReason, []byte(tc.wantReply), tc.wantIOErr)
			if err != nil {
				return
			}
			head := got.head
			got.head = nil
			if !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("readHTTPRequest = %+v, want %+v", got, tc.want)
			}
			if string(head) != tc.wantHead {
				t.Fatalf("forwarded head\n%q\nwant\n%q", head, tc.wantHead)
			}
			if rest, _ := io.ReadAll(r); string(rest) != tc.rest {
				t.Fatalf("left %q unread, want %q", rest, tc.rest)
			}
		})
	}
}

// TestHTTPReplies: the exact answers to a CONNECT's or an absolute-URI
// request's setup outcome.
func TestHTTPReplies(t *testing.T) {
	t.Parallel()
	connect, err := readHTTP(bufio.NewReader(strings.NewReader("CONNECT example.com:443 HTTP/1.1\r\n\r\n")))
	if err != nil {
		t.Fatal(err)
	}
	absolute, err := readHTTP(bufio.NewReader(strings.NewReader("GET http://example.com/ HTTP/1.1\r\n\r\n")))
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name   string
		target explicitTarget
		reason Reason
		want   string
	}{
		{name: "connect_ok", target: connect, reason: "", want: "HTTP/1.1 200 Connection Established\r\n\r\n"},
		{name: "connect_passthrough", target: connect, reason: ReasonPassthrough, want: "HTTP/1.1 200 Connection Established\r\n\r\n"},
		{name: "absolute_ok", target: absolute, reason: "", want: ""},
		{name: "connect_denied", target: connect, reason: ReasonUnknownDestination,
			want: "HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 31\r\nConnection: close\r\n\r\nagentmesh: unknown_destination\n"},
		{name: "absolute_loop", target: absolute, reason: ReasonLoop,
			want: "HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 16\r\nConnection: close\r\n\r\nagentmesh: loop\n"},
		{name: "connect_peer_mismatch", target: connect, reason: ReasonPeerMismatch,
			want: "HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 28\r\nConnection: close\r\n\r\nagentmesh: peer_id_mismatch\n"},
		{name: "connect_unreachable", target: connect, reason: ReasonPeerUnreachable,
			want: "HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 28\r\nConnection: close\r\n\r\nagentmesh: peer_unreachable\n"},
		{name: "absolute_resolve_failed", target: absolute, reason: ReasonResolveFailed,
			want: "HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 26\r\nConnection: close\r\n\r\nagentmesh: resolve_failed\n"},
		{name: "connect_no_svid", target: connect, reason: ReasonNoSVID,
			want: "HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 19\r\nConnection: close\r\n\r\nagentmesh: no_svid\n"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			if got := string(tc.target.answer(tc.reason)); got != tc.want {
				t.Fatalf("answer(%q) = %q, want %q", tc.reason, got, tc.want)
			}
		})
	}
}

// hopByHopLower is what must never be forwarded, in lower case.
var hopByHopLower = func() map[string]bool {
	m := map[string]bool{}
	for _, h := range hopByHop {
		m[strings.ToLower(h)] = true
	}
	return m
}()

// FuzzHTTPRequest: the parser sees anything a local client sends. It must
// never panic; every rejection must be a refusal with a complete HTTP
// response or an I/O error; an accepted CONNECT names a destination; an
// accepted absolute-URI request becomes a head that net/http reads as one
// origin-form request for the same authority, with Connection: close, no
// hop-by-hop header and the client's framing.
func FuzzHTTPRequest(f *testing.F) {
	f.Add([]byte("CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"))
	f.Add([]byte("GET http://example.com:8080/a?b HTTP/1.1\r\nProxy-Connection: Keep-Alive\r\nConnection: X-A\r\nX-A: 1\r\n\r\n"))
	f.Add([]byte("POST http://[::1]/x HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"))
	f.Add([]byte("PUT http://10.0.0.7/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"))
	f.Add([]byte("GET / HTTP/1.1\r\n\r\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		req, err := readHTTPRequest(bufio.NewReader(bytes.NewReader(b)))
		if err != nil {
			var re *requestError
			switch {
			case errors.As(err, &re):
				resp, rerr := http.ReadResponse(bufio.NewReader(bytes.NewReader(re.reply)), nil)
				if rerr != nil || (resp.StatusCode != 400 && resp.StatusCode != 405) {
					t.Fatalf("refusal %v with reply %q (%v)", err, re.reply, rerr)
				}
			case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
			default:
				t.Fatalf("unclassified error %v", err)
			}
			return
		}
		if req.port == 0 || req.addr.IsValid() == (req.host != "") {
			t.Fatalf("accepted %+v", req)
		}
		if req.connect {
			if req.head != nil {
				t.Fatalf("CONNECT with a head %q", req.head)
			}
			return
		}
		fwd, err := http.ReadRequest(bufio.NewReader(bytes.NewReader(req.head)))
		if err != nil {
			t.Fatalf("forwarded head %q does not parse: %v", req.head, err)
		}
		if fwd.Host != req.authority() || !fwd.Close || !strings.HasPrefix(fwd.RequestURI, "/") || fwd.Method != req.method {
			t.Fatalf("forwarded %q parses as %s %s Host %s close=%v", req.head, fwd.Method, fwd.RequestURI, fwd.Host, fwd.Close)
		}
		for name := range fwd.Header {
			if hopByHopLower[strings.ToLower(name)] && !strings.EqualFold(name, "Connection") {
				t.Fatalf("forwarded hop-by-hop header %s in %q", name, req.head)
			}
		}
		if v := fwd.Header.Values("Connection"); len(v) != 1 || v[0] != "close" {
			t.Fatalf("forwarded Connection %q", v)
		}
	})
}
