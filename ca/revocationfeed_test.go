package ca

import (
	"crypto/tls"
	"net/http"
	"strconv"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/internal/metrictest"
	"github.com/agentmesh/agentmesh/internal/testaudit"
	"github.com/agentmesh/agentmesh/internal/testrun"
	"github.com/agentmesh/agentmesh/meshapi"
	"github.com/agentmesh/agentmesh/meshclient"
)

var idSelf = spiffeid.RequireFromPath(testTD, "/host/self")

// feedWatch is a proxy's Watch against a running CA, following the deny-lists its
// states carry.
type feedWatch struct {
	*meshclient.Watch
	follow *stateFollower
	audit  testaudit.DenyLists
	reg    *prometheus.Registry
	logs   *logBuffer
}

func newFeedWatch(t *testing.T, ca *runningCA, svid *x509svid.SVID, poll time.Duration) *feedWatch {
	t.Helper()
	logger, logs := newTestLogger(t)
	c := &feedWatch{audit: make(testaudit.DenyLists, 64), reg: prometheus.NewRegistry(), logs: logs}
	w, err := meshclient.NewWatch(meshclient.Config{
		URL: ca.URL(), Roots: ca.Roots(), PollInterval: poll,
		Certificate: func() (*tls.Certificate, error) { return tlsCert(svid), nil },
		Audit:       c.audit, Registerer: c.reg, Logger: logger,
	})
	if err != nil {
		t.Fatal(err)
	}
	c.Watch, c.follow = w, newStateFollower(w, time.Now())
	testrun.Start(t, w.Run)
	return c
}

// nextApplied returns the next newer list published, failing the test after a bound
// well under the CA's 25s long-poll: a pass means the watch was woken.
func (c *feedWatch) nextApplied(t *testing.T) *meshapi.DenyList {
	t.Helper()
	return c.follow.denyList(t)
}

// Against the real CA: a watch-only Watch gets the CA's first list, and a
// revocation reaches it through the woken long-poll (the poll waits an hour), signed
// by the CA's intermediate in the HSM and verified against the root. The revoked
// proxy's own Watch learns it too.
func TestDenyListFollowsRevocation(t *testing.T) {
	cfg, _ := testConfig(t)
	ca := startCA(t, cfg)
	watcher := enroll(t, ca, idSelf)
	victim := enroll(t, ca, idB)

	c := newFeedWatch(t, ca, watcher, time.Hour)
	v1 := c.nextApplied(t)
	if v1.Denies(idB, victim.Certificates[0].SerialNumber.String(), time.Time{}) {
		t.Fatal("the first list denies the victim")
	}
	victimDir := newFeedWatch(t, ca, victim, 100*time.Millisecond)
	victimDir.nextApplied(t)

	// Watch-only: no registration.
	status, body := do(t, httpsClient(t, ca, tlsCert(watcher)), http.MethodGet, ca.URL()+meshapi.Prefix+meshapi.DirectoryPath+"?wait=0s", nil)
	if doc := decodeJSON[meshapi.DirectoryDocument](t, body); status != http.StatusOK || len(doc.Peers) != 0 {
		t.Fatalf("directory: %d %s", status, body)
	}

	res, err := ca.Revoke(t.Context(), audit.Actor{Initiator: "test"}, meshapi.RevokeRequest{SPIFFEID: idB.String(), Reason: "key compromised"})
	if err != nil {
		t.Fatalf("Revoke: %v", err)
	}
	serial := victim.Certificates[0].SerialNumber.String()
	l := c.nextApplied(t)
	if l.Version != res.ListVersion || l.Version != v1.Version+1 || !l.Denies(idB, serial, time.Time{}) || l.Denies(idSelf, "1", time.Time{}) {
		t.Fatalf("applied %+v after revocation to version %d", l, res.ListVersion)
	}
	if c.Watch.State().DenyList() != l {
		t.Error("DenyList is not the list applied")
	}
	if len(l.IDs) != 1 || len(l.Serials) != len(res.Serials) {
		t.Fatalf("list %+v, revocation %+v", l, res)
	}
	select {
	case rec := <-c.audit:
		t.Fatalf("a list refused: %+v", rec)
	default:
	}
	if err := c.CheckFresh(time.Minute); err != nil {
		t.Error(err)
	}
	if !c.logs.Logged("deny list published", "version="+strconv.FormatUint(l.Version, 10)+" ", "source=directory") {
		t.Error("the list did not come with the directory")
	}
	if v := metrictest.Value(t, c.reg, "agentmesh_revocation_list_version"); v != float64(l.Version) {
		t.Errorf("list_version = %v, want %d", v, l.Version)
	}

	if l := victimDir.nextApplied(t); !l.Denies(idB, serial, time.Time{}) {
		t.Fatalf("the revoked proxy got %+v", l)
	}
}
