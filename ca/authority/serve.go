package authority

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"sync/atomic"
	"time"

	"github.com/cenkalti/backoff/v5"
	"github.com/go-chi/chi/v5"
	"github.com/smallstep/certificates/api"
	apilog "github.com/smallstep/certificates/api/log"
	stepauthority "github.com/smallstep/certificates/authority"
	stepdb "github.com/smallstep/certificates/db"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/internal/svidrules"
)

// Route mounts step-ca's API on r at / and at /1.0, as step-ca does, with the roots
// and intermediates served from the authority's anchors (SetAnchors) and generations
// (routeCerts).
func Route(r chi.Router) {
	api.Route(r)
	routeCerts(r)
	r.Route("/1.0", func(r chi.Router) {
		api.Route(r)
		routeCerts(r)
	})
}

// BaseContext is the base context of API requests: step-ca's handlers find the
// authority and the database in it, and report errors to the logger through it. Call
// it after Start.
func (a *Authority) BaseContext() context.Context {
	ctx := context.WithValue(context.Background(), authorityKey{}, a)
	ctx = stepauthority.NewContext(ctx, a.step.Load())
	ctx = stepdb.NewContext(ctx, a.db)
	return apilog.WithErrorLogger(ctx, a.logAPIError)
}

// logAPIError logs an error step-ca answers with: refusals (4xx) at Info, failures
// (5xx) at Error. Only the error text is logged; step-ca keeps tokens in error details,
// which are left out.
func (a *Authority) logAPIError(_ http.ResponseWriter, r *http.Request, err error) {
	status := http.StatusInternalServerError
	var sc interface{ StatusCode() int }
	if errors.As(err, &sc) {
		status = sc.StatusCode()
	}
	level, msg := slog.LevelInfo, "ca request refused"
	if status >= 500 {
		level, msg = slog.LevelError, "ca request failed"
	}
	a.log.LogAttrs(r.Context(), level, msg,
		slog.String(keyMethod, r.Method), slog.String(keyPath, r.URL.Path),
		slog.Int(keyStatus, status), slog.String(keyErr, err.Error()))
}

// Serve serves srv over TLS on the listener Listen bound, with TLSConfig and
// BaseContext, until srv is shut down (http.ErrServerClosed). Call it after Start.
func (a *Authority) Serve(srv *http.Server) error {
	srv.TLSConfig = a.TLSConfig()
	srv.BaseContext = func(net.Listener) context.Context { return a.BaseContext() }
	return srv.ServeTLS(a.ln, "", "")
}

// TLSConfig serves the authority-issued certificate Start issued and
// RenewServingCert keeps fresh.
func (a *Authority) TLSConfig() *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS12,
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
			return a.servingCert.Load(), nil
		},
		// RequestClientCert, not VerifyClientCertIfGiven as step-ca uses: the TLS layer
		// asks for a certificate (mTLS /renew, /rekey, /revoke) but does not judge it, so
		// that an expired or revoked SVID is answered with an HTTP 401 the client treats as
		// permanent (and re-enrols) instead of a handshake failure it would retry.
		// RequireValidClientCert verifies the chain of every request that presents one.
		ClientAuth: tls.RequestClientCert,
	}
}

// RequireValidClientCert refuses (401) any request whose client certificate does not
// chain to an anchor through the intermediate of a generation held for client authentication now. step-ca's
// handlers take r.TLS.PeerCertificates[0] as authenticated, so nothing unverified may
// reach them.
func (a *Authority) RequireValidClientCert(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.TLS != nil && len(r.TLS.PeerCertificates) > 0 {
			if err := a.VerifyClientChain(r.TLS.PeerCertificates, time.Now()); err != nil {
				noteRefusal(r, audit.ReasonCertificateInvalid)
				WriteError(w, http.StatusUnauthorized, "client certificate not valid: "+err.Error())
				return
			}
		}
		next.ServeHTTP(w, r)
	})
}

// VerifyClientChain verifies a client certificate chain (leaf first) against the
// anchors (SetAnchors), through the intermediate of any generation held, for client
// authentication at now. It also applies the certificate rules x509
// verification lacks (a SPIFFE ID of at most 2,048 bytes, one intermediate: the CA's
// own hierarchy), as the proxies do; the key usage rule is KeyUsages here.
func (a *Authority) VerifyClientChain(chain []*x509.Certificate, now time.Time) error {
	if err := svidrules.CheckLeaf(chain[0], svidrules.Client); err != nil {
		return err
	}
	anchors := a.anchors.Load()
	if err := svidrules.CheckDepth(chain, anchors.roots, svidrules.DefaultMaxIntermediates); err != nil {
		return err
	}
	// Only the intermediates of the generations held, never one the client sends: a
	// retired intermediate whose key was destroyed stays valid under a kept root, and
	// must not be accepted once its generation is gone.
	_, err := chain[0].Verify(x509.VerifyOptions{
		Roots:         anchors.pool,
		Intermediates: a.pki.Load().intermediates,
		CurrentTime:   now,
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	})
	return err
}

// WriteError answers in step-ca's error format.
func WriteError(w http.ResponseWriter, status int, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(struct {
		Status  int    `json:"status"`
		Message string `json:"message"`
	}{status, msg})
}

// issueServingCert has the authority issue a new TLS serving certificate (step-ca's
// 24-hour certificate for the DNS names, signed by the intermediate in the token).
func (a *Authority) issueServingCert(auth *stepauthority.Authority) error {
	c, err := auth.GetTLSCertificate()
	if err != nil {
		return fmt.Errorf("issue tls serving certificate: %w", err)
	}
	if c.Leaf == nil {
		if c.Leaf, err = x509.ParseCertificate(c.Certificate[0]); err != nil {
			return fmt.Errorf("parse tls serving certificate: %w", err)
		}
	}
	a.servingCert.Store(c)
	a.log.Debug("tls serving certificate issued",
		keySerial, c.Leaf.SerialNumber.String(), keyNotAfter, c.Leaf.NotAfter)
	return nil
}

// RenewServingCert replaces the serving certificate when two thirds of its lifetime
// have passed, retrying failures with servingBackoff, until ctx is done. Call it after
// Start.
func (a *Authority) RenewServingCert(ctx context.Context) {
	auth := a.step.Load()
	renewServing(ctx, &a.servingCert, func() error { return a.issueServingCert(auth) }, a.log)
}

// renewServing is RenewServingCert's loop: issue replaces the certificate in cur.
func renewServing(ctx context.Context, cur *atomic.Pointer[tls.Certificate], issue func() error, log *slog.Logger) {
	retry := servingBackoff()
	wait := time.Duration(0)
	for {
		leaf := cur.Load().Leaf
		if wait == 0 {
			wait = servingRenewIn(leaf.NotBefore, leaf.NotAfter, time.Now())
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		if err := issue(); err != nil {
			wait = retry.NextBackOff()
			log.Warn("tls serving certificate renewal failed", keyErr, err,
				keyNotAfter, leaf.NotAfter, keyRetryIn, wait)
			continue
		}
		retry.Reset()
		wait = 0
	}
}

// servingRenewIn is how long to wait before renewing a certificate valid from
// notBefore to notAfter: until two thirds of its lifetime.
func servingRenewIn(notBefore, notAfter, now time.Time) time.Duration {
	at := notBefore.Add(notAfter.Sub(notBefore) * 2 / 3)
	return max(at.Sub(now), 0)
}

// servingBackoff is the wait between failed renewals of the serving certificate:
// doubling from 1s up to 1m, without jitter (one CA renews, nobody to spread from).
func servingBackoff() *backoff.ExponentialBackOff {
	return &backoff.ExponentialBackOff{
		InitialInterval:     time.Second,
		RandomizationFactor: 0,
		Multiplier:          2,
		MaxInterval:         time.Minute,
	}
}
