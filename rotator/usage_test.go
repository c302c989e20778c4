package rotator

import (
	"crypto"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"testing"
	"testing/synctest"
	"time"

	"github.com/agentmesh/agentmesh/policy"
)

func TestUsageTriggerFiresAtExactlyN(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const n = 5
		iss := newIssuer(t, time.Hour) // no scheduled renewal within the test
		r, rec := start(t, iss, policy.RotationPolicy{MaxHandshakes: n})
		first := r.Status().Current.Serial
		handshake := func() string {
			t.Helper()
			return signWith(t, r)
		}
		for range n - 1 {
			handshake()
		}
		synctest.Wait()
		if all := rec.all(); len(all) != 1 {
			t.Fatalf("%d rotations after %d handshakes, want only the enrolment", len(all), n-1)
		}
		// Reading without signing does not count: readiness probes, status, or a
		// resumed handshake, which presents the certificate but signs nothing.
		for range 10 {
			if _, err := r.GetX509SVID(); err != nil {
				t.Fatal(err)
			}
			if _, err := r.TLSCertificate(); err != nil {
				t.Fatal(err)
			}
			_ = r.Ready()
		}
		synctest.Wait()
		if len(rec.all()) != 1 || r.Status().Current.Handshakes != n-1 {
			t.Fatalf("status = %+v after reads, want %d handshakes and no rotation", r.Status().Current, n-1)
		}

		if got := handshake(); got != first {
			t.Fatalf("the %dth handshake presented %s, want %s", n, got, first)
		}
		synctest.Wait()
		all := rec.all()
		if len(all) != 2 {
			t.Fatalf("%d rotations after %d handshakes, want 2", len(all), n)
		}
		usage := all[1]
		if usage.Trigger != string(TriggerUsage) || usage.Initiator != initiatorRotator || usage.Result != "ok" || usage.OldSerial != first {
			t.Fatalf("record = %+v, want a usage rotation from %s by the rotator", usage, first)
		}
		st := r.Status()
		if st.Current.Serial != usage.NewSerial || st.Current.Handshakes != 0 || len(st.Overlap) != 1 || st.Overlap[0].Handshakes != n {
			t.Fatalf("status = %+v, want the new key with 0 handshakes and the old with %d in overlap", st, n)
		}
		if _, renews := iss.counts(); renews != 1 {
			t.Fatalf("renews = %d, want the usage rotation to renew with the current SVID", renews)
		}
		checkStates(t, rec, 1, first,
			step{"", StatePreActivation, Cause(TriggerEnroll)},
			step{StatePreActivation, StateActive, Cause(TriggerEnroll)},
			step{StateActive, StateOverlap, Cause(TriggerUsage)},
		)

		// Exactly once per key: handshakes signed with the key while its usage rotation
		// is in flight do not start another one.
		second := st.Current.Serial
		gate := make(chan struct{})
		iss.set(func(i *issuer) { i.gate = gate })
		for range n + 3 {
			if got := handshake(); got != second {
				t.Fatalf("presented %s while rotating, want %s", got, second)
			}
		}
		synctest.Wait()
		close(gate)
		synctest.Wait()
		all = rec.all()
		if len(all) != 3 || all[2].Trigger != string(TriggerUsage) || all[2].OldSerial != second {
			t.Fatalf("records = %+v, want one more usage rotation", all)
		}
		if _, renews := iss.counts(); renews != 2 {
			t.Fatalf("renews = %d, want 2", renews)
		}
	})
}

func TestUsageRotationRetriedAfterFailure(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		iss := newIssuer(t, time.Hour)
		p := policy.RotationPolicy{MaxHandshakes: 1, RetryMin: time.Second, RetryMax: time.Second}
		r, rec := start(t, iss, p)
		first := r.Status().Current.Serial
		iss.set(func(i *issuer) { i.fail = errors.New("ca unavailable") })
		signWith(t, r)
		synctest.Wait()
		iss.set(func(i *issuer) { i.fail = nil })
		advance(2 * time.Second)
		all := rec.all()
		if len(all) != 3 || all[1].Result != "error" || all[2].Result != "ok" ||
			all[1].Trigger != string(TriggerUsage) || all[2].Trigger != string(TriggerUsage) || all[2].OldSerial != first {
			t.Fatalf("records = %+v, want a failed usage rotation, then its retry", all)
		}
	})
}

// signWith signs with the current certificate's key, as a full handshake does, and
// returns the certificate's serial.
func signWith(t *testing.T, r *Rotator) string {
	t.Helper()
	cert, err := r.TLSCertificate()
	if err != nil {
		t.Fatalf("TLSCertificate: %v", err)
	}
	digest := sha256.Sum256([]byte("handshake transcript"))
	if _, err := cert.PrivateKey.(crypto.Signer).Sign(rand.Reader, digest[:], crypto.SHA256); err != nil {
		t.Fatalf("sign: %v", err)
	}
	return cert.Leaf.SerialNumber.String()
}
