package ca

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/agentmesh/agentmesh/meshapi"
	"log/slog"
	"net/http"
	"time"

	"github.com/go-chi/chi/v5"
	"github.com/go-chi/chi/v5/middleware"
	"github.com/smallstep/certificates/api"
	apilog "github.com/smallstep/certificates/api/log"
	"github.com/smallstep/certificates/authority"
	"github.com/smallstep/certificates/db"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/internal/svidrules"
)

// apiHandler routes step-ca's API at / and /1.0 (as step-ca does) and the mesh API at
// /mesh/v1, behind the client certificate check.
func (s *Server) apiHandler() http.Handler {
	mux := chi.NewRouter()
	mux.Use(middleware.GetHead)
	api.Route(mux)
	mux.Route("/1.0", func(r chi.Router) { api.Route(r) })
	mux.Route(meshapi.Prefix, s.meshRoutes)
	return s.accessLog(s.auditIssuance(s.requireValidClientCert(s.interceptStepRevoke(s.guardLineage(mux)))))
}

// apiContext is the base context of API requests: step-ca's handlers find the
// authority and the database in it, and report errors to the logger through it.
func (s *Server) apiContext(auth *authority.Authority) context.Context {
	ctx := authority.NewContext(context.Background(), auth)
	ctx = db.NewContext(ctx, s.db)
	return apilog.WithErrorLogger(ctx, s.logAPIError)
}

// logAPIError logs an error step-ca answers with: refusals (4xx) at Info, failures
// (5xx) at Error. Only the error text is logged; step-ca keeps tokens in error details,
// which are left out.
func (s *Server) logAPIError(_ http.ResponseWriter, r *http.Request, err error) {
	status := http.StatusInternalServerError
	var sc interface{ StatusCode() int }
	if errors.As(err, &sc) {
		status = sc.StatusCode()
	}
	level, msg := slog.LevelInfo, "ca request refused"
	if status >= 500 {
		level, msg = slog.LevelError, "ca request failed"
	}
	s.log.LogAttrs(r.Context(), level, msg,
		slog.String(keyMethod, r.Method), slog.String(keyPath, r.URL.Path),
		slog.Int(keyStatus, status), slog.String(keyErr, err.Error()))
}

// accessLog logs each request at Debug.
func (s *Server) accessLog(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !s.log.Enabled(r.Context(), slog.LevelDebug) {
			next.ServeHTTP(w, r)
			return
		}
		start := time.Now()
		ww := middleware.NewWrapResponseWriter(w, r.ProtoMajor)
		next.ServeHTTP(ww, r)
		s.log.LogAttrs(r.Context(), slog.LevelDebug, "ca request",
			slog.String(keyMethod, r.Method), slog.String(keyPath, r.URL.Path),
			slog.Int(keyStatus, ww.Status()), slog.Duration(keyDuration, time.Since(start)))
	})
}

// serverTLSConfig serves the authority-issued certificate held in s.servingCert.
func (s *Server) serverTLSConfig() *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS12,
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
			return s.servingCert.Load(), nil
		},
		// RequestClientCert, not VerifyClientCertIfGiven as step-ca uses: the TLS layer
		// asks for a certificate (mTLS /renew, /rekey, /revoke) but does not judge it, so
		// that an expired or revoked SVID is answered with an HTTP 401 the client treats as
		// permanent (and re-enrols) instead of a handshake failure it would retry.
		// requireValidClientCert verifies the chain of every request that presents one.
		ClientAuth: tls.RequestClientCert,
	}
}

// requireValidClientCert refuses (401) any request whose client certificate does not
// chain to the root through the intermediate for client authentication now. step-ca's
// handlers take r.TLS.PeerCertificates[0] as authenticated, so nothing unverified may
// reach them.
func (s *Server) requireValidClientCert(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.TLS != nil && len(r.TLS.PeerCertificates) > 0 {
			if err := s.verifyClientChain(r.TLS.PeerCertificates, time.Now()); err != nil {
				noteRefusal(r, audit.ReasonCertificateInvalid)
				writeStepError(w, http.StatusUnauthorized, "client certificate not valid: "+err.Error())
				return
			}
		}
		next.ServeHTTP(w, r)
	})
}

// verifyClientChain also applies the certificate rules x509 verification lacks (a
// SPIFFE ID of at most 2,048 bytes, one intermediate: the CA's own hierarchy), as
// the proxies do; the key usage rule is KeyUsages here.
func (s *Server) verifyClientChain(chain []*x509.Certificate, now time.Time) error {
	if err := svidrules.CheckLeaf(chain[0], svidrules.Client); err != nil {
		return err
	}
	if err := svidrules.CheckDepth(chain, []*x509.Certificate{s.certs.root}, svidrules.DefaultMaxIntermediates); err != nil {
		return err
	}
	inter := s.clientIntermediates
	if len(chain) > 1 {
		inter = s.clientIntermediates.Clone()
		for _, c := range chain[1:] {
			inter.AddCert(c)
		}
	}
	_, err := chain[0].Verify(x509.VerifyOptions{
		Roots:         s.clientRoots,
		Intermediates: inter,
		CurrentTime:   now,
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	})
	return err
}

// writeStepError answers in step-ca's error format.
func writeStepError(w http.ResponseWriter, status int, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(struct {
		Status  int    `json:"status"`
		Message string `json:"message"`
	}{status, msg})
}

// issueServingCert has the authority issue a new TLS serving certificate (step-ca's
// 24-hour certificate for the DNS names, signed by the intermediate in the token).
func (s *Server) issueServingCert(auth *authority.Authority) error {
	c, err := auth.GetTLSCertificate()
	if err != nil {
		return fmt.Errorf("issue tls serving certificate: %w", err)
	}
	if c.Leaf == nil {
		if c.Leaf, err = x509.ParseCertificate(c.Certificate[0]); err != nil {
			return fmt.Errorf("parse tls serving certificate: %w", err)
		}
	}
	s.servingCert.Store(c)
	s.log.Debug("tls serving certificate issued",
		keySerial, c.Leaf.SerialNumber.String(), keyNotAfter, c.Leaf.NotAfter)
	return nil
}

// renewServingCert replaces the serving certificate when two thirds of its lifetime
// have passed, retrying failures, until ctx is done.
func (s *Server) renewServingCert(ctx context.Context, auth *authority.Authority) {
	failures := 0
	for {
		leaf := s.servingCert.Load().Leaf
		wait := servingRenewIn(leaf.NotBefore, leaf.NotAfter, time.Now(), failures)
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		if err := s.issueServingCert(auth); err != nil {
			failures++
			s.log.Warn("tls serving certificate renewal failed", keyErr, err,
				keyNotAfter, leaf.NotAfter, keyRetryIn, servingRenewIn(leaf.NotBefore, leaf.NotAfter, time.Now(), failures))
			continue
		}
		failures = 0
	}
}

// servingRenewIn is how long to wait before (re)trying to renew a certificate valid
// from notBefore to notAfter: until two thirds of its lifetime, or after a failure
// a backoff doubling from 1s up to 1m.
func servingRenewIn(notBefore, notAfter, now time.Time, failures int) time.Duration {
	if failures > 0 {
		return min(time.Second<<min(failures-1, 6), time.Minute)
	}
	at := notBefore.Add(notAfter.Sub(notBefore) * 2 / 3)
	return max(at.Sub(now), 0)
}

// spkiSHA256 identifies a certificate's key in logs.
func spkiSHA256(c *x509.Certificate) string {
	sum := sha256.Sum256(c.RawSubjectPublicKeyInfo)
	return hex.EncodeToString(sum[:])
}
