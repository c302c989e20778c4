package audit_test

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	mathbig "math/big"
	"net/url"
	"strings"
	"testing"

	"github.com/agentmesh/agentmesh/audit"
)

func TestTLSActor(t *testing.T) {
	t.Parallel()
	cert := func(uris ...string) *x509.Certificate {
		c := &x509.Certificate{SerialNumber: mathbig.NewInt(4242)}
		for _, u := range uris {
			parsed, err := url.Parse(u)
			if err != nil {
				t.Fatal(err)
			}
			c.URIs = append(c.URIs, parsed)
		}
		return c
	}
	state := func(c *x509.Certificate) *tls.ConnectionState {
		return &tls.ConnectionState{PeerCertificates: []*x509.Certificate{c}}
	}
	long := "spiffe://example.org/" + strings.Repeat("a", 2100)
	for _, tc := range []struct {
		name string
		cs   *tls.ConnectionState
		want audit.Actor
	}{
		{"svid", state(cert("spiffe://example.org/admin/op")), audit.Actor{Initiator: "spiffe://example.org/admin/op", CallerSerial: "4242"}},
		{"no spiffe id", state(cert()), audit.Actor{Initiator: audit.InitiatorUnknown, CallerSerial: "4242"}},
		{"two spiffe ids", state(cert("spiffe://example.org/a", "spiffe://example.org/b")), audit.Actor{Initiator: audit.InitiatorUnknown, CallerSerial: "4242"}},
		{"over-long spiffe id", state(cert(long)), audit.Actor{Initiator: audit.InitiatorUnknown, CallerSerial: "4242"}},
		{"no certificate", &tls.ConnectionState{}, audit.Actor{Initiator: audit.InitiatorUnauthenticated}},
		{"not tls", nil, audit.Actor{Initiator: audit.InitiatorUnauthenticated}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			if got := audit.TLSActor(tc.cs); got != tc.want {
				t.Errorf("TLSActor = %+v, want %+v", got, tc.want)
			}
		})
	}
}

func TestPeerUIDActor(t *testing.T) {
	t.Parallel()
	for uid, want := range map[int]string{0: "uid:0", 1000: "uid:1000", -1: audit.InitiatorUnknown} {
		if got := audit.PeerUIDActor(uid); got != (audit.Actor{Initiator: want}) {
			t.Errorf("PeerUIDActor(%d) = %+v, want initiator %q", uid, got, want)
		}
	}
}

// The actor sits flat in a record under its historical names, initiator and
// caller_serial, and the record answers who asked.
func TestActorWireNames(t *testing.T) {
	t.Parallel()
	ev := audit.Revocation{Actor: audit.Actor{Initiator: "spiffe://example.org/admin/op", CallerSerial: "7"}, Serial: "9", Result: "ok"}
	b, err := json.Marshal(ev)
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	if m["initiator"] != "spiffe://example.org/admin/op" || m["caller_serial"] != "7" || m["serial"] != "9" {
		t.Errorf("record %s", b)
	}
	var attributed audit.Event = ev
	if a, ok := attributed.(audit.Attributed); !ok || a.Caller() != ev.Actor {
		t.Errorf("Revocation does not answer its caller")
	}
	b, err = json.Marshal(audit.Revocation{Actor: audit.PeerUIDActor(0), Result: "ok"})
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(b), "caller_serial") {
		t.Errorf("a local caller's record has a caller_serial: %s", b)
	}
}
