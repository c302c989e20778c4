package proxy

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"net/netip"
	"strings"
	"testing"
)

func TestReadSOCKSGreeting(t *testing.T) {
	t.Parallel()
	noAcceptable := []byte{0x05, 0xff}
	tests := []struct {
		name       string
		in         string
		wantReason Reason // "" for success or an I/O error
		wantReply  []byte // the exact bytes the client gets on refusal
		wantIOErr  error
	}{
		{name: "no_auth_only", in: "\x05\x01\x00"},
		{name: "no_auth_among_others", in: "\x05\x03\x02\x01\x00"},
		{name: "username_password_only", in: "\x05\x01\x02", wantReason: ReasonUnsupportedRequest, wantReply: noAcceptable},
		{name: "gssapi_only", in: "\x05\x01\x01", wantReason: ReasonUnsupportedRequest, wantReply: noAcceptable},
		{name: "no_methods", in: "\x05\x00", wantReason: ReasonBadRequest, wantReply: noAcceptable},
		{name: "socks4", in: "\x04\x01\x00\x50\x7f\x00\x00\x01\x00", wantReason: ReasonBadRequest, wantReply: noAcceptable},
		{name: "empty", in: "", wantIOErr: io.EOF},
		{name: "truncated_header", in: "\x05", wantIOErr: io.ErrUnexpectedEOF},
		{name: "truncated_methods", in: "\x05\x02\x00", wantIOErr: io.ErrUnexpectedEOF},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			err := readSOCKSGreeting(bufio.NewReader(strings.NewReader(tc.in)))
			checkRequestError(t, err, tc.wantReason, tc.wantReply, tc.wantIOErr)
		})
	}
}

func TestReadSOCKSRequest(t *testing.T) {
	t.Parallel()
	reply := func(rep byte) []byte { return []byte{0x05, rep, 0x00, 0x01, 0, 0, 0, 0, 0, 0} }
	tests := []struct {
		name       string
		in         string
		want       socksRequest
		rest       string // what must be left unread
		wantReason Reason
		wantReply  []byte
		wantIOErr  error
	}{
		{name: "ipv4", in: "\x05\x01\x00\x01\x0a\x00\x00\x07\x1f\x90", want: socksRequest{addr: netip.MustParseAddr("10.0.0.7"), port: 8080}},
		{name: "ipv6", in: "\x05\x01\x00\x04" + string(netip.MustParseAddr("2001:db8::5").AsSlice()) + "\x01\xbb",
			want: socksRequest{addr: netip.MustParseAddr("2001:db8::5"), port: 443}},
		{name: "ipv4_mapped_ipv6", in: "\x05\x01\x00\x04" + string(netip.MustParseAddr("::ffff:10.0.0.7").AsSlice()) + "\x00\x50",
			want: socksRequest{addr: netip.MustParseAddr("10.0.0.7"), port: 80}},
		{name: "domain", in: "\x05\x01\x00\x03\x0bexample.com\x00\x50", want: socksRequest{host: "example.com", port: 80}},
		{name: "domain_ip_literal", in: "\x05\x01\x00\x03\x09127.0.0.1\x00\x50", want: socksRequest{addr: netip.MustParseAddr("127.0.0.1"), port: 80}},
		{name: "domain_ipv6_literal", in: "\x05\x01\x00\x03\x03::1\x00\x50", want: socksRequest{addr: netip.MustParseAddr("::1"), port: 80}},
		{name: "reserved_byte_ignored", in: "\x05\x01\x07\x01\x0a\x00\x00\x07\x1f\x90", want: socksRequest{addr: netip.MustParseAddr("10.0.0.7"), port: 8080}},
		{name: "pipelined_payload_left", in: "\x05\x01\x00\x01\x0a\x00\x00\x07\x1f\x90\x16\x03\x01", rest: "\x16\x03\x01",
			want: socksRequest{addr: netip.MustParseAddr("10.0.0.7"), port: 8080}},
		{name: "bind", in: "\x05\x02\x00\x01\x0a\x00\x00\x07\x1f\x90", wantReason: ReasonUnsupportedRequest, wantReply: reply(0x07)},
		{name: "udp_associate", in: "\x05\x03\x00\x01\x0a\x00\x00\x07\x1f\x90", wantReason: ReasonUnsupportedRequest, wantReply: reply(0x07)},
		{name: "unknown_command", in: "\x05\x09\x00\x01\x0a\x00\x00\x07\x1f\x90", wantReason: ReasonUnsupportedRequest, wantReply: reply(0x07)},
		{name: "unknown_address_type", in: "\x05\x01\x00\x02\x0a\x00\x00\x07\x1f\x90", wantReason: ReasonUnsupportedRequest, wantReply: reply(0x08)},
		{name: "bad_version", in: "\x04\x01\x00\x01\x0a\x00\x00\x07\x1f\x90", wantReason: ReasonBadRequest, wantReply: reply(0x01)},
		{name: "port_zero", in: "\x05\x01\x00\x01\x0a\x00\x00\x07\x00\x00", wantReason: ReasonBadRequest, wantReply: reply(0x01)},
		{name: "unspecified_address", in: "\x05\x01\x00\x01\x00\x00\x00\x00\x00\x50", wantReason: ReasonBadRequest, wantReply: reply(0x01)},
		{name: "empty_domain", in: "\x05\x01\x00\x03\x00\x00\x50", wantReason: ReasonBadRequest, wantReply: reply(0x01)},
		{name: "domain_with_nul", in: "\x05\x01\x00\x03\x04a\x00bc\x00\x50", wantReason: ReasonBadRequest, wantReply: reply(0x01)},
		{name: "domain_with_space", in: "\x05\x01\x00\x03\x03a b\x00\x50", wantReason: ReasonBadRequest, wantReply: reply(0x01)},
		{name: "domain_ipv6_zone", in: "\x05\x01\x00\x03\x09fe80::1%1\x00\x50", wantReason: ReasonBadRequest, wantReply: reply(0x01)},
		{name: "empty", in: "", wantIOErr: io.EOF},
		{name: "truncated_header", in: "\x05\x01", wantIOErr: io.ErrUnexpectedEOF},
		{name: "truncated_ipv4", in: "\x05\x01\x00\x01\x0a\x00", wantIOErr: io.ErrUnexpectedEOF},
		{name: "truncated_domain", in: "\x05\x01\x00\x03\x0bexam", wantIOErr: io.ErrUnexpectedEOF},
		{name: "truncated_port", in: "\x05\x01\x00\x01\x0a\x00\x00\x07\x1f", wantIOErr: io.ErrUnexpectedEOF},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			r := bufio.NewReader(strings.NewReader(tc.in))
			got, err := readSOCKSRequest(r)
			checkRequestError(t, err, tc.wantReason, tc.wantReply, tc.wantIOErr)
			if err != nil {
				return
			}
			if got != tc.want {
				t.Fatalf("readSOCKSRequest = %+v, want %+v", got, tc.want)
			}
			if rest, _ := io.ReadAll(r); string(rest) != tc.rest {
				t.Fatalf("left %q unread, want %q", rest, tc.rest)
			}
		})
	}
}

// TestSOCKSReplyCode: the REP a client gets for each kind of outcome.
func TestSOCKSReplyCode(t *testing.T) {
	t.Parallel()
	tests := []struct {
		reason Reason
		want   []byte
	}{
		{reason: "", want: []byte{0x05, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0}},
		{reason: ReasonPassthrough, want: []byte{0x05, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0}},
		{reason: ReasonUnknownDestination, want: []byte{0x05, 0x02, 0x00, 0x01, 0, 0, 0, 0, 0, 0}},
		{reason: ReasonLoop, want: []byte{0x05, 0x02, 0x00, 0x01, 0, 0, 0, 0, 0, 0}},
		{reason: ReasonPeerRefused, want: []byte{0x05, 0x02, 0x00, 0x01, 0, 0, 0, 0, 0, 0}},
		{reason: ReasonPeerMismatch, want: []byte{0x05, 0x02, 0x00, 0x01, 0, 0, 0, 0, 0, 0}},
		{reason: ReasonPeerUnreachable, want: []byte{0x05, 0x04, 0x00, 0x01, 0, 0, 0, 0, 0, 0}},
		{reason: ReasonTargetUnreachable, want: []byte{0x05, 0x04, 0x00, 0x01, 0, 0, 0, 0, 0, 0}},
		{reason: ReasonResolveFailed, want: []byte{0x05, 0x04, 0x00, 0x01, 0, 0, 0, 0, 0, 0}},
		{reason: ReasonTimeout, want: []byte{0x05, 0x04, 0x00, 0x01, 0, 0, 0, 0, 0, 0}},
		{reason: ReasonNoSVID, want: []byte{0x05, 0x01, 0x00, 0x01, 0, 0, 0, 0, 0, 0}},
		{reason: ReasonAuditUnavailable, want: []byte{0x05, 0x01, 0x00, 0x01, 0, 0, 0, 0, 0, 0}},
		{reason: ReasonBadRequest, want: []byte{0x05, 0x01, 0x00, 0x01, 0, 0, 0, 0, 0, 0}},
	}
	for _, tc := range tests {
		t.Run("reason_"+string(tc.reason), func(t *testing.T) {
			t.Parallel()
			if got := socksReply(socksReplyCode(tc.reason)); !bytes.Equal(got, tc.want) {
				t.Fatalf("reply for %q = % x, want % x", tc.reason, got, tc.want)
			}
		})
	}
}

// checkRequestError checks a parser's error: a *requestError with the
// reason and exact reply, an I/O error, or none.
func checkRequestError(t *testing.T, err error, wantReason Reason, wantReply []byte, wantIOErr error) {
	t.Helper()
	var re *requestError
	switch {
	case wantIOErr != nil:
		if !errors.Is(err, wantIOErr) || errors.As(err, &re) {
			t.Fatalf("error = %v, want the I/O error %v", err, wantIOErr)
		}
	case wantReason != "":
		if !errors.As(err, &re) {
			t.Fatalf("error = %v, want a refusal %s", err, wantReason)
		}
		if re.reason != wantReason || !bytes.Equal(re.reply, wantReply) {
			t.Fatalf("refusal %s with reply %q, want %s with %q", re.reason, re.reply, wantReason, wantReply)
		}
		want := ErrBadRequest
		if wantReason == ReasonUnsupportedRequest {
			want = ErrUnsupportedRequest
		}
		if !errors.Is(err, want) {
			t.Fatalf("error %v does not wrap %v", err, want)
		}
	case err != nil:
		t.Fatalf("unexpected error %v", err)
	}
}

// FuzzSOCKS runs the SOCKS5 exchange the explicit listener runs: greeting,
// then request. It must never panic, every rejection must be a refusal with
// a reply or an I/O error, and an accepted request must be a destination
// that re-encodes to itself.
func FuzzSOCKS(f *testing.F) {
	f.Add([]byte("\x05\x01\x00\x05\x01\x00\x01\x0a\x00\x00\x07\x1f\x90"))
	f.Add([]byte("\x05\x01\x00\x05\x01\x00\x03\x0bexample.com\x00\x50"))
	f.Add([]byte("\x05\x02\x00\x02\x05\x01\x00\x04" + string(netip.MustParseAddr("2001:db8::5").AsSlice()) + "\x01\xbb"))
	f.Add([]byte("\x05\x01\x02"))
	f.Add([]byte("\x05\x01\x00\x05\x02\x00\x01\x0a\x00\x00\x07\x1f\x90"))
	f.Fuzz(func(t *testing.T, b []byte) {
		r := bufio.NewReader(bytes.NewReader(b))
		err := readSOCKSGreeting(r)
		var req socksRequest
		if err == nil {
			req, err = readSOCKSRequest(r)
		}
		if err != nil {
			var re *requestError
			switch {
			case errors.As(err, &re):
				if len(re.reply) == 0 || re.reply[0] != socksVersion5 ||
					(!errors.Is(err, ErrBadRequest) && !errors.Is(err, ErrUnsupportedRequest)) {
					t.Fatalf("refusal %v with reply %x", err, re.reply)
				}
			case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
			default:
				t.Fatalf("unclassified error %v", err)
			}
			return
		}
		if req.port == 0 || req.addr.IsValid() == (req.host != "") || req.addr.Is4In6() || req.addr.Zone() != "" {
			t.Fatalf("accepted %+v", req)
		}
		again, err := readSOCKSRequest(bufio.NewReader(bytes.NewReader(appendSOCKSRequest(nil, req))))
		if err != nil || again != req {
			t.Fatalf("accepted %+v, which re-reads as %+v, %v", req, again, err)
		}
	})
}
