package authority

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/smallstep/certificates/authority/config"
	"github.com/smallstep/certificates/authority/provisioner"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// The provisioner's claims pass step-ca's own validation for every accepted lifetime,
// with a minimum of at most 10s and default = maximum = the lifetime.
func TestSVIDClaims(t *testing.T) {
	t.Parallel()
	for _, lifetime := range []time.Duration{10 * time.Second, time.Minute, time.Hour, 24 * time.Hour, 90 * 24 * time.Hour} {
		c, err := provisioner.NewClaimer(svidClaims(lifetime), config.GlobalProvisionerClaims)
		if err != nil {
			t.Fatalf("claims for %v: %v", lifetime, err)
		}
		if c.MinTLSCertDuration() > 10*time.Second || c.DefaultTLSCertDuration() != lifetime ||
			c.MaxTLSCertDuration() != lifetime || c.IsDisableRenewal() || c.AllowRenewalAfterExpiry() {
			t.Errorf("claims for %v: %+v", lifetime, c.Claims())
		}
	}
}

func TestServingRenewIn(t *testing.T) {
	t.Parallel()
	nb := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	na := nb.Add(24 * time.Hour)
	for _, tc := range []struct {
		name string
		now  time.Time
		want time.Duration
	}{
		{"fresh", nb, 16 * time.Hour},
		{"half way", nb.Add(12 * time.Hour), 4 * time.Hour},
		{"past two thirds", nb.Add(20 * time.Hour), 0},
		{"expired", na.Add(time.Hour), 0},
	} {
		if got := servingRenewIn(nb, na, tc.now); got != tc.want {
			t.Errorf("%s: servingRenewIn = %v, want %v", tc.name, got, tc.want)
		}
	}
}

// Failed renewals of the serving certificate are retried after 1s, doubling up to 1m,
// and a success starts over.
func TestServingBackoff(t *testing.T) {
	t.Parallel()
	b := servingBackoff()
	want := []time.Duration{time.Second, 2 * time.Second, 4 * time.Second, 8 * time.Second,
		16 * time.Second, 32 * time.Second, time.Minute, time.Minute}
	for i, w := range want {
		if got := b.NextBackOff(); got != w {
			t.Fatalf("retry %d: %v, want %v", i+1, got, w)
		}
	}
	for range 22 {
		b.NextBackOff()
	}
	if got := b.NextBackOff(); got != time.Minute {
		t.Errorf("retry 31: %v, want the cap of 1m", got)
	}
	b.Reset()
	if got := b.NextBackOff(); got != time.Second {
		t.Errorf("after a success: %v, want 1s", got)
	}
}

// TestTokenIDLength: the CA never issues a token, hence a certificate, for a SPIFFE ID
// longer than the specification allows; the boundary is allowed.
func TestTokenIDLength(t *testing.T) {
	t.Parallel()
	prefix := testTD.IDString() + "/agent/"
	for n, wantErr := range map[int]bool{2048: false, 2049: true} {
		id := spiffeid.RequireFromString(prefix + strings.Repeat("a", n-len(prefix)))
		if err := CheckIssuable(testTD, id); errors.Is(err, ErrInvalidID) != wantErr {
			t.Errorf("%d bytes: %v", n, err)
		}
	}
}
