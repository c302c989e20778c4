package rotator

import (
	"context"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"log/slog"
	"slices"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"

	"github.com/agentmesh/agentmesh/audit"
)

// BundleVersion names a set of trust anchors: the first 16 hex digits of the SHA-256
// of their DER, in order. The directory shows it per proxy (which bundle each holds)
// and bundle audit records carry it.
func BundleVersion(anchors []*x509.Certificate) string {
	h := sha256.New()
	for _, a := range anchors {
		h.Write(a.Raw)
	}
	return hex.EncodeToString(h.Sum(nil))[:16]
}

// BundleVersion is the version of the trust bundle in force. Safe for concurrent use.
func (r *Rotator) BundleVersion() string {
	return BundleVersion(r.state.Load().bundle.X509Authorities())
}

// anchorFingerprints names each anchor by the SHA-256 (hex) of its DER certificate.
func anchorFingerprints(anchors []*x509.Certificate) []string {
	out := make([]string, len(anchors))
	for i, a := range anchors {
		sum := sha256.Sum256(a.Raw)
		out[i] = hex.EncodeToString(sum[:])
	}
	return out
}

// bundleChange is the audit record of replacing old by next (nil: refused with
// cause).
func (r *Rotator) bundleChange(old, next *x509bundle.Bundle, cause error) *audit.TrustBundle {
	rec := &audit.TrustBundle{
		SPIFFEID:    r.cfg.ID.String(),
		TrustDomain: r.cfg.ID.TrustDomain().Name(),
		Result:      audit.BundleApplied,
		Version:     BundleVersion(old.X509Authorities()),
		Old:         anchorFingerprints(old.X509Authorities()),
	}
	if cause != nil {
		rec.Result, rec.Error, rec.New = audit.BundleRefused, cause.Error(), rec.Old
		return rec
	}
	rec.Previous, rec.Version = rec.Version, BundleVersion(next.X509Authorities())
	rec.New = anchorFingerprints(next.X509Authorities())
	for _, f := range rec.New {
		if !slices.Contains(rec.Old, f) {
			rec.Added = append(rec.Added, f)
		}
	}
	for _, f := range rec.Old {
		if !slices.Contains(rec.New, f) {
			rec.Removed = append(rec.Removed, f)
		}
	}
	return rec
}

// auditBundle appends rec; trust changes leave a record whatever else happens, and a
// failure to write one is logged as an error.
func (r *Rotator) auditBundle(rec *audit.TrustBundle) {
	if r.cfg.Audit == nil {
		return
	}
	if err := r.cfg.Audit.Append(rec); err != nil {
		r.cfg.Logger.LogAttrs(context.Background(), slog.LevelError, "audit trust bundle change", slog.Any(keyErr, err))
	}
}

// BundleRefused is the audit record of a trust bundle refused before it reached
// SetBundle (a file that does not parse): the anchors in force stay.
func (r *Rotator) BundleRefused(cause error) *audit.TrustBundle {
	return r.bundleChange(r.state.Load().bundle, nil, cause)
}
