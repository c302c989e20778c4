package meshapi

import (
	"context"
	"encoding/json"
	"net/http"

	"github.com/go-chi/chi/v5"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Backend is the server side of the mesh API, as the CA implements it. Mount owns the
// routes and authenticates every request; the Backend decides. Each handler is called
// only for a caller whose client certificate VerifyCaller accepted, and reads it with
// Caller.
type Backend interface {
	// VerifyCaller returns the SPIFFE ID of the request's client certificate when it
	// is a valid X509-SVID of the trust domain now; otherwise an error, which Mount
	// answers 401 through Refuse.
	VerifyCaller(r *http.Request) (spiffeid.ID, error)
	// Refuse answers a request with an error (step-ca's error format) and records it.
	// caller is zero when not known.
	Refuse(w http.ResponseWriter, r *http.Request, status int, caller spiffeid.ID, msg string)

	Register(w http.ResponseWriter, r *http.Request)    // POST RegisterPath
	Watch(w http.ResponseWriter, r *http.Request)       // GET DirectoryPath
	Revoke(w http.ResponseWriter, r *http.Request)      // POST RevokePath
	Reinstate(w http.ResponseWriter, r *http.Request)   // POST ReinstatePath
	Revocations(w http.ResponseWriter, r *http.Request) // GET RevocationsPath
	AgentToken(w http.ResponseWriter, r *http.Request)  // POST AgentTokenPath
	AnchorAck(w http.ResponseWriter, r *http.Request)   // POST AnchorAckPath
	// AuditCheckpoint witnesses the caller's audit checkpoint (POST
	// AuditCheckpointPath).
	AuditCheckpoint(w http.ResponseWriter, r *http.Request)
}

// Mount mounts the mesh API of s on r (the router of Prefix): every route requires a
// client certificate that s.VerifyCaller accepts.
func Mount(r chi.Router, s Backend) {
	r.Use(func(next http.Handler) http.Handler { return requireSVID(s, next) })
	r.Post(RegisterPath, s.Register)
	r.Get(DirectoryPath, s.Watch)
	r.Post(RevokePath, s.Revoke)
	r.Post(ReinstatePath, s.Reinstate)
	r.Get(RevocationsPath, s.Revocations)
	r.Post(AgentTokenPath, s.AgentToken)
	r.Post(AnchorAckPath, s.AnchorAck)
	r.Post(AuditCheckpointPath, s.AuditCheckpoint)
}

type callerKey struct{}

// requireSVID admits only requests with a client certificate s accepts, and records
// its ID for the handlers.
func requireSVID(s Backend, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.TLS == nil || len(r.TLS.PeerCertificates) == 0 {
			s.Refuse(w, r, http.StatusUnauthorized, spiffeid.ID{}, "client certificate required")
			return
		}
		id, err := s.VerifyCaller(r)
		if err != nil {
			s.Refuse(w, r, http.StatusUnauthorized, id, "client certificate is not a valid X509-SVID: "+err.Error())
			return
		}
		next.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), callerKey{}, id)))
	})
}

// Caller is the SPIFFE ID of the client certificate Mount verified; zero outside a
// mesh API handler.
func Caller(r *http.Request) spiffeid.ID {
	id, _ := r.Context().Value(callerKey{}).(spiffeid.ID)
	return id
}

// WriteJSON answers 200 with v in JSON, not to be cached.
func WriteJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	_ = json.NewEncoder(w).Encode(v)
}
