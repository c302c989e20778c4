package meshclient

import (
	"crypto/tls"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/agentmesh/agentmesh/internal/testca"
	"github.com/agentmesh/agentmesh/internal/testrun"
	"github.com/agentmesh/agentmesh/meshapi"
)

// registrations answers every registration in memory (see fakeFeed.RoundTrip) and
// hands over the requests it was sent.
type registrations chan meshapi.RegisterRequest

func (r registrations) RoundTrip(req *http.Request) (*http.Response, error) {
	var body meshapi.RegisterRequest
	if err := meshapi.DecodeStrict(req.Body, &body); err != nil {
		return nil, err
	}
	r <- body
	rec := httptest.NewRecorder()
	writeJSON(rec, meshapi.RegisterResponse{Version: 1})
	return rec.Result(), nil
}

// A kick sends the status at once, not at the end of the interval, yet never within
// kickDelay of the last heartbeat: kicks in a burst share one. The interval applies
// again afterwards.
func TestHeartbeatKick(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		ca := testca.New(t, testca.WithTrustDomain(testTD))
		cert := testca.TLSCertificate(ca.SVID(t, idSelf))
		var status atomic.Pointer[meshapi.ProxyStatus]
		status.Store(&meshapi.ProxyStatus{Version: "v1"})
		h, err := NewHeartbeat(Config{
			URL: "https://ca.mesh.test:9443", Roots: ca.Roots(),
			Certificate: func() (*tls.Certificate, error) { return cert, nil },
			Addresses:   addrs("10.0.0.9"), TunnelPort: 15008,
			Status: status.Load, Heartbeat: 10 * time.Second,
		})
		if err != nil {
			t.Fatal(err)
		}
		sent := make(registrations, 16)
		h.conn.hc.Transport = sent
		defer testrun.Start(t, h.Run)()
		// expect checks the versions of the statuses registered since the last call.
		expect := func(what string, want ...string) {
			t.Helper()
			synctest.Wait()
			var got []string
			for len(sent) > 0 {
				b := <-sent
				if b.Status == nil {
					t.Fatalf("%s: registration without status", what)
				}
				got = append(got, b.Status.Version)
			}
			if !slices.Equal(got, want) {
				t.Fatalf("%s: registrations with status %q, want %q", what, got, want)
			}
		}
		expect("at start", "v1")

		// Kicked at once after a registration: the next one waits for kickDelay, and
		// both kicks share it.
		status.Store(&meshapi.ProxyStatus{Version: "v2"})
		h.Kick()
		h.Kick()
		advance(kickDelay - time.Millisecond)
		expect("before kickDelay")
		advance(time.Millisecond)
		expect("kicked twice", "v2")

		// Kicked a while after: at once.
		advance(5 * time.Second)
		status.Store(&meshapi.ProxyStatus{Version: "v3"})
		h.Kick()
		expect("kicked later", "v3")
		advance(8 * time.Second) // under the interval minus its jitter
		expect("after the kick")
		advance(2 * time.Second)
		expect("at the interval", "v3")
	})
}

// A registration stays within meshapi.MaxRegisterBody and
// meshapi.MaxProxyStatusIdentities, leaving out the last identities, and leaves the
// status it was given unchanged.
func TestEncodeRegisterBounds(t *testing.T) {
	t.Parallel()
	identities := func(n, keys int) []meshapi.IdentityStatus {
		out := make([]meshapi.IdentityStatus, n)
		for i := range out {
			out[i] = meshapi.IdentityStatus{SPIFFEID: "spiffe://mesh.test/agent/" + strings.Repeat("a", i%50),
				Keys: make([]meshapi.KeyStatus, keys)}
			for k := range out[i].Keys {
				out[i].Keys[k] = meshapi.KeyStatus{Version: uint64(k), Serial: strings.Repeat("0f", 20), State: "destroyed",
					Cause: "overlap_end", Since: time.Now(), NotBefore: time.Now(), NotAfter: time.Now()}
			}
		}
		return out
	}
	for _, tc := range []struct {
		name       string
		status     *meshapi.ProxyStatus
		wantStatus bool
		wantIDs    int // -1: fewer than given, at least one
	}{
		{name: "no status"},
		{name: "small", status: &meshapi.ProxyStatus{Identities: identities(3, 2)}, wantStatus: true, wantIDs: 3},
		{name: "too many identities", status: &meshapi.ProxyStatus{Identities: identities(300, 1)}, wantStatus: true,
			wantIDs: meshapi.MaxProxyStatusIdentities},
		{name: "too large", status: &meshapi.ProxyStatus{Identities: identities(256, 40)}, wantStatus: true, wantIDs: -1},
		{name: "too large without identities", status: &meshapi.ProxyStatus{NotReady: strings.Repeat("x", meshapi.MaxRegisterBody)}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			var given int
			if tc.status != nil {
				given = len(tc.status.Identities)
			}
			b, err := encodeRegister(meshapi.RegisterRequest{Addresses: []string{"10.0.0.9"}, TunnelPort: 15008, Status: tc.status})
			if err != nil {
				t.Fatal(err)
			}
			if len(b) > meshapi.MaxRegisterBody {
				t.Fatalf("%d bytes, over %d", len(b), meshapi.MaxRegisterBody)
			}
			var got meshapi.RegisterRequest
			if err := json.Unmarshal(b, &got); err != nil {
				t.Fatal(err)
			}
			if (got.Status != nil) != tc.wantStatus || got.TunnelPort != 15008 {
				t.Fatalf("status sent: %t, want %t", got.Status != nil, tc.wantStatus)
			}
			if !tc.wantStatus {
				return
			}
			n := len(got.Status.Identities)
			switch {
			case tc.wantIDs >= 0 && n != tc.wantIDs, tc.wantIDs < 0 && (n == 0 || n >= given):
				t.Fatalf("%d identities sent of %d, want %d", n, given, tc.wantIDs)
			case got.Status.Identities[n-1].SPIFFEID != tc.status.Identities[n-1].SPIFFEID:
				t.Errorf("identities sent are not the first ones")
			case len(tc.status.Identities) != given:
				t.Errorf("the given status was changed")
			}
		})
	}
}
