package meshclient

import (
	"crypto/tls"
	"encoding/json"
	"errors"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/agentmesh/agentmesh/internal/testca"
	"github.com/agentmesh/agentmesh/internal/testrun"
	"github.com/agentmesh/agentmesh/meshapi"
)

// ackServer stands for the CA's acknowledgement endpoint over real TLS: it serves
// the certificate set last, records each acknowledgement with the ID of the caller's
// certificate, and answers the status set last.
type ackServer struct {
	*httptest.Server
	cert   atomic.Pointer[tls.Certificate]
	status atomic.Int32
	mu     sync.Mutex
	acks   []meshapi.AnchorAck
	from   []string
}

func newAckServer(t *testing.T, serving *tls.Certificate) *ackServer {
	t.Helper()
	s := &ackServer{}
	s.cert.Store(serving)
	s.status.Store(http.StatusOK)
	s.Server = httptest.NewUnstartedServer(http.HandlerFunc(s.serve))
	// Per handshake, since without SNI (an IP address) GetCertificate is not asked.
	s.TLS = &tls.Config{GetConfigForClient: func(*tls.ClientHelloInfo) (*tls.Config, error) {
		return &tls.Config{Certificates: []tls.Certificate{*s.cert.Load()}, ClientAuth: tls.RequestClientCert}, nil
	}}
	// Handshakes the client refuses are expected here.
	s.Config.ErrorLog = slog.NewLogLogger(slog.DiscardHandler, slog.LevelError)
	s.StartTLS()
	t.Cleanup(s.Close)
	return s
}

func (s *ackServer) serve(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost || r.URL.Path != meshapi.Prefix+meshapi.AnchorAckPath {
		http.NotFound(w, r)
		return
	}
	var ack meshapi.AnchorAck
	if err := json.NewDecoder(r.Body).Decode(&ack); err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	if len(r.TLS.PeerCertificates) == 0 {
		writeError(w, http.StatusUnauthorized, "no client certificate")
		return
	}
	id, err := x509svid.IDFromCert(r.TLS.PeerCertificates[0])
	if err != nil {
		writeError(w, http.StatusUnauthorized, err.Error())
		return
	}
	s.mu.Lock()
	s.acks, s.from = append(s.acks, ack), append(s.from, id.String())
	s.mu.Unlock()
	if st := int(s.status.Load()); st != http.StatusOK {
		writeError(w, st, "refused")
		return
	}
	writeJSON(w, map[string]any{})
}

func (s *ackServer) received() ([]meshapi.AnchorAck, []string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]meshapi.AnchorAck(nil), s.acks...), append([]string(nil), s.from...)
}

// TestAnchorsFollowTheCA: the mesh client verifies the CA with the anchors held at each
// handshake: a CA serving under a new root is refused until the anchors hold it, then
// reached by the same client. Acknowledgements carry the host SVID; a 409 says the step
// is stale, another refusal does not.
func TestAnchorsFollowTheCA(t *testing.T) {
	t.Parallel()
	old := testca.New(t, testca.WithTrustDomain(testTD))
	next := testca.New(t, testca.WithTrustDomain(testTD))
	srv := newAckServer(t, servingCertificate(t, old))
	anchors := NewAnchors(old.Roots())
	host := testca.TLSCertificate(old.SVID(t, idA))
	w, err := NewWatch(Config{URL: srv.URL, Anchors: anchors,
		Certificate: func() (*tls.Certificate, error) { return host, nil }})
	if err != nil {
		t.Fatal(err)
	}
	ack := meshapi.AnchorAck{ID: 9, Phase: meshapi.PhaseDistribute, BundleVersion: "0123456789abcdef"}
	if err := w.AckAnchor(t.Context(), ack); err != nil {
		t.Fatalf("ack under the old root: %v", err)
	}

	// The issuer's client shares the anchors: it reaches the CA (which answers its
	// enrolment 404 here) exactly when the watch does.
	issuer, err := NewClient(ClientConfig{URL: srv.URL, Anchors: anchors, Token: fixedToken("t")})
	if err != nil {
		t.Fatal(err)
	}
	reached := func() bool {
		_, err := issuer.Enroll(t.Context(), idA, testca.NewKey(t))
		_, ok := errors.AsType[*meshapi.ResponseError](err)
		return ok
	}

	srv.cert.Store(servingCertificate(t, next))
	err = w.AckAnchor(t.Context(), ack)
	if _, ok := errors.AsType[*meshapi.ResponseError](err); err == nil || ok || reached() {
		t.Fatalf("ack to a CA serving under a root not held: %v, want a TLS failure, for the issuer too", err)
	}
	anchors.Set(append(old.Roots(), next.Roots()...))
	if err := w.AckAnchor(t.Context(), ack); err != nil || !reached() {
		t.Fatalf("ack once the new root is held: %v, or the issuer does not reach the CA", err)
	}
	acks, from := srv.received()
	if len(acks) != 2 || acks[1] != ack || from[1] != idA.String() {
		t.Fatalf("CA received %+v from %v, want two acks %+v from %s", acks, from, ack, idA)
	}

	for _, tc := range []struct {
		status int
		stale  bool
	}{{http.StatusConflict, true}, {http.StatusBadRequest, false}} {
		srv.status.Store(int32(tc.status))
		err := w.AckAnchor(t.Context(), ack)
		re, ok := errors.AsType[*meshapi.ResponseError](err)
		if !ok || re.Status != tc.status || errors.Is(err, ErrStaleStep) != tc.stale {
			t.Errorf("answer %d: %v, want a ResponseError, stale %t", tc.status, err, tc.stale)
		}
	}
}

// TestAnchorsVerifyDenyList: a deny-list signed under a root the anchors do not hold
// is refused as forged; once they hold it, the list applies.
func TestAnchorsVerifyDenyList(t *testing.T) {
	t.Parallel()
	old := testca.New(t, testca.WithTrustDomain(testTD))
	next := testca.New(t, testca.WithTrustDomain(testTD))
	feed := newFakeFeed()
	srv := serveFeed(t, old, feed)
	anchors := NewAnchors(old.Roots())
	c := newFeedClient(t, srv.URL, nil, testca.TLSCertificate(old.SVID(t, idSelf)), func(cfg *Config) {
		cfg.Anchors, cfg.PollInterval = anchors, 10*time.Millisecond
	})
	feed.setList(t, signWith(t, next, denyListOf(1, nil)))
	testrun.Start(t, c.Run)
	if rec := c.audit.Next(t); rec.Result != denyResultRefused || rec.Reason != denyReasonBadSignature {
		t.Fatalf("record %+v, want refused %s", rec, denyReasonBadSignature)
	}
	anchors.Set(append(old.Roots(), next.Roots()...))
	if l := c.nextApplied(t); l.Version != 1 {
		t.Fatalf("applied version %d, want 1", l.Version)
	}
}
