package meshclient

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"testing/synctest"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/internal/testaudit"
	"github.com/agentmesh/agentmesh/internal/testca"
	"github.com/agentmesh/agentmesh/internal/testlog"
	"github.com/agentmesh/agentmesh/internal/testrun"
	"github.com/agentmesh/agentmesh/meshapi"
)

var (
	idSelf = spiffeid.RequireFromPath(testTD, "/host/self")
	idC    = spiffeid.RequireFromPath(testTD, "/host/c")
	idD    = spiffeid.RequireFromPath(testTD, "/host/d")
	idE    = spiffeid.RequireFromPath(testTD, "/host/e")
)

func TestFeedHealth(t *testing.T) {
	t.Parallel()
	var h feedHealth
	h, recovered := h.succeeded()
	if recovered {
		t.Error("a first success reports a recovery")
	}
	h, alert := h.failed()
	if alert || h.down {
		t.Fatal("one failed poll raised the alert")
	}
	h, recovered = h.succeeded()
	if recovered || h.failures != 0 {
		t.Fatalf("success after a blip: %+v, recovered %v", h, recovered)
	}
	for i := 1; i <= 5; i++ {
		var alert bool
		h, alert = h.failed()
		if want := i == feedDownAfter; alert != want {
			t.Errorf("failure %d: alert %v, want %v", i, alert, want)
		}
	}
	if h, recovered = h.succeeded(); !recovered || h.down || h.failures != 0 {
		t.Errorf("success after an outage: %+v, recovered %v", h, recovered)
	}
}

func TestDenyListRefusal(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		err     error
		reason  string
		refused bool
	}{
		{meshapi.ErrDenyListSignature, denyReasonBadSignature, true},
		{meshapi.ErrDenyListStale, denyReasonStale, true},
		{meshapi.ErrDenyListConflict, denyReasonConflict, true},
		{meshapi.ErrDenyListGap, denyReasonGap, true},
		{meshapi.ErrDenyListMalformed, denyReasonMalformed, true},
		{errors.New("connection refused"), denyReasonMalformed, false},
	} {
		// Wrapped as callers do: classified by errors.Is, not identity.
		err := fmt.Errorf("ca: revocations: %w", tc.err)
		if got := denyListRefusal(err); got != tc.reason {
			t.Errorf("%v: reason %q, want %q", tc.err, got, tc.reason)
		}
		if got := refusedList(err); got != tc.refused {
			t.Errorf("%v: refusedList %v, want %v", tc.err, got, tc.refused)
		}
	}
}

// deniedID is a revoked-identity entry first listed in version v.
func deniedID(id spiffeid.ID, v uint64) meshapi.DeniedID {
	return meshapi.DeniedID{SPIFFEID: id, Reason: "test", RevokedAt: time.Now(), Version: v}
}

// denyListOf is version v of a list of testTD with the given entries.
func denyListOf(v uint64, serials []meshapi.DeniedSerial, ids ...meshapi.DeniedID) *meshapi.DenyList {
	if serials == nil {
		serials = []meshapi.DeniedSerial{}
	}
	return &meshapi.DenyList{TrustDomain: testTD.Name(), Version: v, IssuedAt: time.Now(), IDs: append([]meshapi.DeniedID{}, ids...), Serials: serials}
}

// signWith signs l with the intermediate of ca.
func signWith(t testing.TB, ca *testca.CA, l *meshapi.DenyList) *meshapi.SignedDenyList {
	t.Helper()
	cert, key := ca.Intermediate()
	s, err := meshapi.SignDenyList(l, key, cert)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// fakeFeed plays the directory and deny-list endpoints of agentmesh ca with answers
// the test sets, including ones the real CA cannot be made to give: forged, replayed,
// conflicting and gapped lists, and outages.
type fakeFeed struct {
	mu          sync.Mutex
	list        []byte // answer of GET /mesh/v1/revocations; nil: 503
	doc         []byte // answer of GET /mesh/v1/directory; nil: no answer until the request ends
	docVersion  uint64
	changed     chan struct{} // closed and replaced when doc changes
	unreachable bool          // RoundTrip fails as against a closed listener
	polled      chan struct{} // receives (coalesced) at each deny-list request
}

func newFakeFeed() *fakeFeed {
	return &fakeFeed{changed: make(chan struct{}), polled: make(chan struct{}, 1)}
}

// awaitPoll waits until a poll that started after the call has been answered and
// processed: the poll loop is sequential, so the third request seen from now on
// (the first may be a stale signal) comes after the second's answer was handled.
func (f *fakeFeed) awaitPoll(t *testing.T) {
	t.Helper()
	for range 3 {
		select {
		case <-f.polled:
		case <-time.After(10 * time.Second):
			t.Fatal("no poll within 10s")
		}
	}
}

func (f *fakeFeed) setList(t testing.TB, s *meshapi.SignedDenyList) {
	t.Helper()
	b, err := json.Marshal(s)
	if err != nil {
		t.Fatal(err)
	}
	f.setRawList(b)
}

func (f *fakeFeed) setRawList(b []byte) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.list = b
}

// setDirectory makes doc the directory answer and wakes the long-polls.
func (f *fakeFeed) setDirectory(t testing.TB, doc meshapi.DirectoryDocument) {
	t.Helper()
	b, err := json.Marshal(doc)
	if err != nil {
		t.Fatal(err)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.doc, f.docVersion = b, doc.Version
	close(f.changed)
	f.changed = make(chan struct{})
}

func (f *fakeFeed) setUnreachable(down bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.unreachable = down
}

func (f *fakeFeed) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	switch r.URL.Path {
	case meshapi.Prefix + meshapi.RevocationsPath:
		select {
		case f.polled <- struct{}{}:
		default:
		}
		f.mu.Lock()
		b := f.list
		f.mu.Unlock()
		if b == nil {
			http.Error(w, `{"status":503,"message":"unavailable"}`, http.StatusServiceUnavailable)
			return
		}
		_, _ = w.Write(b)
	case meshapi.Prefix + meshapi.DirectoryPath:
		// A long-poll, as the CA's: answers when the document is not the version the
		// client holds.
		since := r.URL.Query().Get("since")
		for {
			f.mu.Lock()
			doc, v, changed := f.doc, f.docVersion, f.changed
			f.mu.Unlock()
			if doc != nil && since != strconv.FormatUint(v, 10) {
				_, _ = w.Write(doc)
				return
			}
			select {
			case <-changed:
			case <-r.Context().Done():
				return
			}
		}
	default:
		http.NotFound(w, r)
	}
}

// RoundTrip serves a request in memory, for tests inside a synctest bubble, where
// loopback sockets would let no fake time pass. There is then no TLS, so the
// Directory learns its trust domain from Config.Certificate.
func (f *fakeFeed) RoundTrip(r *http.Request) (*http.Response, error) {
	f.mu.Lock()
	down := f.unreachable
	f.mu.Unlock()
	if down {
		return nil, &net.OpError{Op: "dial", Net: "tcp", Err: syscall.ECONNREFUSED}
	}
	rec := httptest.NewRecorder()
	f.ServeHTTP(rec, r)
	return rec.Result(), nil
}

// serveFeed serves f over TLS on loopback with a serving certificate from ca's
// intermediate, so that ca's root is both the TLS anchor and the deny-list's.
func serveFeed(t *testing.T, ca *testca.CA, f *fakeFeed) *httptest.Server {
	t.Helper()
	srv := httptest.NewUnstartedServer(f)
	srv.TLS = &tls.Config{
		Certificates: []tls.Certificate{*servingCertificate(t, ca)},
		ClientAuth:   tls.RequestClientCert,
	}
	srv.StartTLS()
	t.Cleanup(srv.Close)
	return srv
}

// servingCertificate is a TLS serving certificate for 127.0.0.1 from ca's
// intermediate, the chain's intermediate included.
func servingCertificate(t *testing.T, ca *testca.CA) *tls.Certificate {
	t.Helper()
	inter, interKey := ca.Intermediate()
	key := testca.NewKey(t)
	der, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{
		SerialNumber: big.NewInt(2),
		NotBefore:    time.Now().Add(-time.Minute),
		NotAfter:     time.Now().Add(time.Hour),
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}, inter, key.Public(), interKey)
	if err != nil {
		t.Fatal(err)
	}
	return &tls.Certificate{Certificate: [][]byte{der, inter.Raw}, PrivateKey: key}
}

// feedClient is a Member for svid against url, recording what it refuses.
type feedClient struct {
	*Member
	audit testaudit.DenyLists
	seen  uint64 // the version of the last list nextApplied returned
	reg   *prometheus.Registry
	logs  *testlog.Buffer
}

// awaitState waits, on Updated, until the published State satisfies ok.
func (c *feedClient) awaitState(t *testing.T, what string, ok func(*meshapi.State) bool) *meshapi.State {
	t.Helper()
	for {
		if st := c.Watch.State(); ok(st) {
			return st
		}
		select {
		case <-c.Watch.Updated():
		case <-time.After(15 * time.Second):
			t.Fatalf("no state with %s published (version %d)", what, c.Watch.State().Version())
		}
	}
}

// nextApplied waits for a published State with a deny-list newer than the last one
// returned, as a proxy following the states would apply it, and returns the list.
func (c *feedClient) nextApplied(t *testing.T) *meshapi.DenyList {
	t.Helper()
	st := c.awaitState(t, "a newer deny-list", func(st *meshapi.State) bool {
		return st.DenyList() != nil && st.DenyList().Version > c.seen
	})
	c.seen = st.DenyList().Version
	return st.DenyList()
}

func newFeedClient(t *testing.T, url string, roots []*x509.Certificate, cert *tls.Certificate, mutate func(*Config)) *feedClient {
	t.Helper()
	logger, logs := testlog.New(t)
	c := &feedClient{audit: make(testaudit.DenyLists, 64), reg: prometheus.NewRegistry(), logs: logs}
	cfg := Config{
		URL:         url,
		Roots:       roots,
		Certificate: func() (*tls.Certificate, error) { return cert, nil },
		Audit:       c.audit,
		Registerer:  c.reg,
		Logger:      logger,
	}
	if mutate != nil {
		mutate(&cfg)
	}
	d, err := NewMember(cfg)
	if err != nil {
		t.Fatal(err)
	}
	c.Member = d
	return c
}

// gauge returns the value of a gauge, or of a counter's series with the given reason.
func metricValue(t *testing.T, reg *prometheus.Registry, name, reason string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			if reason == "" {
				if m.GetGauge() != nil {
					return m.GetGauge().GetValue()
				}
				return m.GetCounter().GetValue()
			}
			for _, lp := range m.GetLabel() {
				if lp.GetName() == labelReason && lp.GetValue() == reason {
					return m.GetCounter().GetValue()
				}
			}
		}
	}
	t.Fatalf("metric %s{reason=%q} not found", name, reason)
	return 0
}

// Against a fake feed over real TLS, polled only: forged, replayed, conflicting,
// gapped, foreign and undecodable lists are each refused once with their reason and
// an audit record, the list held stays in force, and the next good version applies.
func TestDenyFeedRefusesBadLists(t *testing.T) {
	t.Parallel()
	ca := testca.New(t, testca.WithTrustDomain(testTD))
	feed := newFakeFeed() // no directory answer: the watch stays parked
	srv := serveFeed(t, ca, feed)
	c := newFeedClient(t, srv.URL, ca.Roots(), testca.TLSCertificate(ca.SVID(t, idSelf)), func(cfg *Config) {
		cfg.PollInterval = 10 * time.Millisecond
	})

	serial := meshapi.DeniedSerial{Serial: "123456789", SPIFFEID: idD, Reason: "key lost", RevokedAt: time.Now(), Version: 3}
	entB, entC := deniedID(idB, 2), deniedID(idC, 3)
	v1 := denyListOf(1, nil)
	v2 := denyListOf(2, nil, entB)
	v3 := denyListOf(3, []meshapi.DeniedSerial{serial}, entB, entC)
	signedV2 := signWith(t, ca, v2)

	steps := []struct {
		list   *meshapi.DenyList
		signed *meshapi.SignedDenyList
	}{{v1, signWith(t, ca, v1)}, {v2, signedV2}, {v3, signWith(t, ca, v3)}}
	feed.setList(t, steps[0].signed)
	testrun.Start(t, c.Run)
	for _, step := range steps {
		want := step.list
		feed.setList(t, step.signed)
		if l := c.nextApplied(t); l.Version != want.Version || len(l.IDs) != len(want.IDs) || len(l.Serials) != len(want.Serials) {
			t.Fatalf("published version %d, want %+v", l.Version, want)
		}
	}
	if l := c.Watch.State().DenyList(); !l.Denies(idC, "1", time.Time{}) || !l.Denies(spiffeid.RequireFromPath(testTD, "/host/z"), "123456789", time.Time{}) || l.Denies(idE, "1", time.Time{}) {
		t.Fatalf("list in force does not deny what v3 lists: %+v", l)
	}

	forger := testca.New(t, testca.WithTrustDomain(testTD)) // another CA claiming the trust domain
	foreign := denyListOf(4, nil)
	foreign.TrustDomain = "other.test"
	good4 := denyListOf(4, []meshapi.DeniedSerial{serial}, entB, entC, deniedID(idE, 4))
	for _, tc := range []struct {
		name    string
		serve   func()
		reason  string
		version uint64 // recorded version: only a verified list's
	}{
		{"forged", func() { feed.setList(t, signWith(t, forger, good4)) }, denyReasonBadSignature, 0},
		{"replayed", func() { feed.setList(t, signedV2) }, denyReasonStale, 2},
		{"conflicting", func() {
			feed.setList(t, signWith(t, ca, denyListOf(3, []meshapi.DeniedSerial{serial}, entB, deniedID(idD, 3))))
		}, denyReasonConflict, 3},
		{"gapped", func() {
			feed.setList(t, signWith(t, ca, denyListOf(4, []meshapi.DeniedSerial{serial}, entC, deniedID(idE, 4))))
		}, denyReasonGap, 4},
		{"foreign trust domain", func() { feed.setList(t, signWith(t, ca, foreign)) }, denyReasonMalformed, 0},
		{"not json", func() { feed.setRawList([]byte("<html>")) }, denyReasonMalformed, 0},
	} {
		tc.serve()
		rec := c.audit.Next(t)
		if rec.Result != denyResultRefused || rec.Reason != tc.reason || rec.Version != tc.version ||
			rec.Previous != 3 || rec.Error == "" || rec.Closed != 0 {
			t.Fatalf("%s: record %+v, want refused %s", tc.name, rec, tc.reason)
		}
		if v := c.Watch.State().DenyList().Version; v != 3 {
			t.Fatalf("%s: list in force is version %d, want 3", tc.name, v)
		}
		// Polled again, the same list is counted, not recorded or logged again.
		before := metricValue(t, c.reg, metricDenyListRefused, tc.reason)
		feed.awaitPoll(t)
		select {
		case rec := <-c.audit:
			t.Fatalf("%s: refused list recorded again: %+v", tc.name, rec)
		default:
		}
		if n := metricValue(t, c.reg, metricDenyListRefused, tc.reason); n <= before {
			t.Errorf("%s: refused_total{reason=%s} = %v, was %v before another poll", tc.name, tc.reason, n, before)
		}
	}
	if n := strings.Count(c.logs.String(), "deny list refused"); n != 6 {
		t.Errorf("%d refusals logged, want 6", n)
	}

	feed.setList(t, signWith(t, ca, good4))
	if l := c.nextApplied(t); l.Version != 4 || !l.Denies(idE, "", time.Time{}) {
		t.Fatalf("good version 4: published %+v", l)
	}
	select {
	case rec := <-c.audit:
		t.Errorf("a refused list was recorded twice, or another one came: %+v", rec)
	default:
	}
	if v := metricValue(t, c.reg, metricDenyListVersion, ""); v != 4 {
		t.Errorf("list_version = %v, want 4", v)
	}
	if up := metricValue(t, c.reg, metricFeedUp, ""); up != 1 {
		t.Errorf("feed_up = %v, want 1", up)
	}
	out := c.logs.String()
	for _, want := range []string{"deny list refused", "reason=" + denyReasonGap, "source=" + feedSourcePoll} {
		if !strings.Contains(out, want) {
			t.Errorf("log lacks %q", want)
		}
	}
}

// A directory answer whose deny-list is refused still updates the peers; a malformed
// directory still delivers its deny-list. Only the watch delivers here: the poll
// fails once at start and then waits an hour.
func TestDirectoryAnswerDenyList(t *testing.T) {
	t.Parallel()
	ca, feed, c := newWatchOnly(t)
	peerA := meshapi.DirectoryEntry{SPIFFEID: idA, Addresses: addrs("10.0.0.1"), TunnelPort: 15008, Transports: []string{"tls"}}
	forger := testca.New(t, testca.WithTrustDomain(testTD))
	feed.setDirectory(t, meshapi.DirectoryDocument{Version: 5, Peers: []meshapi.DirectoryEntry{peerA}, Revocations: signWith(t, forger, denyListOf(1, nil))})
	testrun.Start(t, c.Run)

	awaitUpdate(t, c.Member)
	if _, _, ok := c.Watch.State().PeerFor(netip.MustParseAddr("10.0.0.1")); !ok || c.Watch.State().Version() != 5 {
		t.Fatalf("directory with a forged list not applied: version %d", c.Watch.State().Version())
	}
	if rec := c.audit.Next(t); rec.Result != denyResultRefused || rec.Reason != denyReasonBadSignature {
		t.Fatalf("forged list in the directory: %+v", rec)
	}
	if c.Watch.State().DenyList() != nil {
		t.Fatal("a forged list is in force")
	}

	v1 := denyListOf(1, nil, deniedID(idB, 1))
	feed.setDirectory(t, meshapi.DirectoryDocument{Version: 6, Peers: []meshapi.DirectoryEntry{}, Revocations: signWith(t, ca, v1)})
	st := c.awaitState(t, "directory version 6", func(st *meshapi.State) bool { return st.Version() == 6 })
	if l := st.DenyList(); l == nil || l.Version != 1 {
		t.Fatalf("list %+v published with directory version 6, want version 1", l)
	}
	c.seen = 1

	// A peer without a tunnel port makes the directory malformed; its list applies.
	v2 := denyListOf(2, nil, v1.IDs[0], deniedID(idC, 2))
	bad := peerA
	bad.TunnelPort = 0
	feed.setDirectory(t, meshapi.DirectoryDocument{Version: 7, Peers: []meshapi.DirectoryEntry{bad}, Revocations: signWith(t, ca, v2)})
	if l := c.nextApplied(t); l.Version != 2 {
		t.Fatalf("list %d published, want 2", l.Version)
	}
	if c.Watch.State().Version() != 6 {
		t.Errorf("malformed directory applied: version %d", c.Watch.State().Version())
	}
	if !strings.Contains(c.logs.String(), "source="+feedSourceDirectory) {
		t.Error("log does not say the list came with the directory")
	}
}

// A partition, under synctest with the default 5s poll: one failed poll is a blip, the
// second raises the alert once and the feed-up gauge drops, CheckFresh fails once the
// last confirmation is older than allowed, and the first poll after the partition
// converges on the CA's newer list.
func TestDenyFeedPartition(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		ca := testca.New(t, testca.WithTrustDomain(testTD))
		feed := newFakeFeed()
		c := newFeedClient(t, "https://ca.mesh.test:9443", ca.Roots(), testca.TLSCertificate(ca.SVID(t, idSelf)), nil)
		c.Watch.conn.hc.Transport = feed // in memory: see RoundTrip
		v1 := denyListOf(1, nil)
		feed.setList(t, signWith(t, ca, v1))

		start := time.Now()
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan error, 1)
		go func() { done <- c.Run(ctx) }()
		defer func() {
			cancel()
			if err := <-done; err != nil {
				t.Errorf("Run: %v", err)
			}
		}()
		synctest.Wait()
		if l := c.nextApplied(t); l.Version != 1 || !c.Watch.Confirmed().Equal(start) {
			t.Fatalf("first poll: version %d confirmed at %v, want 1 at once", l.Version, c.Watch.Confirmed().Sub(start))
		}
		if up := metricValue(t, c.reg, metricFeedUp, ""); up != 1 {
			t.Fatalf("feed_up = %v after the first list", up)
		}
		const maxAge = 12 * time.Second

		// Polls come every 4.5s to 5s: each advance lets exactly one happen.
		feed.setRawList(nil) // 503
		advance(5 * time.Second)
		if strings.Contains(c.logs.String(), "revocation feed unreachable") || metricValue(t, c.reg, metricFeedUp, "") != 1 {
			t.Fatal("one failed poll raised the alert")
		}
		feed.setUnreachable(true) // a closed listener
		advance(5 * time.Second)
		if n := strings.Count(c.logs.String(), "revocation feed unreachable"); n != 1 {
			t.Fatalf("alert logged %d times after two failed polls, want 1", n)
		}
		if up := metricValue(t, c.reg, metricFeedUp, ""); up != 0 {
			t.Errorf("feed_up = %v during the outage", up)
		}
		if err := c.Watch.CheckFresh(maxAge); err != nil {
			t.Errorf("CheckFresh after 10s: %v", err)
		}
		advance(5 * time.Second)
		err := c.Watch.CheckFresh(maxAge)
		if !errors.Is(err, ErrFeedStale) {
			t.Fatalf("CheckFresh after 15s = %v, want ErrFeedStale", err)
		}
		if n := strings.Count(c.logs.String(), "revocation feed unreachable"); n != 1 {
			t.Errorf("alert logged %d times, want once per outage", n)
		}
		if !c.Watch.Confirmed().Equal(start) {
			t.Errorf("confirmed moved during the outage: %v", c.Watch.Confirmed().Sub(start))
		}

		// Meanwhile the CA revoked someone. The next poll converges.
		v2 := denyListOf(2, nil, deniedID(idB, 2))
		feed.setUnreachable(false)
		feed.setList(t, signWith(t, ca, v2))
		advance(5 * time.Second)
		if l := c.Watch.State().DenyList(); l.Version != 2 {
			t.Fatalf("the first poll after the partition published version %d, want 2", l.Version)
		}
		if err := c.Watch.CheckFresh(maxAge); err != nil {
			t.Errorf("CheckFresh after recovery: %v", err)
		}
		if up := metricValue(t, c.reg, metricFeedUp, ""); up != 1 {
			t.Errorf("feed_up = %v after recovery", up)
		}
		if !strings.Contains(c.logs.String(), "revocation feed reachable again") {
			t.Error("recovery not logged")
		}
		if got, want := metricValue(t, c.reg, metricDenyListConfirmed, ""), float64(c.Watch.Confirmed().UnixNano())/1e9; got != want {
			t.Errorf("confirmed gauge %v, want %v", got, want)
		}
		select {
		case rec := <-c.audit:
			t.Errorf("a list refused during the partition: %+v", rec)
		default:
		}
	})
}

// advance moves the bubble's clock by d and lets every goroutine settle.
func advance(d time.Duration) {
	<-time.After(d)
	synctest.Wait()
}

// The watch publishes each directory it accepts as a new State, the CA's trust bundle
// with it, and signals Updated.
func TestWatchPublishesBundle(t *testing.T) {
	t.Parallel()
	ca, feed, c := newWatchOnly(t)
	bundle := meshapi.NewBundleDocument(ca.Roots())
	feed.setDirectory(t, meshapi.DirectoryDocument{Version: 5, Bundle: bundle})
	testrun.Start(t, c.Run)
	st := c.awaitState(t, "directory version 5", func(st *meshapi.State) bool { return st.Version() == 5 })
	if st.BundleVersion() != bundle.Version || len(st.Bundle()) != 1 || !st.Bundle()[0].Equal(ca.Roots()[0]) {
		t.Fatalf("published bundle %q of %d roots, want %q", st.BundleVersion(), len(st.Bundle()), bundle.Version)
	}

	// A document of an older CA has no bundle: the State has none, and the proxy keeps
	// the bundle it holds (node diffs only a published one).
	feed.setDirectory(t, meshapi.DirectoryDocument{Version: 7})
	st = c.awaitState(t, "directory version 7", func(st *meshapi.State) bool { return st.Version() == 7 })
	if st.BundleVersion() != "" || st.Bundle() != nil {
		t.Fatalf("state of a document without a bundle has bundle %q", st.BundleVersion())
	}
}

// newWatchOnly starts a client whose deny-lists arrive by the watch only: the poll
// fails once at start and then waits an hour, and a refused directory is retried quickly.
func newWatchOnly(t *testing.T) (*testca.CA, *fakeFeed, *feedClient) {
	t.Helper()
	ca := testca.New(t, testca.WithTrustDomain(testTD))
	feed := newFakeFeed()
	srv := serveFeed(t, ca, feed)
	c := newFeedClient(t, srv.URL, ca.Roots(), testca.TLSCertificate(ca.SVID(t, idSelf)), func(cfg *Config) {
		cfg.PollInterval = time.Hour
		cfg.Heartbeat = 50 * time.Millisecond
	})
	return ca, feed, c
}
