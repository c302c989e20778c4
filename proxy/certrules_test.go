package proxy_test

import (
	"crypto/x509"
	"errors"
	"net"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/internal/testca"
	"github.com/agentmesh/agentmesh/proxy"
)

// TestCertificateRules: real handshakes with certificates that x509svid.Verify
// accepts but the mesh must not: each is refused in the direction it applies
// to, audited with its reason and counted, and the boundary cases still pass.
func TestCertificateRules(t *testing.T) {
	t.Parallel()
	ca := testca.New(t)
	td := ca.TrustDomain()
	longest := testca.LongID(t, td, 2048)
	tooLong := testca.LongID(t, td, 2049)
	tg := startTarget(t, hangUp)
	b := start(t, ca, idB, proxy.Config{
		// Every client identity used below is allowed, so that only the
		// certificate rules can refuse it.
		Services: []proxy.Service{{Port: tg.port, Allow: []spiffeid.ID{idA, longest, tooLong}}},
	})
	tunnel := b.TunnelAddr().String()
	serverOnly := ca.SVID(t, idB, testca.WithExtKeyUsage(x509.ExtKeyUsageServerAuth))
	clientOnly := ca.SVID(t, idB, testca.WithExtKeyUsage(x509.ExtKeyUsageClientAuth))
	a := start(t, ca, idA, proxy.Config{
		// The impostors never answer the header: a short timeout ends the
		// handshake that passes the rules.
		HandshakeTimeout: 2 * time.Second,
		Routes: []proxy.Route{
			{Listen: "127.0.0.1:0", Peer: startImpostor(t, clientOnly), PeerID: idB, TargetPort: tg.port},
			{Listen: "127.0.0.1:0", Peer: startImpostor(t, ca.DeepSVID(t, idB, 5)), PeerID: idB, TargetPort: tg.port},
			{Listen: "127.0.0.1:0", Peer: startImpostor(t, serverOnly), PeerID: idB, TargetPort: tg.port},
		},
	})

	tests := []struct {
		name   string
		on     *node
		dir    string
		reason proxy.Reason // "" for a handshake that must succeed
		peer   string       // the peer_id of the record
		do     func(t *testing.T)
	}{
		{
			name: "client_leaf_server_auth_only", on: b, dir: "inbound", reason: proxy.ReasonKeyUsage, peer: idA.String(),
			do: func(t *testing.T) {
				dialTunnel(t, tunnel, ca.SVID(t, idA, testca.WithExtKeyUsage(x509.ExtKeyUsageServerAuth)), tunnelHeader(tg.port))
			},
		},
		{
			name: "client_leaf_without_digital_signature", on: b, dir: "inbound", reason: proxy.ReasonKeyUsage, peer: idA.String(),
			do: func(t *testing.T) {
				dialTunnel(t, tunnel, ca.SVID(t, idA, testca.WithKeyUsage(x509.KeyUsageKeyEncipherment)), tunnelHeader(tg.port))
			},
		},
		{
			name: "client_chain_five_intermediates", on: b, dir: "inbound", reason: proxy.ReasonChainTooLong, peer: idA.String(),
			do: func(t *testing.T) { dialTunnel(t, tunnel, ca.DeepSVID(t, idA, 5), tunnelHeader(tg.port)) },
		},
		{
			name: "client_id_2049_bytes", on: b, dir: "inbound", reason: proxy.ReasonIDTooLong,
			do: func(t *testing.T) { dialTunnel(t, tunnel, ca.SVID(t, tooLong), tunnelHeader(tg.port)) },
		},
		{
			name: "server_leaf_client_auth_only", on: a, dir: "outbound", reason: proxy.ReasonKeyUsage, peer: idB.String(),
			do: func(t *testing.T) { rawTCP(t, a.RouteAddr(0).String(), []byte("x")) },
		},
		{
			name: "server_chain_five_intermediates", on: a, dir: "outbound", reason: proxy.ReasonChainTooLong, peer: idB.String(),
			do: func(t *testing.T) { rawTCP(t, a.RouteAddr(1).String(), []byte("x")) },
		},
		// The boundaries: what the rules allow gets through them.
		{
			name: "client_id_2048_bytes", on: b, dir: "inbound", peer: longest.String(),
			do: func(t *testing.T) { dialTunnel(t, tunnel, ca.SVID(t, longest), tunnelHeader(tg.port)) },
		},
		{
			name: "client_leaf_without_eku", on: b, dir: "inbound", peer: idA.String(),
			do: func(t *testing.T) {
				dialTunnel(t, tunnel, ca.SVID(t, idA, testca.WithExtKeyUsage()), tunnelHeader(tg.port))
			},
		},
		{
			// A server leaf with serverAuth only is a valid server: the
			// handshake passes the rules (the impostor then says nothing).
			name: "server_leaf_server_auth_only", on: a, dir: "outbound", reason: proxy.ReasonTimeout, peer: idB.String(),
			do: func(t *testing.T) { rawTCP(t, a.RouteAddr(2).String(), []byte("x")) },
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			result := "refused"
			if tc.reason == "" {
				result = "ok"
			}
			labels := map[string]string{"direction": tc.dir, "result": result}
			before := tc.on.metric(t, "agentmesh_proxy_handshakes_total", labels)
			from := tc.on.audit.len()
			tc.do(t)
			if tc.dir == "inbound" && tc.reason != "" {
				// Refused before authentication: aggregated per source.
				rec := waitForFrom(t, tc.on.audit, from, tc.name, func(r audit.Refusals) bool { return r.Reasons[string(tc.reason)] > 0 })
				if rec.Count != 1 || rec.Source != "127.0.0.1" {
					t.Errorf("record %+v, want one attempt from 127.0.0.1", rec)
				}
				if tc.peer != "" && (len(rec.Peers) != 1 || rec.Peers[0].PeerID != tc.peer) {
					t.Errorf("record peers %+v, want the certificate of %s", rec.Peers, tc.peer)
				}
			} else {
				rec := waitForFrom(t, tc.on.audit, from, tc.name, func(r audit.Handshake) bool { return r.Direction == tc.dir })
				if string(rec.Result) != result || rec.Reason != string(tc.reason) || rec.PeerID != tc.peer {
					t.Errorf("record %+v, want result %s reason %q peer_id %q", rec, result, tc.reason, tc.peer)
				}
			}
			if after := tc.on.metric(t, "agentmesh_proxy_handshakes_total", labels); after != before+1 {
				t.Errorf("handshakes_total%v went %v -> %v, want +1", labels, before, after)
			}
		})
	}
}

// TestMaxIntermediates: a chain through a cross-signed root needs a second
// intermediate, which Config.MaxIntermediates allows; beyond its range the
// configuration is refused.
func TestMaxIntermediates(t *testing.T) {
	t.Parallel()
	ca := testca.New(t)
	tg := startTarget(t, hangUp)
	b := start(t, ca, idB, proxy.Config{
		MaxIntermediates: 2,
		Services:         []proxy.Service{{Port: tg.port, Allow: []spiffeid.ID{idA}}},
	})
	for depth, want := range map[int]proxy.Reason{2: "", 3: proxy.ReasonChainTooLong} {
		from := b.audit.len()
		dialTunnel(t, b.TunnelAddr().String(), ca.DeepSVID(t, idA, depth), tunnelHeader(tg.port))
		if want == "" {
			if rec := waitForFrom(t, b.audit, from, "handshake", func(audit.Handshake) bool { return true }); rec.Reason != "" {
				t.Errorf("%d intermediates: reason %q, want success", depth, rec.Reason)
			}
			continue
		}
		// Refused before authentication: aggregated per source.
		waitForFrom(t, b.audit, from, string(want), func(r audit.Refusals) bool { return r.Reasons[string(want)] > 0 })
	}
	for _, n := range []int{-1, 5} {
		_, err := proxy.New(proxy.Config{ID: idA, Credentials: testca.NewCredentials(ca, ca.SVID(t, idA)), MaxIntermediates: n})
		if !errors.Is(err, proxy.ErrInvalidConfig) {
			t.Errorf("MaxIntermediates %d: New returned %v, want ErrInvalidConfig", n, err)
		}
	}
}

// hangUp is a target that closes every connection at once, so that a test
// client sees its tunnel end.
func hangUp(c *net.TCPConn) { _ = c.Close() }
