package authority

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"log/slog"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"
)

// The serving certificate is renewed at two thirds of its life; failures are retried
// after 1s, 2s, 4s, and a success starts the schedule over from the new certificate.
func TestRenewServing(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const life = 3 * time.Hour
		start := time.Now()
		var cur atomic.Pointer[tls.Certificate]
		store := func() {
			cur.Store(&tls.Certificate{Leaf: &x509.Certificate{NotBefore: time.Now(), NotAfter: time.Now().Add(life)}})
		}
		store()
		var calls []time.Duration
		issue := func() error {
			calls = append(calls, time.Since(start))
			if len(calls) <= 3 {
				return errors.New("token unavailable")
			}
			store()
			return nil
		}
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan struct{})
		go func() {
			renewServing(ctx, &cur, issue, slog.New(slog.DiscardHandler))
			close(done)
		}()
		time.Sleep(4*time.Hour + 8*time.Second) //nolint:forbidigo // synctest: advances the bubble's clock
		synctest.Wait()
		cancel()
		<-done
		first := 2 * time.Hour
		want := []time.Duration{first, first + time.Second, first + 3*time.Second, first + 7*time.Second, first + 7*time.Second + first}
		if len(calls) != len(want) {
			t.Fatalf("renewals at %v, want %v", calls, want)
		}
		for i := range want {
			if calls[i] != want[i] {
				t.Fatalf("renewals at %v, want %v", calls, want)
			}
		}
	})
}
