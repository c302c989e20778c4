package meshapi

import (
	"crypto/x509"
	"errors"
	"testing"
	"time"
)

// expiringList is version 3 of a list whose entries expire: the identity entry of
// idHostA (cutoff listT0+1m) and serial 9 at listT0+30m, serial 77 at listT0+1h.
func expiringList() *DenyList {
	l := sampleList()
	l.IDs[0].NotBefore = listT0.Add(time.Minute)
	l.IDs[0].NotAfter = listT0.Add(30 * time.Minute)
	l.Serials[0].NotAfter = listT0.Add(30 * time.Minute)
	return l
}

// shrunk is the version after expiringList once listT0+30m has passed, as the CA
// builds it.
func shrunk(t *testing.T) *DenyList {
	t.Helper()
	next, changed := expiringList().Successor(listT0.Add(40*time.Minute), nil, nil)
	if !changed {
		t.Fatal("nextDenyList dropped nothing past the expiry")
	}
	return next
}

func TestDeniesByCutoff(t *testing.T) {
	t.Parallel()
	cutoff := listT0.Add(time.Minute)
	for name, l := range map[string]*DenyList{"indexed": func() *DenyList { l := expiringList(); l.index(); return l }(), "by hand": expiringList()} {
		cases := []struct {
			name      string
			notBefore time.Time
			want      bool
		}{
			{"issued before the revocation", cutoff.Add(-time.Second), true},
			{"issued at the cutoff", cutoff, false},
			{"issued after the revocation", cutoff.Add(time.Hour), false},
			{"unknown NotBefore", time.Time{}, true},
		}
		for _, tc := range cases {
			if got := l.Denies(idHostA, "12345", tc.notBefore); got != tc.want {
				t.Errorf("%s: %s: Denies = %v, want %v", name, tc.name, got, tc.want)
			}
		}
		// A listed serial is denied whatever its NotBefore.
		if !l.Denies(idHostA, "9", cutoff.Add(time.Hour)) {
			t.Errorf("%s: a listed serial issued after the cutoff is not denied", name)
		}
	}
	// Of two revocations of one identity, the later cutoff covers both.
	l := expiringList()
	l.Version = 5
	l.IDs = append(l.IDs, DeniedID{SPIFFEID: idHostA, Reason: "again", RevokedAt: listT0.Add(time.Hour),
		NotBefore: listT0.Add(59 * time.Minute), NotAfter: listT0.Add(2 * time.Hour), Version: 5})
	l.index()
	if !l.Denies(idHostA, "", listT0.Add(30*time.Minute)) || l.Denies(idHostA, "", listT0.Add(59*time.Minute)) {
		t.Error("two revocations of one identity: the later cutoff does not decide")
	}
}

func TestNextDenyListDropsExpired(t *testing.T) {
	t.Parallel()
	cur := expiringList()
	next := shrunk(t)
	if next.Version != 4 || len(next.IDs) != 0 || len(next.Serials) != 1 || next.Serials[0].Serial != "77" {
		t.Fatalf("pruned list: version %d, ids %+v, serials %+v; want version 4 with serial 77 only", next.Version, next.IDs, next.Serials)
	}
	// The latest expiry dropped, not the signing time: a receiver a little behind
	// the CA's clock accepts it once past the expiries themselves.
	if !next.ExpiredThrough.Equal(listT0.Add(30 * time.Minute)) {
		t.Errorf("expired_through = %v, want %v", next.ExpiredThrough, listT0.Add(30*time.Minute))
	}
	if ok, err := NextDenyList(cur, next, listT0.Add(40*time.Minute)); !ok || err != nil {
		t.Fatalf("NextDenyList(current, pruned) = %v, %v; want accepted", ok, err)
	}
	if _, changed := next.Successor(listT0.Add(41*time.Minute), nil, nil); changed {
		t.Error("nothing more expired, but a new version was built")
	}
	// An entry that expired already is never listed again.
	again, changed := next.Successor(listT0.Add(41*time.Minute), nil,
		[]DeniedSerial{{Serial: "9", RevokedAt: listT0, NotAfter: listT0.Add(30 * time.Minute)}})
	if changed || again != next {
		t.Error("an expired entry was listed again")
	}
	// Signed and verified, the pruned list round-trips.
	ca := newListCA(t, testTD)
	l, err := VerifyDenyList(ca.sign(t, next), testTD, []*x509.Certificate{ca.root}, time.Now())
	if err != nil || !SameDenyList(l, next) {
		t.Fatalf("pruned list does not verify: %v", err)
	}
}

func TestNextDenyListShrink(t *testing.T) {
	t.Parallel()
	held := expiringList()
	after := listT0.Add(40 * time.Minute)
	mut := func(f func(l *DenyList)) *DenyList {
		l := shrunk(t)
		f(l)
		return l
	}
	cases := []struct {
		name    string
		held    *DenyList
		got     *DenyList
		now     time.Time
		replace bool
		want    error
	}{
		{"shrink with its expiry claim", held, shrunk(t), after, true, nil},
		{"shrink, then more entries", held, mut(func(l *DenyList) {
			l.Version = 6
			l.Serials = append(l.Serials, DeniedSerial{Serial: "500", RevokedAt: after, NotAfter: after.Add(time.Hour), Version: 6})
		}), after, true, nil},
		{"shrink without an expiry claim", held, mut(func(l *DenyList) { l.ExpiredThrough = time.Time{} }), after, false, ErrDenyListGap},
		{"claim earlier than the entry's own expiry", held, mut(func(l *DenyList) { l.ExpiredThrough = listT0.Add(20 * time.Minute) }), after, false, ErrDenyListGap},
		{"claim covers an entry not yet expired", held, mut(func(l *DenyList) { l.Serials = nil }), after, false, ErrDenyListGap},
		{"entry without an expiry dropped", func() *DenyList { l := expiringList(); l.IDs[0].NotAfter = time.Time{}; return l }(), shrunk(t), after, false, ErrDenyListGap},
		{"expiry ahead of this clock", held, shrunk(t), listT0.Add(29 * time.Minute), false, ErrDenyListPremature},
		{"rollback to before the shrink", shrunk(t), held, after, false, ErrDenyListStale},
		{"replay of the shrunk list", shrunk(t), shrunk(t), after, false, nil},
		{"same version, other expiry claim", shrunk(t), mut(func(l *DenyList) { l.ExpiredThrough = l.ExpiredThrough.Add(-time.Second) }), after, false, ErrDenyListConflict},
		{"expiry claim moved back", shrunk(t), mut(func(l *DenyList) { l.Version, l.ExpiredThrough = 5, listT0.Add(10*time.Minute) }), after, false, ErrDenyListConflict},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			replace, err := NextDenyList(tc.held, tc.got, tc.now)
			if replace != tc.replace || !errors.Is(err, tc.want) || (tc.want == nil && err != nil) {
				t.Errorf("NextDenyList = %v, %v; want %v, %v", replace, err, tc.replace, tc.want)
			}
		})
	}
	if n := ExpiredEntries(held, shrunk(t)); n != 2 {
		t.Errorf("ExpiredEntries = %d, want 2 (the identity entry and serial 9)", n)
	}
}

func TestVerifyDenyListExpiry(t *testing.T) {
	t.Parallel()
	ca := newListCA(t, testTD)
	roots := []*x509.Certificate{ca.root}
	cases := map[string]func(l *DenyList){
		"expired_through after issued_at":   func(l *DenyList) { l.ExpiredThrough = l.IssuedAt.Add(time.Second) },
		"a listed serial already dropped":   func(l *DenyList) { l.ExpiredThrough = l.Serials[0].NotAfter },
		"a listed identity already dropped": func(l *DenyList) { l.ExpiredThrough, l.IssuedAt = l.IDs[0].NotAfter, l.IDs[0].NotAfter },
		"cutoff after the revocation":       func(l *DenyList) { l.IDs[0].NotBefore = l.IDs[0].RevokedAt.Add(time.Second) },
		"two entries of one revocation": func(l *DenyList) {
			l.IDs = append(l.IDs, l.IDs[0])
		},
	}
	for name, mut := range cases {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			l := expiringList()
			l.IssuedAt = listT0.Add(2 * time.Hour)
			mut(l)
			if _, err := VerifyDenyList(ca.sign(t, l), testTD, roots, time.Now()); !errors.Is(err, ErrDenyListMalformed) {
				t.Errorf("VerifyDenyList: %v, want ErrDenyListMalformed", err)
			}
		})
	}
	// Two revocations of one identity, in version order, are fine.
	l := expiringList()
	l.Version = 5
	l.IDs = append(l.IDs, DeniedID{SPIFFEID: idHostA, Reason: "again", RevokedAt: listT0.Add(4 * time.Minute),
		NotBefore: listT0.Add(3 * time.Minute), NotAfter: listT0.Add(time.Hour), Version: 5})
	if _, err := VerifyDenyList(ca.sign(t, l), testTD, roots, time.Now()); err != nil {
		t.Errorf("two revocations of one identity: %v", err)
	}
}
