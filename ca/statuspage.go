package ca

import (
	"bytes"
	"embed"
	"fmt"
	"html/template"
	"io/fs"
	"net"
	"net/http"
	"slices"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/agentmesh/agentmesh/audit"
)

// The status page (docs/status-page.md): GET /status/ (HTML rendered from the current
// document), /status/api (the document as JSON, which the page's script polls every
// second) and /status/static/ (the script and the style sheet). Admin only: on the
// HTTPS port, a client SVID whose ID is in Config.AdminIDs; on Config.StatusListen
// (loopback only), whoever can reach it on the CA's host.

const (
	statusPrefix = "/status/"
	statusAPI    = statusPrefix + "api"
	statusStatic = statusPrefix + "static/"

	metricStatusRefused = "agentmesh_ca_status_refused_total"
	// maxStatusPath bounds the path kept in a refusal's audit record.
	maxStatusPath = 256
)

// statusRefusal says why a request for the page was refused (label and audit reason).
type statusRefusal string

const (
	refusedNoCertificate statusRefusal = "no_certificate"
	refusedInvalidSVID   statusRefusal = "invalid_svid"
	refusedNotAdmin      statusRefusal = "not_admin"
	refusedRevoked       statusRefusal = "revoked"
)

var statusRefusals = []statusRefusal{refusedNoCertificate, refusedInvalidSVID, refusedNotAdmin, refusedRevoked}

//go:embed statuspage
var statusAssets embed.FS

// statusTemplate is parsed once; html/template escapes everything it renders, which
// matters: most of the document is what proxies reported.
var statusTemplate = template.Must(template.New("index.html").Funcs(template.FuncMap{
	"ts":  formatStatusTime,
	"age": statusAge,
}).ParseFS(statusAssets, "statuspage/index.html"))

func formatStatusTime(t time.Time) string {
	if t.IsZero() {
		return "—"
	}
	return t.UTC().Format(time.RFC3339)
}

func statusAge(now, t time.Time) string {
	if t.IsZero() {
		return "—"
	}
	d := max(now.Sub(t), 0).Round(time.Second)
	if d < 2*time.Minute {
		return strconv.Itoa(int(d/time.Second)) + "s ago"
	}
	return strconv.Itoa(int(d/time.Minute)) + "m ago"
}

func newStatusRefused() *prometheus.CounterVec {
	c := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: metricStatusRefused,
		Help: "Requests for the CA's status page refused on its HTTPS port (403), by reason.",
	}, []string{labelReason})
	for _, r := range statusRefusals {
		c.WithLabelValues(string(r))
	}
	return c
}

// statusHandler serves the page to anyone who reaches it: callers put access control
// in front (requireAdmin, or the loopback listener).
func (s *Server) statusHandler() http.Handler {
	static, err := fs.Sub(statusAssets, "statuspage")
	if err != nil {
		panic(err) // the embedded directory exists: a build error
	}
	mux := http.NewServeMux()
	mux.Handle("GET "+statusStatic, http.StripPrefix(statusStatic, http.FileServerFS(static)))
	mux.HandleFunc("GET "+statusAPI, func(w http.ResponseWriter, _ *http.Request) {
		writeJSON(w, s.statusDocument(time.Now()))
	})
	mux.HandleFunc("GET "+statusPrefix+"{$}", s.handleStatusPage)
	mux.Handle("GET /status", http.RedirectHandler(statusPrefix, http.StatusMovedPermanently))
	return statusHeaders(mux)
}

func (s *Server) handleStatusPage(w http.ResponseWriter, _ *http.Request) {
	var buf bytes.Buffer
	if err := statusTemplate.Execute(&buf, s.statusDocument(time.Now())); err != nil {
		s.log.Error("render status page", keyErr, err)
		http.Error(w, "render status page", http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	_, _ = w.Write(buf.Bytes()) //nolint:gosec // G705: html/template escaped it
}

// statusHeaders sets the page's security headers: only its own script and style run
// (no inline script, so an injected string cannot execute), it is never framed, and
// nothing of it is cached (it names every host and identity).
func statusHeaders(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		h.Set("Content-Security-Policy", "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
		h.Set("X-Frame-Options", "DENY")
		h.Set("X-Content-Type-Options", "nosniff")
		h.Set("Referrer-Policy", "no-referrer")
		h.Set("Cache-Control", "no-store")
		next.ServeHTTP(w, r)
	})
}

// requireAdmin admits a request whose client certificate is a valid SVID of the trust
// domain, not revoked, whose ID is in Config.AdminIDs; anything else is 403, audited
// (audit.StatusAccess) and counted. RequireValidClientCert has already refused (401) a
// chain that does not verify.
func (s *Server) requireAdmin(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if reason, ok := s.statusAdmin(r); !ok {
			s.refuseStatus(w, r, reason)
			return
		}
		next.ServeHTTP(w, r)
	})
}

func (s *Server) statusAdmin(r *http.Request) (statusRefusal, bool) {
	if r.TLS == nil || len(r.TLS.PeerCertificates) == 0 {
		return refusedNoCertificate, false
	}
	id, err := meshBackend{s}.VerifyCaller(r)
	switch {
	case err != nil:
		return refusedInvalidSVID, false
	case !slices.Contains(s.cfg.AdminIDs, id):
		return refusedNotAdmin, false
	case s.db.rev.revoked(id, callerSerial(r), callerNotBefore(r)):
		return refusedRevoked, false
	}
	return "", true
}

func (s *Server) refuseStatus(w http.ResponseWriter, r *http.Request, reason statusRefusal) {
	path := r.URL.Path
	if len(path) > maxStatusPath {
		path = path[:maxStatusPath]
	}
	actor := audit.TLSActor(r.TLS)
	s.statusRefused.WithLabelValues(string(reason)).Inc()
	s.audit(audit.StatusAccess{Actor: actor, Result: audit.ResultRefused, Path: path, Reason: string(reason)})
	s.log.Info("status page refused", keyInitiator, actor.Initiator, keyPath, path, keyReason, string(reason))
	statusHeaders(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		http.Error(w, "forbidden: the status page needs an admin SVID", http.StatusForbidden)
	})).ServeHTTP(w, r)
}

// checkLoopback refuses a StatusListen that does not name a loopback address
// ("localhost", or a loopback IP). Pure.
func checkLoopback(addr string) error {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("%w: StatusListen %q: %w", ErrInvalidConfig, addr, err)
	}
	if ip := net.ParseIP(host); host != "localhost" && (ip == nil || !ip.IsLoopback()) {
		return fmt.Errorf("%w: StatusListen %q is not a loopback address", ErrInvalidConfig, addr)
	}
	return nil
}

// listenStatus binds Config.StatusListen, which must be a loopback address: the page
// is served there without authentication, to whoever is on the CA's host.
func listenStatus(addr string) (net.Listener, error) {
	if err := checkLoopback(addr); err != nil {
		return nil, err
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("status listener: %w", err)
	}
	// "localhost" may resolve to anything: check what was bound.
	if tcp, ok := ln.Addr().(*net.TCPAddr); !ok || !tcp.IP.IsLoopback() {
		_ = ln.Close()
		return nil, fmt.Errorf("%w: StatusListen %q is not a loopback address", ErrInvalidConfig, addr)
	}
	return ln, nil
}

// StatusAddr is the bound address of the status listener, nil without one.
func (s *Server) StatusAddr() net.Addr {
	if s.statusLn == nil {
		return nil
	}
	return s.statusLn.Addr()
}
