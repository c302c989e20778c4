package proxy_test

import (
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/internal/svidrules"
	"github.com/agentmesh/agentmesh/internal/testca"
	"github.com/agentmesh/agentmesh/proxy"
)

// clock is a Config.Now that moves only when told to.
type clock struct {
	mu  sync.Mutex
	now time.Time
}

// newClock starts a second ahead of the real clock, so certificates issued
// from now on (NotBefore truncated to the second) are already valid.
func newClock() *clock { return &clock{now: time.Now().Add(time.Second)} }

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *clock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

// denySet is a proxy.Denier. Unlike *meshapi.DenyList it may change after
// SetDenyList, which lets a test present a ticket whose keys were not
// replaced and so reach VerifyConnection on a resumed session.
type denySet struct {
	mu      sync.Mutex
	ids     map[spiffeid.ID]bool
	serials map[string]bool
	// cutoffs deny an identity's certificates with an earlier NotBefore,
	// as a *meshapi.DenyList's identity entry does.
	cutoffs map[spiffeid.ID]time.Time
}

func deny(ids ...spiffeid.ID) *denySet {
	d := &denySet{ids: map[spiffeid.ID]bool{}, serials: map[string]bool{}}
	for _, id := range ids {
		d.ids[id] = true
	}
	return d
}

func denySerial(serial string) *denySet {
	d := deny()
	d.serials[serial] = true
	return d
}

func (d *denySet) Denies(id spiffeid.ID, serial string, notBefore time.Time) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	if cutoff, ok := d.cutoffs[id]; ok && notBefore.Before(cutoff) {
		return true
	}
	return d.ids[id] || d.serials[serial]
}

// denyBefore is a list that denies id's certificates issued before cutoff.
func denyBefore(id spiffeid.ID, cutoff time.Time) *denySet {
	d := deny()
	d.cutoffs = map[spiffeid.ID]time.Time{id: cutoff}
	return d
}

func (d *denySet) add(id spiffeid.ID) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.ids[id] = true
}

// serial is the serial of the SVID n presents now.
func (n *node) serial(t testing.TB) string {
	t.Helper()
	cert, err := n.creds.TLSCertificate()
	if err != nil {
		t.Fatal(err)
	}
	return cert.Leaf.SerialNumber.String()
}

// newMeshWith is newMesh with cfg applied to both proxies' configs.
func newMeshWith(t testing.TB, handle func(*net.TCPConn), cfg func(*proxy.Config)) *mesh {
	t.Helper()
	ca := testca.New(t)
	tg := startTarget(t, handle)
	bc := proxy.Config{Services: []proxy.Service{{Port: tg.port, Allow: []spiffeid.ID{idA}}}}
	cfg(&bc)
	b := start(t, ca, idB, bc)
	ac := proxy.Config{
		Routes: []proxy.Route{{Listen: "127.0.0.1:0", Peer: b.TunnelAddr().String(), PeerID: idB, TargetPort: tg.port}},
	}
	cfg(&ac)
	a := start(t, ca, idA, ac)
	return &mesh{ca: ca, a: a, b: b, target: tg}
}

// connect opens a tunnel through A's route and checks that it carries bytes.
func (m *mesh) connect(t testing.TB, what string) *net.TCPConn {
	t.Helper()
	c := m.dialRoute(t)
	if err := ping(t, c, what); err != nil {
		t.Fatalf("%s: %v", what, err)
	}
	return c
}

// refusedRoute connects through A's route and waits until A has recorded
// the refusal (the agent connection may close first, when the refused
// tunnel breaks under the early payload).
func (m *mesh) refusedRoute(t testing.TB) {
	t.Helper()
	from := m.a.audit.len()
	c := m.dialRoute(t)
	_, _ = c.Write([]byte("must not arrive"))
	if got, _ := io.ReadAll(c); len(got) != 0 {
		t.Fatalf("agent got %q through a refused tunnel", got)
	}
	if h := nextHandshake(t, m.a, from); h.Result == "ok" {
		t.Fatalf("A recorded %+v for a refused tunnel", h)
	}
}

// nextHandshake waits for the first tunnel handshake record appended to n
// after its first from records.
func nextHandshake(t testing.TB, n *node, from int) audit.Handshake {
	t.Helper()
	return waitForFrom(t, n.audit, from, "next handshake", func(h audit.Handshake) bool { return h.Transport == "tls" })
}

// TestResumption: the second tunnel between two proxies resumes the first
// one's TLS session on both sides, and still names the certificates of the
// original handshake in ConnInfo and in every record.
func TestResumption(t *testing.T) {
	t.Parallel()
	m := newMesh(t, echo)
	serialA, serialB := m.a.serial(t), m.b.serial(t)
	fromA, fromB := m.a.audit.len(), m.b.audit.len()

	first := m.connect(t, "full handshake")
	hA, hB := nextHandshake(t, m.a, fromA), nextHandshake(t, m.b, fromB)
	_ = first.Close()
	for _, n := range []*node{m.a, m.b} {
		waitFor(t, n.audit, "first connection closed", func(audit.Connection) bool { return true })
	}
	fromA, fromB = m.a.audit.len(), m.b.audit.len()

	second := m.connect(t, "resumed")
	rA, rB := nextHandshake(t, m.a, fromA), nextHandshake(t, m.b, fromB)

	tests := []struct {
		name        string
		h           audit.Handshake
		resumed     bool
		local, peer string
	}{
		{name: "a_full", h: hA, resumed: false, local: serialA, peer: serialB},
		{name: "b_full", h: hB, resumed: false, local: serialB, peer: serialA},
		{name: "a_resumed", h: rA, resumed: true, local: serialA, peer: serialB},
		{name: "b_resumed", h: rB, resumed: true, local: serialB, peer: serialA},
	}
	for _, tc := range tests {
		if tc.h.Result != "ok" || tc.h.Resumed != tc.resumed || tc.h.LocalSerial != tc.local || tc.h.PeerSerial != tc.peer {
			t.Errorf("%s: record %+v, want ok, resumed %v, local %s, peer %s", tc.name, tc.h, tc.resumed, tc.local, tc.peer)
		}
	}

	sides := []struct {
		name        string
		n           *node
		from        int
		local, peer string
	}{
		{name: "a", n: m.a, from: fromA, local: serialA, peer: serialB},
		{name: "b", n: m.b, from: fromB, local: serialB, peer: serialA},
	}
	for _, tc := range sides {
		infos := tc.n.Connections()
		if len(infos) != 1 || infos[0].LocalSerial != tc.local || infos[0].PeerSerial != tc.peer {
			t.Errorf("%s: Connections() = %+v, want local %s peer %s", tc.name, infos, tc.local, tc.peer)
		}
	}
	_ = second.Close()
	for _, tc := range sides {
		rec := waitForFrom(t, tc.n.audit, tc.from, "resumed connection closed", func(audit.Connection) bool { return true })
		if rec.LocalSerial != tc.local || rec.PeerSerial != tc.peer {
			t.Errorf("%s: connection record %+v, want local %s peer %s", tc.name, rec, tc.local, tc.peer)
		}
	}
}

// TestSetDenyListClosesConnections: the live connections a new deny-list
// denies, through the peer's credential or through ours, are closed and
// audited; the rest are untouched.
func TestSetDenyListClosesConnections(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		// list returns the node to call SetDenyList on and the list.
		list       func(t *testing.T, tr *triangle) (*node, proxy.Denier)
		wantClosed int
		direction  string
		// survivor is the agent connection that must keep working.
		survivor func(tr *triangle) *net.TCPConn
	}{
		{
			name: "peer_id_inbound", wantClosed: 1, direction: "inbound",
			list:     func(t *testing.T, tr *triangle) (*node, proxy.Denier) { return tr.b, deny(idA) },
			survivor: func(tr *triangle) *net.TCPConn { return tr.fromC },
		},
		{
			name: "peer_serial_outbound", wantClosed: 1, direction: "outbound",
			list: func(t *testing.T, tr *triangle) (*node, proxy.Denier) {
				return tr.a, denySerial(tr.b.serial(t))
			},
		},
		{
			name: "own_serial", wantClosed: 2, direction: "inbound",
			list: func(t *testing.T, tr *triangle) (*node, proxy.Denier) {
				return tr.b, denySerial(tr.b.serial(t))
			},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			tr := newTriangle(t)
			n, list := tc.list(t, tr)
			from := n.audit.len()
			if closed := n.SetDenyList(list); closed != tc.wantClosed {
				t.Fatalf("SetDenyList closed %d, want %d", closed, tc.wantClosed)
			}
			var revoked []audit.Connection
			for len(revoked) < tc.wantClosed {
				waitForFrom(t, n.audit, from, "revoked", func(c audit.Connection) bool { return c.Reason == "revoked" })
				revoked = revoked[:0]
				for _, e := range n.audit.snapshot()[from:] {
					if c, ok := e.(audit.Connection); ok && c.Reason == "revoked" {
						revoked = append(revoked, c)
					}
				}
			}
			for _, rec := range revoked {
				if rec.Direction != tc.direction || rec.PeerSerial == "" || rec.LocalSerial != n.serial(t) {
					t.Errorf("connection record %+v", rec)
				}
			}
			labels := map[string]string{"direction": tc.direction}
			if got := n.metric(t, "agentmesh_proxy_connections_revoked_total", labels); got != float64(tc.wantClosed) {
				t.Errorf("connections_revoked_total%v = %v, want %d", labels, got, tc.wantClosed)
			}
			if _, err := io.ReadAll(tr.fromA); err != nil {
				t.Logf("A's agent connection ended with %v", err) // a reset is fine too
			}
			if tc.survivor != nil {
				if err := ping(t, tc.survivor(tr), "untouched"); err != nil {
					t.Fatalf("connection the list does not deny: %v", err)
				}
			}
			if tc.name == "own_serial" {
				// While our own SVID is denied nothing new is accepted; a
				// new SVID brings the proxy back.
				from := tr.b.audit.len()
				tr.refusedRoute(t)
				if h := nextHandshake(t, tr.b, from); h.Reason != string(proxy.ReasonRevoked) || h.LocalSerial != "" {
					t.Errorf("handshake with a denied own SVID: %+v", h)
				}
				if err := tr.b.Ready(); !errors.Is(err, proxy.ErrRevoked) {
					t.Errorf("Ready with a denied own SVID = %v, want ErrRevoked", err)
				}
				tr.b.creds.Set(tr.ca.SVID(t, idB))
				tr.connect(t, "after rotation")
			}
		})
	}
}

// triangle is A and C, each with a route to B, and one open connection from
// each.
type triangle struct {
	*mesh
	c            *node
	fromA, fromC *net.TCPConn
}

func newTriangle(t *testing.T) *triangle {
	t.Helper()
	ca := testca.New(t)
	tg := startTarget(t, echo)
	b := start(t, ca, idB, proxy.Config{
		Services: []proxy.Service{{Port: tg.port, Allow: []spiffeid.ID{idA, idC}}},
	})
	route := []proxy.Route{{Listen: "127.0.0.1:0", Peer: b.TunnelAddr().String(), PeerID: idB, TargetPort: tg.port}}
	a := start(t, ca, idA, proxy.Config{Routes: route})
	c := start(t, ca, idC, proxy.Config{Routes: route})
	tr := &triangle{mesh: &mesh{ca: ca, a: a, b: b, target: tg}, c: c}
	tr.fromA = tr.connect(t, "from A")
	fromC, err := net.Dial("tcp", c.RouteAddr(0).String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = fromC.Close() })
	_ = fromC.SetDeadline(time.Now().Add(waitLimit))
	tr.fromC = fromC.(*net.TCPConn)
	if err := ping(t, tr.fromC, "from C"); err != nil {
		t.Fatal(err)
	}
	return tr
}

// TestDenyListRefusesResumption: a denied peer is refused whether it offers
// a ticket or not, on both sides, and VerifyConnection enforces the list on
// resumed sessions too.
func TestDenyListRefusesResumption(t *testing.T) {
	t.Parallel()
	t.Run("set_deny_list", func(t *testing.T) {
		t.Parallel()
		m := newMesh(t, echo)
		_ = m.connect(t, "before").Close() // leaves A a ticket
		m.b.SetDenyList(deny(idA))
		for _, attempt := range []string{"with the cached ticket", "full handshake"} {
			from := m.b.audit.len()
			m.refusedRoute(t)
			h := nextHandshake(t, m.b, from)
			// SetDenyList replaced B's ticket keys: not even resumed.
			if h.Result != "refused" || h.Reason != string(proxy.ReasonRevoked) || h.Resumed || h.PeerID != idA.String() {
				t.Errorf("%s: B's record %+v, want refused revoked, not resumed", attempt, h)
			}
		}
	})
	tests := []struct {
		name   string
		holder func(*mesh) *node // the proxy enforcing the list
		denied spiffeid.ID
		dir    string
	}{
		{name: "resumed_inbound", holder: func(m *mesh) *node { return m.b }, denied: idA, dir: "inbound"},
		{name: "resumed_outbound", holder: func(m *mesh) *node { return m.a }, denied: idB, dir: "outbound"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			m := newMesh(t, echo)
			n := tc.holder(m)
			list := deny()
			n.SetDenyList(list)
			_ = m.connect(t, "full").Close()
			from := n.audit.len()
			_ = m.connect(t, "resumed").Close()
			if h := nextHandshake(t, n, from); !h.Resumed {
				t.Fatalf("second tunnel did not resume: %+v", h)
			}
			list.add(tc.denied) // no SetDenyList: the ticket stays valid
			from = n.audit.len()
			m.refusedRoute(t)
			h := nextHandshake(t, n, from)
			if h.Direction != tc.dir || h.Reason != string(proxy.ReasonRevoked) || !h.Resumed || h.PeerID != tc.denied.String() {
				t.Errorf("record %+v, want %s revoked on a resumed session", h, tc.dir)
			}
			// The refused session is not offered again.
			from = n.audit.len()
			m.refusedRoute(t)
			if h := nextHandshake(t, n, from); h.Reason != string(proxy.ReasonRevoked) || h.Resumed {
				t.Errorf("retry: record %+v, want revoked after a full handshake", h)
			}
		})
	}
}

// TestSetDenyListDropsSessions: a new deny-list empties the client session
// caches and replaces the ticket keys, so nothing resumes across it.
func TestSetDenyListDropsSessions(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name   string
		holder func(*mesh) *node
	}{
		{name: "client_caches", holder: func(m *mesh) *node { return m.a }},
		{name: "server_keys", holder: func(m *mesh) *node { return m.b }},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			m := newMesh(t, echo)
			_ = m.connect(t, "before").Close()
			n := tc.holder(m)
			if closed := n.SetDenyList(deny()); closed != 0 {
				t.Fatalf("an empty list closed %d connections", closed)
			}
			from := n.audit.len()
			_ = m.connect(t, "after").Close()
			if h := nextHandshake(t, n, from); h.Result != "ok" || h.Resumed {
				t.Fatalf("record %+v, want ok and not resumed", h)
			}
			labels := map[string]string{"trigger": "deny_list"}
			if got := n.metric(t, "agentmesh_proxy_ticket_key_rotations_total", labels); got != 1 {
				t.Errorf("ticket_key_rotations_total%v = %v, want 1", labels, got)
			}
		})
	}
}

// TestRevocationStale: while Config.Revocation fails, both directions
// refuse new and resumed handshakes (fail closed), and Ready says why.
func TestRevocationStale(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name   string
		holder func(*mesh) *node
		dir    string
	}{
		{name: "inbound", holder: func(m *mesh) *node { return m.b }, dir: "inbound"},
		{name: "outbound", holder: func(m *mesh) *node { return m.a }, dir: "outbound"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			var stale atomic.Bool
			revocation := func() error {
				if stale.Load() {
					return errTest
				}
				return nil
			}
			m := newMeshWith(t, echo, func(c *proxy.Config) {
				// Only the proxy under test checks freshness.
				if (tc.dir == "inbound") == (len(c.Services) > 0) {
					c.Revocation = revocation
				}
			})
			n := tc.holder(m)
			_ = m.connect(t, "fresh").Close()
			stale.Store(true)
			if err := n.Ready(); !errors.Is(err, proxy.ErrRevocationStale) || !errors.Is(err, errTest) {
				t.Errorf("Ready = %v, want ErrRevocationStale wrapping the cause", err)
			}
			labels := map[string]string{"direction": tc.dir, "result": "error"}
			before := n.metric(t, "agentmesh_proxy_handshakes_total", labels)
			for _, resumed := range []bool{true, false} {
				from := n.audit.len()
				m.refusedRoute(t)
				h := nextHandshake(t, n, from)
				if h.Direction != tc.dir || h.Result != "error" || h.Reason != string(proxy.ReasonRevocationStale) || h.Resumed != resumed {
					t.Errorf("record %+v, want %s error revocation_stale, resumed %v", h, tc.dir, resumed)
				}
			}
			if got := n.metric(t, "agentmesh_proxy_handshakes_total", labels); got != before+2 {
				t.Errorf("handshakes_total%v went %v -> %v, want +2", labels, before, got)
			}
			stale.Store(false)
			_ = m.connect(t, "fresh again").Close()
		})
	}
}

// TestTicketKeyRotation: a ticket resumes across one key period and not
// after two; the period is capped at half the SVID's lifetime.
func TestTicketKeyRotation(t *testing.T) {
	t.Parallel()
	const period = time.Minute
	tests := []struct {
		name string
		cfg  func(*proxy.Config, *clock)
		svid []testca.IssueOption // B's SVID
	}{
		{name: "configured_period", cfg: func(c *proxy.Config, clk *clock) {
			c.TicketKeyPeriod = period
			c.Now = clk.Now
		}},
		{name: "half_svid_lifetime", cfg: func(c *proxy.Config, clk *clock) {
			c.Now = clk.Now // default period (1h), capped by the SVID
		}, svid: []testca.IssueOption{testca.WithLifetime(2 * period)}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			clk := newClock()
			m := newMeshWith(t, echo, func(c *proxy.Config) { tc.cfg(c, clk) })
			if tc.svid != nil {
				m.b.creds.Set(m.ca.SVID(t, idB, tc.svid...))
			}
			resumed := func(what string) bool {
				t.Helper()
				from := m.b.audit.len()
				_ = m.connect(t, what).Close()
				return nextHandshake(t, m.b, from).Resumed
			}
			rotations := func() float64 {
				return m.b.metric(t, "agentmesh_proxy_ticket_key_rotations_total", map[string]string{"trigger": "period"})
			}

			if resumed("first") {
				t.Fatal("first tunnel resumed")
			}
			clk.Advance(period + time.Second)
			if !resumed("one period later") {
				t.Fatal("a ticket one period old did not resume")
			}
			if got := rotations(); got != 1 {
				t.Errorf("ticket_key_rotations_total{period} = %v after one period, want 1", got)
			}
			if tc.svid != nil {
				return // two more periods outlive B's SVID: nothing to resume
			}
			clk.Advance(2*period + time.Second)
			if resumed("two periods later") {
				t.Fatal("a ticket two periods old resumed")
			}
		})
	}
}

// TestDenyListCutoff: an identity entry denies the certificates issued
// before its cutoff (by NotBefore) and only those: the live connection of
// A's old certificate is closed and its handshakes refused, while A with a
// certificate issued after the cutoff (a reinstated identity) gets through.
func TestDenyListCutoff(t *testing.T) {
	t.Parallel()
	m := newMesh(t, echo)
	now := time.Now()
	old := m.ca.SVID(t, idA, testca.WithNotBefore(now.Add(-10*time.Second)))
	m.a.creds.Set(old)
	live := m.connect(t, "old certificate before the revocation")
	oldSerial := old.Certificates[0].SerialNumber.String()

	from := m.b.audit.len()
	if closed := m.b.SetDenyList(denyBefore(idA, now.Add(-5*time.Second))); closed != 1 {
		t.Fatalf("SetDenyList closed %d connections, want 1 (A's)", closed)
	}
	rec := waitForFrom(t, m.b.audit, from, "revoked", func(c audit.Connection) bool { return c.Reason == "revoked" })
	if rec.PeerID != idA.String() || rec.PeerSerial != oldSerial {
		t.Errorf("closed connection %+v, want A's with serial %s", rec, oldSerial)
	}
	if _, err := io.ReadAll(live); err != nil {
		t.Logf("the old connection ended with %v", err) // a reset is fine too
	}
	from = m.b.audit.len()
	m.refusedRoute(t)
	if h := nextHandshake(t, m.b, from); h.Reason != string(proxy.ReasonRevoked) || h.PeerSerial != oldSerial {
		t.Errorf("B recorded %+v for A's old certificate, want refused as revoked", h)
	}

	m.a.creds.Set(m.ca.SVID(t, idA)) // issued now, after the cutoff
	m.connect(t, "certificate issued after the cutoff")
}

// deniedIssuer is a proxy.Denier that denies every certificate of one issuer, as
// a *meshapi.DenyList's issuer entry does after a rotation of the CA's anchors.
type deniedIssuer string

func (deniedIssuer) Denies(spiffeid.ID, string, time.Time) bool { return false }

func (d deniedIssuer) DeniesIssuer(fp string) bool { return string(d) == fp }

// TestDenyListIssuer: an issuer entry refuses a handshake with a certificate of that
// issuer, recorded as revoked, and only that issuer's.
func TestDenyListIssuer(t *testing.T) {
	t.Parallel()
	m := newMesh(t, echo)
	m.connect(t, "before the issuer is denied")
	other, _ := testca.New(t).Intermediate()
	m.b.SetDenyList(deniedIssuer(svidrules.KeyFingerprint(other)))
	m.connect(t, "another issuer denied")

	inter, _ := m.ca.Intermediate()
	from := m.b.audit.len()
	m.b.SetDenyList(deniedIssuer(svidrules.KeyFingerprint(inter)))
	m.refusedRoute(t)
	if h := nextHandshake(t, m.b, from); h.Reason != string(proxy.ReasonRevoked) || h.PeerID != idA.String() {
		t.Errorf("B recorded %+v for A's certificate of a denied issuer, want refused as revoked", h)
	}
}
