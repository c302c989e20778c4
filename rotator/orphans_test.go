package rotator

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/agentmesh/agentmesh/hsm"
)

// *hsm.Keys lists the keys an earlier process left.
var _ ListableKeys = (*hsm.Keys)(nil)

// Keys a process left in the token when it died (an SVID in overlap, an agent's key,
// one made for an attempt that never finished) are destroyed when the next one starts,
// each audited; the key of the stored SVID stays, and the restarted rotator presents it.
func TestDestroyOrphans(t *testing.T) {
	prefix := "orphan-" + randomLabel() + "-"
	file := filepath.Join(t.TempDir(), "svid.json")
	iss := newIssuer(t, time.Hour)

	keys := tokenKeys(t, prefix)
	first, _, stop := run(t, iss, Config{Keys: keys, StateFile: file})
	eventually(t, "the SVID is stored", func() bool { _, err := os.Stat(file); return err == nil && first.Ready() == nil })
	var left []string
	for range 3 {
		k, err := keys.NewKey(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		ref, err := keys.Ref(k)
		if err != nil {
			t.Fatal(err)
		}
		left = append(left, ref)
	}
	stored, err := storedRef(file)
	if err != nil || stored == "" {
		t.Fatalf("stored key reference %q: %v", stored, err)
	}
	stop()
	if err := keys.Close(); err != nil { // the process dies with its keys in the token
		t.Fatal(err)
	}

	keys = tokenKeys(t, prefix)
	rec := &records{}
	destroyed, err := DestroyOrphans(t.Context(), OrphanConfig{Keys: keys, StateFiles: []string{file, filepath.Join(t.TempDir(), "none.json")}, Audit: rec})
	if err != nil {
		t.Fatalf("DestroyOrphans: %v", err)
	}
	slices.Sort(left)
	if !slices.Equal(destroyed, left) {
		t.Errorf("destroyed %v, want the keys left behind %v", destroyed, left)
	}
	if got, err := keys.List(t.Context()); err != nil || !slices.Equal(got, []string{stored}) {
		t.Errorf("keys in the token after DestroyOrphans: %v (%v), want only the stored SVID's %s", got, err, stored)
	}
	var audited []string
	for _, k := range rec.keys {
		if k.To == StateDestroyed && k.Cause == string(CauseOrphan) {
			audited = append(audited, k.Label)
		}
	}
	slices.Sort(audited)
	if !slices.Equal(audited, left) {
		t.Errorf("orphan destructions audited for %v, want %v", audited, left)
	}

	second, _, _ := run(t, iss, Config{Keys: keys, StateFile: file})
	eventually(t, "the stored SVID is presented", func() bool { return second.Ready() == nil })
	// Restored, and then perhaps already renewed from it (trigger restart): either
	// shows the stored key survived.
	if st := second.Status(); st.Current == nil || (st.Current.Cause != CauseRestored && st.Current.Cause != Cause(TriggerRestart)) {
		t.Errorf("after DestroyOrphans the stored SVID was not restored: %+v", st.Current)
	}
}

// A state file that cannot be read leaves every key in place: what it names is unknown.
func TestDestroyOrphansKeepsAllWhenStateUnreadable(t *testing.T) {
	keys := tokenKeys(t, "orphan-"+randomLabel()+"-")
	if _, err := keys.NewKey(t.Context()); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir() // a directory where a file is expected: read fails
	if _, err := DestroyOrphans(context.Background(), OrphanConfig{Keys: keys, StateFiles: []string{dir}}); err == nil {
		t.Error("DestroyOrphans with an unreadable state file: nil error, want one")
	}
	if got, err := keys.List(t.Context()); err != nil || len(got) != 1 {
		t.Errorf("keys after a refused purge: %v (%v), want the one key kept", got, err)
	}
}
