package node

import (
	"context"
	"crypto/ecdsa"
	"errors"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/hsm"
	"github.com/agentmesh/agentmesh/internal/softhsmtest"
)

// TestAuditCheckpointSettings: the checkpoint settings reach the audit log's
// configuration with the host's origin; absent, they are zeros (the log's defaults).
func TestAuditCheckpointSettings(t *testing.T) {
	t.Parallel()
	c, err := LoadConfig(writeConfig(t, strings.Replace(goodConfig, "state: state",
		"state: state\naudit:\n  checkpoint_records: 50\n  checkpoint_interval: 2s\n  max_file_bytes: 1048576", 1)))
	if err != nil {
		t.Fatal(err)
	}
	got := c.auditConfig(nil, nil)
	if got.CheckpointRecords != 50 || got.CheckpointInterval != 2*time.Second || got.MaxFileBytes != 1<<20 ||
		got.Origin != "example.org/host/a/audit" || got.Path != c.Audit.Path {
		t.Errorf("audit config = %+v", got)
	}
	c, err = LoadConfig(writeConfig(t, goodConfig))
	if err != nil {
		t.Fatal(err)
	}
	if got := c.auditConfig(nil, nil); got.CheckpointRecords != 0 || got.CheckpointInterval != 0 || got.MaxFileBytes != 0 {
		t.Errorf("audit config without settings = %+v, want zeros", got)
	}
}

// TestAuditCheckpointSettingsErrors: each bad value is refused naming the file, the
// line and the field.
func TestAuditCheckpointSettingsErrors(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name, setting, field string
	}{
		{name: "negative records", setting: "checkpoint_records: -1", field: "audit.checkpoint_records"},
		{name: "negative interval", setting: "checkpoint_interval: -1s", field: "audit.checkpoint_interval"},
		{name: "interval too short", setting: "checkpoint_interval: 10ms", field: "audit.checkpoint_interval"},
		{name: "file too small", setting: "max_file_bytes: 1000", field: "audit.max_file_bytes"},
		{name: "negative file size", setting: "max_file_bytes: -1", field: "audit.max_file_bytes"},
		{name: "interval not a duration", setting: "checkpoint_interval: soon"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			path := writeConfig(t, strings.Replace(goodConfig, "state: state", "state: state\naudit:\n  "+tc.setting, 1))
			_, err := LoadConfig(path)
			var fe *FileError
			if !errors.As(err, &fe) {
				t.Fatalf("err = %v, want *FileError", err)
			}
			if fe.File != path || fe.Line != 4 || fe.Field != tc.field {
				t.Fatalf("error at %s:%d field %q, want line 4 field %q (%v)", fe.File, fe.Line, fe.Field, tc.field, err)
			}
		})
	}
}

// token is the SoftHSM token of the package's tests, each with key label prefixes of
// its own. TestMain removes it.
var token = softhsmtest.Dir{Pattern: "agentmesh-node-", Label: "node-test"}

func TestMain(m *testing.M) {
	m.Run() // its result becomes the exit code when TestMain returns
	token.Remove()
}

// TestAuditKeyInToken: the audit key is made in the token at the first start, named in
// STATE/audit-key.ref, and the same key is opened at the next; the SVID keys' store
// does not see it; a reference to a key the token lacks stops the start; with keys in
// memory, the key is too.
func TestAuditKeyInToken(t *testing.T) {
	_, uri := token.Token(t)
	state := t.TempDir()
	key, release, err := openAuditKey(t.Context(), state, uri)
	if err != nil {
		t.Fatal(err)
	}
	ref := filepath.Join(state, auditKeyFile)
	info, err := os.Stat(ref)
	if err != nil || info.Mode().Perm() != 0o600 {
		t.Fatalf("%s: %v, mode %v", ref, err, info.Mode())
	}
	label := strings.TrimSpace(string(readFile(t, ref)))
	if !strings.HasPrefix(label, auditKeyPrefix) {
		t.Errorf("reference %q", label)
	}
	if _, err := auditVerifierKey("example.org/host/a/audit", key); err != nil {
		t.Errorf("the audit key cannot sign checkpoints: %v", err)
	}
	release()

	again, release, err := openAuditKey(t.Context(), state, uri)
	if err != nil {
		t.Fatal(err)
	}
	defer release()
	if pub, ok := again.Public().(*ecdsa.PublicKey); !ok || !pub.Equal(key.Public()) {
		t.Error("the second start opened another key")
	}
	svid, err := hsm.OpenKeys(t.Context(), uri, "svid-")
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = svid.Close() }()
	if labels, err := svid.List(t.Context()); err != nil || slices.Contains(labels, label) {
		t.Errorf("the SVID keys' store lists %v (%v)", labels, err)
	}

	gone := t.TempDir()
	writeTestFile(t, filepath.Join(gone, auditKeyFile), auditKeyPrefix+strings.Repeat("0", 32)+"\n")
	if _, _, err := openAuditKey(t.Context(), gone, uri); !errors.Is(err, hsm.ErrKeyNotFound) {
		t.Errorf("a reference to a key the token lacks: %v, want ErrKeyNotFound", err)
	}

	mem := t.TempDir()
	if key, _, err := openAuditKey(t.Context(), mem, ""); err != nil || key == nil {
		t.Fatalf("memory: %v", err)
	}
	if _, err := os.Stat(filepath.Join(mem, auditKeyFile)); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("memory: a reference written: %v", err)
	}
}

func readFile(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func writeTestFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
}

// TestIdleCheckIn: every interval in which nothing called the witness, the log's
// latest checkpoint goes to it again, as an extension of itself; nothing goes before
// the log signed one, nor while the log calls the witness itself.
func TestIdleCheckIn(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		var (
			last atomic.Int64
			mu   sync.Mutex
			note []byte
			sent []audit.WitnessRequest
		)
		witness := witnessFunc(func(_ context.Context, req audit.WitnessRequest) ([]byte, error) {
			last.Store(time.Now().UnixNano())
			mu.Lock()
			defer mu.Unlock()
			sent = append(sent, req)
			return nil, &audit.WitnessConflict{Size: 2} // not logged: the log resolves it
		})
		latest := func() ([]byte, audit.Checkpoint) {
			mu.Lock()
			defer mu.Unlock()
			return note, audit.Checkpoint{Size: 5}
		}
		sentCount := func() int {
			synctest.Wait()
			mu.Lock()
			defer mu.Unlock()
			return len(sent)
		}
		c := idleCheckIn{latest: latest, witness: witness, key: "k", interval: time.Second, last: &last,
			logger: slog.New(slog.DiscardHandler)}
		ctx, cancel := context.WithCancel(t.Context())
		done := make(chan error, 1)
		go func() { done <- c.run(ctx) }()

		time.Sleep(3 * time.Second) //nolint:forbidigo // synctest: advances the bubble's clock
		if n := sentCount(); n != 0 {
			t.Fatalf("%d sent before the log signed a checkpoint", n)
		}
		mu.Lock()
		note = []byte("signed note")
		mu.Unlock()
		time.Sleep(2 * time.Second) //nolint:forbidigo // synctest: advances the bubble's clock
		if n := sentCount(); n != 2 || sent[0].OldSize != 5 || sent[0].Key != "k" || len(sent[0].Proof) != 0 ||
			string(sent[0].Checkpoint) != "signed note" {
			t.Fatalf("sent %+v, want the latest twice as an extension of size 5", sent)
		}
		// The log's own rounds call the witness twice a second: nothing more is sent.
		for range 8 {
			last.Store(time.Now().UnixNano())
			time.Sleep(500 * time.Millisecond) //nolint:forbidigo // synctest: advances the bubble's clock
		}
		if n := sentCount(); n != 2 {
			t.Fatalf("%d sent while the log called the witness itself", n)
		}
		cancel()
		if err := <-done; err != nil {
			t.Fatal(err)
		}
	})
}
