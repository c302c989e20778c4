package ca

import (
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"log/slog"
	"net/http"
	"time"

	"github.com/go-chi/chi/v5"
	"github.com/go-chi/chi/v5/middleware"

	"github.com/agentmesh/agentmesh/ca/authority"
	"github.com/agentmesh/agentmesh/meshapi"
)

// apiHandler routes step-ca's API at / and /1.0 (as step-ca does), the mesh API at
// /mesh/v1, the witness's public API at /audit/v1 and the status page at /status/, behind the client certificate
// check (which admits requests without one).
func (s *Server) apiHandler() http.Handler {
	mux := chi.NewRouter()
	mux.Use(middleware.GetHead)
	authority.Route(mux)
	mux.Route(meshapi.Prefix, s.meshRoutes)
	// Public, no client certificate: everything the witness serves is signed.
	mux.Get(meshapi.WitnessPrefix+meshapi.WitnessCheckpointsPath, s.handleWitnessedLog)
	// Admin SVIDs only (Config.AdminIDs); everyone else gets 403, audited.
	status := s.requireAdmin(s.statusHandler())
	mux.Handle("/status", status)
	mux.Handle(statusPrefix+"*", status)
	return s.accessLog(s.auth.AuditIssuance(s.auth.RequireValidClientCert(s.interceptStepRevoke(s.guardLineage(mux)))))
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

// writeStepError answers in step-ca's error format.
func writeStepError(w http.ResponseWriter, status int, msg string) {
	authority.WriteError(w, status, msg)
}

// spkiSHA256 identifies a certificate's key in logs.
func spkiSHA256(c *x509.Certificate) string {
	sum := sha256.Sum256(c.RawSubjectPublicKeyInfo)
	return hex.EncodeToString(sum[:])
}
