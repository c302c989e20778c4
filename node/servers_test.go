package node

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/proxy"
	"github.com/agentmesh/agentmesh/rotator"
)

// serve runs a server's Run until the test ends.
func serve(t *testing.T, run func(context.Context) error) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() {
		if err := run(ctx); err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	t.Cleanup(func() { cancel(); wg.Wait() })
}

// TestControlRotate: POST /rotate on the control socket rotates the identity named (the
// host's when none is), as the operator's uid, and refuses unknown identities and bodies.
func TestControlRotate(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	var got []rotator.RotateRequest
	var mu sync.Mutex
	find := func(id spiffeid.ID) (rotateFunc, bool) {
		if !id.IsZero() && id != planner {
			return nil, false
		}
		return func(_ context.Context, req rotator.RotateRequest) (rotator.RotateResult, error) {
			mu.Lock()
			defer mu.Unlock()
			got = append(got, req)
			return rotator.RotateResult{OldVersion: 1, NewVersion: 2, NewSerial: "42"}, nil
		}, true
	}
	c, err := newControl(dir, find, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	serve(t, c.Run)
	hc := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", filepath.Join(dir, ControlSocket))
	}}}
	post := func(body string) (int, string) {
		resp, err := hc.Post("http://proxy/rotate", "application/json", strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	code, body := post(`{"reason":"drill","compromised":true}`)
	var res rotator.RotateResult
	if err := json.Unmarshal([]byte(body), &res); code != http.StatusOK || err != nil || res.NewSerial != "42" {
		t.Fatalf("rotate the host: %d %s", code, body)
	}
	if code, _ := post(`{"spiffe_id":"` + planner.String() + `","reason":"drill"}`); code != http.StatusOK {
		t.Fatalf("rotate an agent: %d", code)
	}
	if code, _ := post(`{"spiffe_id":"` + search.String() + `","reason":"drill"}`); code != http.StatusNotFound {
		t.Fatalf("rotate an identity not held: %d, want 404", code)
	}
	if code, _ := post(`{"reason":"drill","force":true}`); code != http.StatusBadRequest {
		t.Fatalf("unknown field: %d, want 400", code)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(got) != 2 || got[0].Trigger != rotator.TriggerCompromise || !got[0].Compromised || got[1].Trigger != rotator.TriggerOperator ||
		got[0].Actor != audit.PeerUIDActor(os.Getuid()) || got[1].Actor != got[0].Actor {
		t.Fatalf("rotations = %+v", got)
	}
}

// readiness stands for the proxy's readiness and ticket keys.
type readiness struct{ err error }

func (r readiness) Ready() error                      { return r.err }
func (readiness) TicketKeys() []proxy.TicketKeyStatus { return nil }

// TestAdminReadiness: /readyz and /status give the same answer, which names why the
// proxy is not ready.
func TestAdminReadiness(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name           string
		identities, px error
		wantCode       int
		wantReady      bool
	}{
		{name: "ready", wantCode: http.StatusOK, wantReady: true},
		{name: "agent pending", identities: errAgentPending, wantCode: http.StatusServiceUnavailable},
		{name: "deny-list stale", px: errors.New("revocation_stale"), wantCode: http.StatusServiceUnavailable},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			statuses := func() []rotator.Status { return []rotator.Status{{SPIFFEID: testHost.String()}} }
			a, err := newAdmin("127.0.0.1:0", prometheus.NewRegistry(), func() error { return tc.identities }, statuses,
				readiness{tc.px}, slog.New(slog.DiscardHandler))
			if err != nil {
				t.Fatal(err)
			}
			serve(t, a.Run)
			resp, err := http.Get("http://" + a.Addr().String() + "/readyz")
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != tc.wantCode {
				t.Fatalf("/readyz = %d, want %d", resp.StatusCode, tc.wantCode)
			}
			resp, err = http.Get("http://" + a.Addr().String() + "/status")
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			var doc StatusDocument
			if err := json.NewDecoder(resp.Body).Decode(&doc); err != nil {
				t.Fatal(err)
			}
			if doc.Ready != tc.wantReady || (doc.NotReady == "") != tc.wantReady || len(doc.Identities) != 1 {
				t.Fatalf("/status = %+v, want ready=%t", doc, tc.wantReady)
			}
		})
	}
}
