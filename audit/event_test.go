package audit_test

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/agentmesh/agentmesh/audit"
)

func TestOwnEventsHaveNoHeaderKeys(t *testing.T) {
	t.Parallel()
	now := time.Now()
	full := []audit.Event{
		audit.Handshake{Direction: "d", Result: "r", Reason: "x", Transport: "t", LocalID: "l", LocalSerial: "ls", PeerID: "p",
			PeerSerial: "s", PeerAddr: "a", TLSVersion: "v", Cipher: "c", Resumed: true, Duration: 1},
		audit.Rotation{SPIFFEID: "i", Trigger: "t", Actor: audit.Actor{Initiator: "i", CallerSerial: "cs"}, OldSerial: "o", NewSerial: "n",
			NotAfter: now, Result: "r", Reason: "x", Started: now, Finished: now},
		audit.Connection{Direction: "d", PeerID: "p", PeerSerial: "s", LocalSerial: "l", Target: "t",
			BytesIn: 1, BytesOut: 2, Duration: 3, Reason: "r"},
		audit.Revocation{Actor: audit.Actor{Initiator: "i", CallerSerial: "cs"}, SPIFFEID: "s", Serial: "n", Reason: "r", Result: "ok", Error: "e",
			Serials: []string{"1"}, ListVersion: 2},
		audit.DenyListChange{Version: 2, Previous: 1, Result: "refused", Reason: "gap", Error: "e", IDs: 1, Serials: 2,
			Closed: 3, Lag: 4},
		audit.KeyState{Key: "svid", SPIFFEID: "s", Version: 1, Serial: "n", From: "active", To: "overlap",
			Cause: "time", NotAfter: now},
	}
	for _, e := range full {
		b, err := json.Marshal(e)
		if err != nil {
			t.Fatal(err)
		}
		for _, k := range topLevelKeys(t, b) {
			switch strings.ToLower(k) {
			case "seq", "time", "type", "prev", "hash":
				t.Errorf("%T has header key %q", e, k)
			}
		}
	}
}

type badKind struct{}

func (badKind) Kind() string { return "Bad Kind" }

type seqField struct {
	Seq int `json:"seq"`
}

func (seqField) Kind() string { return "custom" }

type upperType struct{ Type string }

func (upperType) Kind() string { return "custom" }

type notObject string

func (notObject) Kind() string { return "custom" }

type unmarshalable struct{ C chan int }

func (unmarshalable) Kind() string { return "custom" }

type big struct {
	Blob string `json:"blob"`
}

func (big) Kind() string { return "custom" }

type okCustom struct {
	Policy string `json:"policy"`
}

func (okCustom) Kind() string { return "policy.reload" }

func TestAppendInvalidEvent(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		e    audit.Event
	}{
		{name: "nil", e: nil},
		{name: "bad kind", e: badKind{}},
		{name: "header key", e: seqField{Seq: 7}},
		{name: "header key in other case", e: upperType{Type: "x"}},
		{name: "not an object", e: notObject("x")},
		{name: "unmarshalable", e: unmarshalable{}},
		{name: "too large", e: big{Blob: strings.Repeat("x", 1<<20)}},
	}
	reg := prometheus.NewRegistry()
	path := tempLog(t)
	l := start(t, audit.Config{Path: path, Registerer: reg})
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if err := l.Append(tc.e); !errors.Is(err, audit.ErrInvalidEvent) {
				t.Errorf("Append = %v, want ErrInvalidEvent", err)
			}
		})
	}
	if err := l.Err(); err != nil {
		t.Errorf("Err after invalid events = %v, want nil", err)
	}
	if err := l.Append(okCustom{Policy: "v2"}); err != nil {
		t.Errorf("Append(custom event) = %v", err)
	}
	if err := l.stop(); err != nil {
		t.Fatal(err)
	}
	if got := counter(t, reg, "agentmesh_audit_errors_total", "encode"); got != float64(len(tests)) {
		t.Errorf("errors_total{op=encode} = %v, want %d", got, len(tests))
	}
	if got := counter(t, reg, "agentmesh_audit_records_total", ""); got != 1 {
		t.Errorf("records_total = %v, want 1", got)
	}
	if n, err := verifyFile(t, path); n != 1 || err != nil {
		t.Errorf("Verify = %d, %v; want 1, nil", n, err)
	}
}

// The typed values are the audit log's wire format: existing logs, audit readers and
// dashboards match these strings, so renaming a constant must not change one.
func TestTypedValuesKeepTheirWireStrings(t *testing.T) {
	t.Parallel()
	wire := map[string]struct {
		rec  audit.Event
		want string
	}{
		"handshake refused": {rec: audit.Handshake{Result: audit.ResultRefused},
			want: `{"direction":"","result":"refused","transport":"","resumed":false,"duration_ns":0}`},
		"rotation ok": {rec: audit.Rotation{Result: audit.ResultOK},
			want: `{"spiffe_id":"","trigger":"","initiator":"","result":"ok","started":"0001-01-01T00:00:00Z","finished":"0001-01-01T00:00:00Z"}`},
		"revocation error": {rec: audit.Revocation{Result: audit.ResultError},
			want: `{"initiator":"","result":"error"}`},
		"policy applied": {rec: audit.Policy{Result: audit.LoadApplied},
			want: `{"path":"","version":0,"result":"applied","closed":0}`},
		"policy refused": {rec: audit.Policy{Result: audit.LoadRefused},
			want: `{"path":"","version":0,"result":"refused","closed":0}`},
		"authorization denied": {rec: audit.Authorization{Result: audit.AuthzDenied},
			want: `{"direction":"","result":"denied","rule":""}`},
		"authorization closed": {rec: audit.Authorization{Result: audit.AuthzClosed},
			want: `{"direction":"","result":"closed","rule":""}`},
		"new svid key": {rec: audit.KeyState{Key: audit.KeySVID, From: audit.PhaseNone, To: audit.PhasePreActivation},
			want: `{"key":"svid","version":0,"to":"pre-activation","cause":""}`},
		"ticket key retired": {rec: audit.KeyState{Key: audit.KeyTicket, From: audit.PhaseActive, To: audit.PhaseOverlap},
			want: `{"key":"ticket","version":0,"from":"active","to":"overlap","cause":""}`},
		"compromised key destroyed": {rec: audit.KeyState{Key: audit.KeySVID, From: audit.PhaseCompromised, To: audit.PhaseDestroyed},
			want: `{"key":"svid","version":0,"from":"compromised","to":"destroyed","cause":""}`},
	}
	for name, tc := range wire {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			b, err := json.Marshal(tc.rec)
			if err != nil {
				t.Fatal(err)
			}
			if string(b) != tc.want {
				t.Errorf("marshal = %s\nwant      %s", b, tc.want)
			}
		})
	}
}
