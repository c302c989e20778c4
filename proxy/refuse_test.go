package proxy_test

import (
	"crypto/tls"
	"encoding/binary"
	"io"
	"net"
	"net/url"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/internal/testca"
	"github.com/agentmesh/agentmesh/proxy"
)

// hostile is a mesh plus an impostor: A has route 0 to B and route 1 to a
// server that presents a valid SVID of the wrong identity.
type hostile struct {
	*mesh
	foreign *testca.CA
}

func newHostile(t *testing.T) *hostile {
	t.Helper()
	ca := testca.New(t)
	tg := startTarget(t, echo)
	b := start(t, ca, idB, proxy.Config{
		Services: []proxy.Service{{Port: tg.port, Allow: []spiffeid.ID{idA}}},
		// Short, so the silent-client case does not take 10 s; still far
		// above a loopback handshake.
		HandshakeTimeout: 2 * time.Second,
		// Short, so each case's aggregated record is written at once.
		RefusalInterval: 20 * time.Millisecond,
	})
	impostor := startImpostor(t, ca.SVID(t, idC))
	a := start(t, ca, idA, proxy.Config{
		Routes: []proxy.Route{
			{Listen: "127.0.0.1:0", Peer: b.TunnelAddr().String(), PeerID: idB, TargetPort: tg.port},
			{Listen: "127.0.0.1:0", Peer: impostor, PeerID: idB, TargetPort: tg.port},
		},
	})
	return &hostile{mesh: &mesh{ca: ca, a: a, b: b, target: tg}, foreign: testca.New(t)}
}

// startImpostor serves TLS with svid (a valid SVID, but not the one the
// route expects) and returns its address.
func startImpostor(t *testing.T, svid *x509svid.SVID) string {
	t.Helper()
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{*testca.TLSCertificate(svid)},
		ClientAuth:   tls.RequireAnyClientCert,
		NextProtos:   []string{proxy.ALPN},
	})
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() { _ = ln.Close(); wg.Wait() })
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Go(func() {
				defer func() { _ = c.Close() }()
				_ = c.SetDeadline(time.Now().Add(waitLimit))
				_, _ = io.Copy(io.Discard, c) // handshake, then wait for A to give up
			})
		}
	})
	return ln.Addr().String()
}

// tunnelHeader is the version-1 connect header, built independently of the
// package's encoder.
func tunnelHeader(port uint16) []byte {
	return binary.BigEndian.AppendUint16([]byte("AMSH\x01\x01"), port)
}

// dialTunnel plays a peer proxy presenting svid: handshake, header, status.
// A refusal shows up as an error or a non-zero status; it is not a test
// failure here.
func dialTunnel(t *testing.T, addr string, svid *x509svid.SVID, header []byte) {
	t.Helper()
	d := tls.Dialer{
		NetDialer: &net.Dialer{Timeout: waitLimit},
		Config: &tls.Config{
			MinVersion:   tls.VersionTLS13,
			Certificates: []tls.Certificate{*testca.TLSCertificate(svid)},
			// The test client does not care who B is; only B's
			// verification of the client is under test.
			InsecureSkipVerify: true, //nolint:gosec,forbidigo // test client, see above
			NextProtos:         []string{proxy.ALPN},
		},
	}
	c, err := d.DialContext(t.Context(), "tcp", addr)
	if err != nil {
		return
	}
	defer func() { _ = c.Close() }()
	_ = c.SetDeadline(time.Now().Add(waitLimit))
	if _, err := c.Write(header); err != nil {
		return
	}
	_, _ = io.Copy(io.Discard, c) // status byte (or alert), then the server closes
}

// rawTCP connects to addr, writes payload (maybe nothing) and waits for the
// server to close.
func rawTCP(t *testing.T, addr string, payload []byte) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = c.Close() }()
	_ = c.SetDeadline(time.Now().Add(waitLimit))
	if len(payload) > 0 {
		if _, err := c.Write(payload); err != nil {
			return
		}
	}
	_, _ = io.Copy(io.Discard, c)
}

// TestRefusals: every hostile or unauthorized attempt is refused, audited
// with its reason, counted, and the proxy keeps serving.
func TestRefusals(t *testing.T) {
	t.Parallel()
	h := newHostile(t)
	tunnel := h.b.TunnelAddr().String()
	twoURIs := &url.URL{Scheme: "spiffe", Host: "example.org", Path: "/host/other"}

	tests := []struct {
		name   string
		on     func(*hostile) *node
		dir    string
		result string
		reason proxy.Reason
		peer   spiffeid.ID // expected peer_id in the record, zero for none
		// preAuth: refused before authentication, so counted in an
		// aggregated audit.Refusals record rather than a handshake record.
		preAuth bool
		do      func(t *testing.T, h *hostile)
	}{
		{
			name: "garbage_bytes", on: onB, dir: "inbound", result: "refused", preAuth: true, reason: proxy.ReasonNotTLS,
			do: func(t *testing.T, h *hostile) { rawTCP(t, tunnel, []byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n")) },
		},
		{
			name: "plain_tcp_silent", on: onB, dir: "inbound", result: "refused", preAuth: true, reason: proxy.ReasonTimeout,
			do: func(t *testing.T, h *hostile) { rawTCP(t, tunnel, nil) },
		},
		{
			name: "foreign_ca", on: onB, dir: "inbound", result: "refused", preAuth: true, reason: proxy.ReasonUnknownAuthority, peer: idA,
			do: func(t *testing.T, h *hostile) {
				dialTunnel(t, tunnel, h.foreign.SVID(t, idA), tunnelHeader(h.target.port))
			},
		},
		{
			name: "expired_certificate", on: onB, dir: "inbound", result: "refused", preAuth: true, reason: proxy.ReasonCertExpired, peer: idA,
			do: func(t *testing.T, h *hostile) {
				expired := h.ca.SVID(t, idA, testca.WithNotBefore(time.Now().Add(-2*time.Hour)), testca.WithLifetime(time.Hour))
				dialTunnel(t, tunnel, expired, tunnelHeader(h.target.port))
			},
		},
		{
			name: "two_uri_sans", on: onB, dir: "inbound", result: "refused", preAuth: true, reason: proxy.ReasonBadCertificate,
			do: func(t *testing.T, h *hostile) {
				dialTunnel(t, tunnel, h.ca.SVID(t, idA, testca.WithExtraURIs(twoURIs)), tunnelHeader(h.target.port))
			},
		},
		{
			name: "peer_not_allowed", on: onB, dir: "inbound", result: "refused", reason: proxy.ReasonPeerNotAllowed, peer: idC,
			do: func(t *testing.T, h *hostile) { dialTunnel(t, tunnel, h.ca.SVID(t, idC), tunnelHeader(h.target.port)) },
		},
		{
			name: "port_not_in_services", on: onB, dir: "inbound", result: "refused", reason: proxy.ReasonPortNotMeshed, peer: idA,
			do: func(t *testing.T, h *hostile) {
				dialTunnel(t, tunnel, h.ca.SVID(t, idA), tunnelHeader(h.target.port+1))
			},
		},
		{
			name: "bad_header_version", on: onB, dir: "inbound", result: "refused", reason: proxy.ReasonUnsupported, peer: idA,
			do: func(t *testing.T, h *hostile) {
				dialTunnel(t, tunnel, h.ca.SVID(t, idA), []byte("AMSH\x02\x01\x1f\x90"))
			},
		},
		{
			name: "outbound_impersonation", on: onA, dir: "outbound", result: "refused", reason: proxy.ReasonPeerMismatch, peer: idC,
			do: func(t *testing.T, h *hostile) { rawTCP(t, h.a.RouteAddr(1).String(), []byte("secret")) },
		},
		{
			name: "outbound_without_svid", on: onA, dir: "outbound", result: "error", reason: proxy.ReasonNoSVID,
			do: func(t *testing.T, h *hostile) {
				h.a.creds.Set(nil)
				defer h.a.creds.Set(h.ca.SVID(t, idA))
				rawTCP(t, h.a.RouteAddr(0).String(), nil)
			},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			n := tc.on(h)
			labels := map[string]string{"direction": tc.dir, "result": tc.result}
			before := n.metric(t, "agentmesh_proxy_handshakes_total", labels)
			from := n.audit.len()
			tc.do(t, h)
			if tc.preAuth {
				rec := waitForFrom(t, n.audit, from, string(tc.reason), func(r audit.Refusals) bool { return r.Reasons[string(tc.reason)] > 0 })
				if rec.Direction != tc.dir || rec.Source != "127.0.0.1" || rec.Count != 1 || rec.Transports["tls"] != 1 {
					t.Errorf("record %+v, want one tls attempt from 127.0.0.1", rec)
				}
				if want := peerString(tc.peer); want != "" && (len(rec.Peers) != 1 || rec.Peers[0].PeerID != want || rec.Peers[0].Reason != string(tc.reason)) {
					t.Errorf("record peers %+v, want the certificate of %s", rec.Peers, want)
				}
				if hs := n.audit.handshakes(); len(hs) > 0 && hs[len(hs)-1].Reason == string(tc.reason) {
					t.Errorf("a refusal before authentication has its own handshake record %+v", hs[len(hs)-1])
				}
			} else {
				rec := waitFor(t, n.audit, string(tc.reason), func(r audit.Handshake) bool { return r.Reason == string(tc.reason) })
				if rec.Direction != tc.dir || string(rec.Result) != tc.result {
					t.Errorf("record %+v, want direction %s result %s", rec, tc.dir, tc.result)
				}
				if want := peerString(tc.peer); rec.PeerID != want {
					t.Errorf("record peer_id %q, want %q", rec.PeerID, want)
				}
			}
			if after := n.metric(t, "agentmesh_proxy_handshakes_total", labels); after != before+1 {
				t.Errorf("handshakes_total%v went %v -> %v, want +1", labels, before, after)
			}
			// Still serving.
			if err := ping(t, h.dialRoute(t), "still serving after "+tc.name); err != nil {
				t.Fatalf("good connection after %s: %v", tc.name, err)
			}
		})
	}
}

func onA(h *hostile) *node { return h.a }
func onB(h *hostile) *node { return h.b }

func peerString(id spiffeid.ID) string {
	if id.IsZero() {
		return ""
	}
	return id.String()
}
