package ca

import (
	"context"
	"errors"
	"io"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/internal/metrictest"
	"github.com/agentmesh/agentmesh/meshapi"
)

// statusCA starts an audited CA whose admin is /admin/ops, on a loopback status
// listener too, with host /host/a registered and reporting status.
func statusCA(t *testing.T, status *meshapi.ProxyStatus) (*runningCA, *auditRecorder, *prometheus.Registry, *http.Client) {
	t.Helper()
	cfg, _ := testConfig(t)
	rec := &auditRecorder{}
	reg := prometheus.NewRegistry()
	cfg.Audit, cfg.Registerer = rec, reg
	cfg.AdminIDs = []spiffeid.ID{spiffeid.RequireFromPath(testTD, "/admin/ops")}
	cfg.StatusListen = "127.0.0.1:0"
	ca := startCA(t, cfg)
	host := httpsClient(t, ca, tlsCert(enroll(t, ca, spiffeid.RequireFromPath(testTD, "/host/a"))))
	body := registerBody(15008, "127.0.0.1")
	body.BundleVersion = "bv-1"
	body.Status = status
	if code, b := do(t, host, http.MethodPost, ca.URL()+meshapi.Prefix+meshapi.RegisterPath, body); code != http.StatusOK {
		t.Fatalf("register: %d %s", code, b)
	}
	return ca, rec, reg, host
}

func hostStatusReport(now time.Time, keys ...meshapi.KeyStatus) *meshapi.ProxyStatus {
	return &meshapi.ProxyStatus{Version: "v1.2.3", Ready: true, Identities: []meshapi.IdentityStatus{{
		SPIFFEID: "spiffe://mesh.test/host/a", Ready: true, RenewAt: now.Add(40 * time.Second), Keys: keys,
	}}}
}

// A non-admin SVID, no certificate at all: 403 with its audit record and the
// counter; an admin SVID: the page with its security headers.
func TestStatusPageAccess(t *testing.T) {
	ca, rec, reg, host := statusCA(t, nil)
	anon := httpsClient(t, ca, nil)
	admin := httpsClient(t, ca, tlsCert(enroll(t, ca, spiffeid.RequireFromPath(testTD, "/admin/ops"))))

	for _, tc := range []struct {
		name      string
		hc        *http.Client
		path      string
		initiator string
		reason    statusRefusal
	}{
		{"host SVID", host, "/status/", "spiffe://mesh.test/host/a", refusedNotAdmin},
		{"host SVID, api", host, "/status/api", "spiffe://mesh.test/host/a", refusedNotAdmin},
		{"no certificate", anon, "/status/static/status.js", audit.InitiatorUnauthenticated, refusedNoCertificate},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := len(eventsOf[audit.StatusAccess](rec))
			n := metrictest.Value(t, reg, metricStatusRefused, labelReason, string(tc.reason))
			code, _ := do(t, tc.hc, http.MethodGet, ca.URL()+tc.path, nil)
			if code != http.StatusForbidden {
				t.Fatalf("GET %s = %d, want 403", tc.path, code)
			}
			recs := eventsOf[audit.StatusAccess](rec)
			if len(recs) != before+1 {
				t.Fatalf("%d status_access records, want %d", len(recs), before+1)
			}
			got := recs[len(recs)-1]
			if got.Initiator != tc.initiator || got.Path != tc.path || got.Result != audit.ResultRefused ||
				got.Reason != string(tc.reason) {
				t.Errorf("record %+v", got)
			}
			if got := metrictest.Value(t, reg, metricStatusRefused, labelReason, string(tc.reason)); got != n+1 {
				t.Errorf("%s{reason=%s} = %v, want %v", metricStatusRefused, tc.reason, got, n+1)
			}
		})
	}

	req, err := http.NewRequestWithContext(context.Background(), http.MethodGet, ca.URL()+"/status/", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := admin.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	page, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("admin GET /status/ = %d %v", resp.StatusCode, err)
	}
	for h, want := range map[string]string{
		"Content-Security-Policy": "default-src 'self'", "X-Frame-Options": "DENY", "Cache-Control": "no-store",
	} {
		if got := resp.Header.Get(h); !strings.Contains(got, want) {
			t.Errorf("%s = %q, want %q", h, got, want)
		}
	}
	for _, want := range []string{`id="fleet"`, `data-host="spiffe://mesh.test/host/a"`, `id="identities"`,
		`id="timeline"`, `id="revocations"`, `id="rotation"`, `id="witness"`, `/status/static/status.js`} {
		if !strings.Contains(string(page), want) {
			t.Errorf("page lacks %s", want)
		}
	}
	if strings.Contains(string(page), "<script>") {
		t.Error("page has an inline script")
	}
	if n := len(eventsOf[audit.StatusAccess](rec)); n != 3 {
		t.Errorf("%d status_access records after the admin's request, want 3", n)
	}
}

// The JSON document after a heartbeat with a status: the host, its version,
// readiness, bundle version, its identity with the current serial, the key timeline;
// a revocation appears with its initiator and moves the generation. The loopback
// listener serves the same document without a certificate.
func TestStatusDocumentAfterHeartbeat(t *testing.T) {
	now := time.Now().UTC().Truncate(time.Second)
	key := meshapi.KeyStatus{Version: 1, Serial: "12345", State: "active", Since: now.Add(-time.Second),
		NotBefore: now.Add(-2 * time.Second), NotAfter: now.Add(time.Minute)}
	ca, _, _, _ := statusCA(t, hostStatusReport(now, key))
	plain := &http.Client{Timeout: 10 * time.Second}
	url := "http://" + ca.StatusAddr().String() + "/status/api"

	code, b := do(t, plain, http.MethodGet, url, nil)
	if code != http.StatusOK {
		t.Fatalf("GET %s = %d %s", url, code, b)
	}
	doc := decodeJSON[statusDoc](t, b)
	if len(doc.Fleet) != 1 {
		t.Fatalf("fleet %+v", doc.Fleet)
	}
	f := doc.Fleet[0]
	if f.Host != "spiffe://mesh.test/host/a" || f.Version != "v1.2.3" || !f.Ready || !f.Reported ||
		f.BundleVersion != "bv-1" || !slices.Equal(f.Addresses, []string{"127.0.0.1"}) || f.TunnelPort != 15008 {
		t.Errorf("fleet row %+v", f)
	}
	if len(doc.Identities) != 1 || doc.Identities[0].Serial != "12345" || doc.Identities[0].State != "active" ||
		doc.Identities[0].Host != f.Host {
		t.Errorf("identities %+v", doc.Identities)
	}
	if len(doc.Timeline) != 1 || len(doc.Timeline[0].Segments) != 2 ||
		doc.Timeline[0].Segments[0].State != "pre-activation" || doc.Timeline[0].Segments[1].State != "active" {
		t.Errorf("timeline %+v", doc.Timeline)
	}
	if len(doc.Witness) != 0 || doc.Rotation.Phase != "" || len(doc.Revocations) != 0 {
		t.Errorf("witness %+v, rotation %+v, revocations %+v", doc.Witness, doc.Rotation, doc.Revocations)
	}

	actor := audit.Actor{Initiator: "uid:0"}
	if _, err := ca.Revoke(context.Background(), actor, meshapi.RevokeRequest{SPIFFEID: "spiffe://mesh.test/agent/x",
		Reason: "key leaked"}); err != nil {
		t.Fatal(err)
	}
	_, b = do(t, plain, http.MethodGet, url, nil)
	after := decodeJSON[statusDoc](t, b)
	if len(after.Revocations) != 1 || after.Revocations[0].SPIFFEID != "spiffe://mesh.test/agent/x" ||
		after.Revocations[0].Initiator != "uid:0" || after.Revocations[0].Reason != "key leaked" ||
		after.Revocations[0].Cutoff.IsZero() {
		t.Errorf("revocations %+v", after.Revocations)
	}
	if after.Generation <= doc.Generation || after.ListVersion <= doc.ListVersion {
		t.Errorf("generation %d -> %d, list version %d -> %d", doc.Generation, after.Generation, doc.ListVersion, after.ListVersion)
	}
	_, b = do(t, plain, http.MethodGet, url, nil)
	if again := decodeJSON[statusDoc](t, b); again.Generation != after.Generation {
		t.Errorf("generation moved without a change: %d -> %d", after.Generation, again.Generation)
	}
}

// An invalid status is dropped, the registration stands, and the page says why.
func TestStatusInvalidDropped(t *testing.T) {
	ca, _, _, _ := statusCA(t, &meshapi.ProxyStatus{Version: "v1\x00"})
	doc := ca.statusDocument(time.Now())
	if len(doc.Fleet) != 1 || doc.Fleet[0].Reported || !strings.Contains(doc.Fleet[0].Invalid, "version") {
		t.Errorf("fleet %+v", doc.Fleet)
	}
}

func TestListenStatusLoopbackOnly(t *testing.T) {
	t.Parallel()
	for _, addr := range []string{"0.0.0.0:0", ":0", "192.0.2.1:0", "example.org:0", "nonsense"} {
		if ln, err := listenStatus(addr); !errors.Is(err, ErrInvalidConfig) {
			if ln != nil {
				_ = ln.Close()
			}
			t.Errorf("listenStatus(%q) = %v, want ErrInvalidConfig", addr, err)
		}
	}
	for _, addr := range []string{"127.0.0.1:0", "[::1]:0"} {
		ln, err := listenStatus(addr)
		if err != nil {
			t.Logf("listenStatus(%q): %v", addr, err) // ::1 may be absent
			continue
		}
		_ = ln.Close()
	}
}

// A rotation of the trust anchors and a witnessed host log, as the document and the
// page show them.
func TestStatusRotationAndWitness(t *testing.T) {
	ca, _, _, _ := statusCA(t, nil)
	if _, err := StartRotation(context.Background(), ca.cfg.StateDir,
		meshapi.RotateRequest{Kind: meshapi.RotateIntermediate, Reason: "test"}); err != nil {
		t.Fatal(err)
	}
	h := newWitnessHost(t, ca, "w1")
	h.log.add(t, "a", 3)
	h.log.sign(t)
	h.accept(t, ca, h.log.request(t, 0))

	doc := ca.statusDocument(time.Now())
	if r := doc.Rotation; r.Phase != string(meshapi.PhaseDistribute) || r.Kind != string(meshapi.RotateIntermediate) ||
		!slices.Equal(r.Missing, []string{"spiffe://mesh.test/host/a"}) || r.Started.IsZero() {
		t.Errorf("rotation %+v", r)
	}
	if len(doc.Witness) != 1 || doc.Witness[0].Origin != h.log.origin || doc.Witness[0].Size != 3 ||
		doc.Witness[0].State != string(witnessOK) {
		t.Errorf("witness %+v", doc.Witness)
	}
	var page strings.Builder
	if err := statusTemplate.Execute(&page, doc); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{`id="rotation" data-phase="distribute"`, `data-origin="` + h.log.origin + `" data-state="ok"`,
		`<li data-host="spiffe://mesh.test/host/a">`} {
		if !strings.Contains(page.String(), want) {
			t.Errorf("page lacks %s", want)
		}
	}
}

// What proxies report is text on the page, never markup.
func TestStatusPageEscapes(t *testing.T) {
	t.Parallel()
	evil := `"><script>alert(1)</script>`
	doc := statusDoc{Fleet: []fleetRow{{Host: "spiffe://mesh.test/host/a" + evil, Reported: true, NotReady: evil}},
		Identities:  []identityRow{{SPIFFEID: "spiffe://mesh.test/x", State: evil, Error: evil}},
		Revocations: []revocationRow{{SPIFFEID: "spiffe://mesh.test/x", Reason: evil}}}
	var page strings.Builder
	if err := statusTemplate.Execute(&page, doc); err != nil {
		t.Fatal(err)
	}
	if strings.Contains(page.String(), "<script>alert") || strings.Contains(page.String(), evil) {
		t.Errorf("reported text rendered as markup:\n%s", page.String())
	}
}
