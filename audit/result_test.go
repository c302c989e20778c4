package audit_test

import (
	"encoding/json"
	"testing"

	"github.com/agentmesh/agentmesh/audit"
)

// The typed values are the audit log's wire format: existing logs, audit readers and
// dashboards match these strings, so renaming a constant must not change one.
func TestTypedValuesKeepTheirWireStrings(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		rec  audit.Event
		want string
	}{
		{name: "handshake refused", rec: audit.Handshake{Result: audit.ResultRefused},
			want: `{"direction":"","result":"refused","transport":"","resumed":false,"duration_ns":0}`},
		{name: "rotation ok", rec: audit.Rotation{Result: audit.ResultOK},
			want: `{"spiffe_id":"","trigger":"","initiator":"","result":"ok","started":"0001-01-01T00:00:00Z","finished":"0001-01-01T00:00:00Z"}`},
		{name: "revocation error", rec: audit.Revocation{Result: audit.ResultError},
			want: `{"initiator":"","result":"error"}`},
		{name: "policy applied", rec: audit.Policy{Result: audit.LoadApplied},
			want: `{"path":"","version":0,"result":"applied","closed":0}`},
		{name: "policy refused", rec: audit.Policy{Result: audit.LoadRefused},
			want: `{"path":"","version":0,"result":"refused","closed":0}`},
		{name: "authorization denied", rec: audit.Authorization{Result: audit.AuthzDenied},
			want: `{"direction":"","result":"denied","rule":""}`},
		{name: "authorization closed", rec: audit.Authorization{Result: audit.AuthzClosed},
			want: `{"direction":"","result":"closed","rule":""}`},
		{name: "new svid key", rec: audit.KeyState{Key: audit.KeySVID, From: audit.PhaseNone, To: audit.PhasePreActivation},
			want: `{"key":"svid","version":0,"to":"pre-activation","cause":""}`},
		{name: "ticket key retired", rec: audit.KeyState{Key: audit.KeyTicket, From: audit.PhaseActive, To: audit.PhaseOverlap},
			want: `{"key":"ticket","version":0,"from":"active","to":"overlap","cause":""}`},
		{name: "compromised key destroyed", rec: audit.KeyState{Key: audit.KeySVID, From: audit.PhaseCompromised, To: audit.PhaseDestroyed},
			want: `{"key":"svid","version":0,"from":"compromised","to":"destroyed","cause":""}`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
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
