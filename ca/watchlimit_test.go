package ca

import (
	"net/http"
	"strconv"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/meshapi"
)

// TestMeshWatchLimit: a client identity holds at most MaxWatches directory long-polls;
// one more is answered 429 at once and audited with the running count, another
// identity is not affected, and a slot comes back when a poll ends.
func TestMeshWatchLimit(t *testing.T) {
	cfg, _ := testConfig(t)
	cfg.MaxWatches = 2
	rec := &auditRecorder{}
	cfg.Audit = rec
	parked := make(chan struct{}, 8)
	ca := startCAWith(t, cfg, func(s *Server) {
		s.dir.testHookWaiting = func() { parked <- struct{}{} }
	})
	idH := spiffeid.RequireFromPath(testTD, "/host/h")
	h := enroll(t, ca, idH)
	hc := httpsClient(t, ca, tlsCert(h))
	other := httpsClient(t, ca, tlsCert(enroll(t, ca, spiffeid.RequireFromPath(testTD, "/host/other"))))
	dirURL := ca.URL() + meshapi.Prefix + meshapi.DirectoryPath
	_, body := do(t, hc, http.MethodGet, dirURL+"?wait=0s", nil)
	poll := dirURL + "?wait=60s&since=" + strconv.FormatUint(decodeJSON[meshapi.DirectoryDocument](t, body).Version, 10)

	statuses := make(chan int, cfg.MaxWatches)
	for range cfg.MaxWatches {
		go func() {
			resp, err := hc.Get(poll)
			if err != nil {
				statuses <- 0
				return
			}
			_ = resp.Body.Close()
			statuses <- resp.StatusCode
		}()
		<-parked
	}
	for i := range 2 {
		if status, body := do(t, hc, http.MethodGet, poll, nil); status != http.StatusTooManyRequests {
			t.Fatalf("long-poll %d over the limit: %d %s, want 429", cfg.MaxWatches+1+i, status, body)
		}
	}
	var refusals []WatchRefusal
	rec.mu.Lock()
	for _, e := range rec.events {
		if r, ok := e.(WatchRefusal); ok {
			refusals = append(refusals, r)
		}
	}
	rec.mu.Unlock()
	if len(refusals) != 2 || refusals[1] != (WatchRefusal{Actor: tlsActorOf(h), Limit: 2, Refused: 2}) {
		t.Errorf("audit records %+v, want two refusals of %s counting up to 2", refusals, idH)
	}
	// Another identity has slots of its own.
	go func() { _, _ = other.Get(poll) }()
	<-parked

	// A version change ends the parked polls; their slots come back.
	ca.dir.setEntries(nil)
	for range cfg.MaxWatches {
		if status := <-statuses; status != http.StatusOK {
			t.Errorf("parked long-poll answered %d, want 200", status)
		}
	}
	if status, _ := do(t, hc, http.MethodGet, dirURL+"?wait=0s", nil); status != http.StatusOK {
		t.Errorf("a poll after the others ended: %d, want 200", status)
	}
}

// TestAnchorMembersFollowers: a proxy that follows the directory without registering
// (it advertises no address) is a member of a rotation of the trust anchors, awaited
// like a registered one, with its last long-poll for a heartbeat; an agent that polls
// is not.
func TestAnchorMembersFollowers(t *testing.T) {
	cfg, _ := testConfig(t)
	ca := startCA(t, cfg)
	follower := spiffeid.RequireFromPath(testTD, "/host/follower")
	agent := spiffeid.RequireFromPath(testTD, "/agent/poller")
	dirURL := ca.URL() + meshapi.Prefix + meshapi.DirectoryPath + "?wait=0s"
	before := time.Now()
	for _, id := range []spiffeid.ID{follower, agent} {
		if status, body := do(t, httpsClient(t, ca, tlsCert(enroll(t, ca, id))), http.MethodGet, dirURL, nil); status != http.StatusOK {
			t.Fatalf("%s polls the directory: %d %s", id, status, body)
		}
	}
	st, err := ca.StartAnchorRotation(audit.Actor{Initiator: "uid:0"}, meshapi.RotateRequest{Kind: meshapi.RotateIntermediate})
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Members) != 1 || st.Members[0].ID != follower || st.Members[0].LastHeartbeat.Before(before.Add(-time.Second)) {
		t.Fatalf("members %+v, want the following proxy only, seen at its poll", st.Members)
	}
	if st.Phase != meshapi.PhaseDistribute || len(st.Missing) != 1 || st.Missing[0] != follower {
		t.Fatalf("phase %s missing %v, want distribute awaiting the following proxy", st.Phase, st.Missing)
	}
}
