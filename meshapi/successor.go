package meshapi

import (
	"slices"
	"time"
)

// Successor returns the version after cur with the entries of ids and serials
// that cur lacks, stamped with the new version, and without the entries of cur whose
// certificates have all expired at now (ExpiredThrough then says so), and whether
// anything changed. Pure.
func (cur *DenyList) Successor(now time.Time, ids []DeniedID, serials []DeniedSerial) (*DenyList, bool) {
	next := &DenyList{
		TrustDomain:    cur.TrustDomain,
		Version:        cur.Version + 1,
		IssuedAt:       now.UTC().Round(0),
		IDs:            slices.Clone(cur.IDs),
		Serials:        slices.Clone(cur.Serials),
		ExpiredThrough: cur.ExpiredThrough,
		Issuers:        slices.Clone(cur.Issuers),
	}
	changed := false
	// Drop what has expired. ExpiredThrough moves to the latest expiry dropped rather
	// than to now, so that a proxy whose clock is a little behind the CA's accepts
	// the list as soon as its clock passes the expiries themselves.
	expired := func(notAfter time.Time) bool {
		if notAfter.IsZero() || notAfter.After(next.IssuedAt) {
			return false
		}
		if notAfter.After(next.ExpiredThrough) {
			next.ExpiredThrough = notAfter.UTC()
		}
		changed = true
		return true
	}
	next.IDs = slices.DeleteFunc(next.IDs, func(e DeniedID) bool { return expired(e.NotAfter) })
	next.Serials = slices.DeleteFunc(next.Serials, func(e DeniedSerial) bool { return expired(e.NotAfter) })
	next.Issuers = slices.DeleteFunc(next.Issuers, func(e DeniedIssuer) bool { return expired(e.NotAfter) })
	for _, e := range ids {
		if slices.ContainsFunc(next.IDs, func(o DeniedID) bool { return o.SPIFFEID == e.SPIFFEID && o.RevokedAt.Equal(e.RevokedAt) }) ||
			(!e.NotAfter.IsZero() && !e.NotAfter.After(next.ExpiredThrough)) {
			continue
		}
		e.Version = next.Version
		next.IDs = append(next.IDs, e)
		changed = true
	}
	for _, e := range serials {
		if cur.deniesSerial(e.Serial) || slices.ContainsFunc(next.Serials, func(o DeniedSerial) bool { return o.Serial == e.Serial }) ||
			(!e.NotAfter.IsZero() && !e.NotAfter.After(next.ExpiredThrough)) {
			continue
		}
		e.Version = next.Version
		next.Serials = append(next.Serials, e)
		changed = true
	}
	if !changed {
		return cur, false
	}
	slices.SortFunc(next.IDs, CompareIDEntries)
	slices.SortFunc(next.Serials, func(a, b DeniedSerial) int { return CompareSerials(a.Serial, b.Serial) })
	if next.IDs == nil {
		next.IDs = []DeniedID{}
	}
	if next.Serials == nil {
		next.Serials = []DeniedSerial{}
	}
	next.index()
	return next, true
}

// FirstDenyList is version 1 of a trust domain's deny-list, empty, issued at now: what
// a CA signs on first start.
func FirstDenyList(td string, now time.Time) *DenyList {
	l := &DenyList{TrustDomain: td, Version: 1, IssuedAt: now.UTC().Round(0), IDs: []DeniedID{}, Serials: []DeniedSerial{}}
	l.index()
	return l
}
