package audit_test

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/agentmesh/agentmesh/audit"
)

// The SIGKILL test re-executes this test binary as a child that appends heavily to a log
// with checkpoints and rotation on, reporting on stdout each record a Sync acknowledged;
// the parent kills it at a random point, ten times over the same log, and checks after
// each kill that VerifyLog passes (chain, tree, the latest checkpoint) and that every
// acknowledged record is there.
const (
	crashDirEnv = "AUDIT_CRASH_DIR"
	crashKeyEnv = "AUDIT_CRASH_KEY"
	crashRunEnv = "AUDIT_CRASH_RUN"
)

func crashConfig(dir string, key *ecdsa.PrivateKey) audit.Config {
	return audit.Config{
		Path: filepath.Join(dir, "audit.log"), MaxFileBytes: 64 << 10,
		Origin: testOrigin, Signer: key, CheckpointRecords: 200, CheckpointInterval: 20 * time.Millisecond,
	}
}

// TestCrashChild is the child; it runs only under TestSIGKILL.
func TestCrashChild(t *testing.T) {
	dir := os.Getenv(crashDirEnv)
	if dir == "" {
		t.Skip("the child of TestSIGKILL")
	}
	der, err := base64.StdEncoding.DecodeString(os.Getenv(crashKeyEnv))
	if err != nil {
		t.Fatal(err)
	}
	k, err := x509.ParseECPrivateKey(der)
	if err != nil {
		t.Fatal(err)
	}
	l, err := audit.Open(crashConfig(dir, k))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() { _ = l.Run(ctx) }() // runs until the kill
	run := os.Getenv(crashRunEnv)
	var out sync.Mutex
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			for i := 0; ; i++ {
				id := fmt.Sprintf("%s/%d/%d", run, g, i)
				e := handshake(i)
				e.PeerAddr = id
				if err := l.Append(e); err != nil {
					t.Error(err)
					return
				}
				if i%16 != 15 {
					continue
				}
				if err := l.Sync(ctx); err != nil {
					t.Error(err)
					return
				}
				out.Lock()
				_, _ = fmt.Fprintf(os.Stdout, "ack %s\n", id) // the parent reads what it can
				out.Unlock()
			}
		})
	}
	wg.Wait()
}

func TestSIGKILL(t *testing.T) {
	if testing.Short() {
		t.Skip("kills a child process ten times")
	}
	t.Parallel()
	dir := t.TempDir()
	key := newKey(t)
	der, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	path := crashConfig(dir, key).Path
	vkey := verifierKey(t, key)
	acked := map[string]bool{}
	for run := range 10 {
		n := 1 + rand.IntN(300) // acknowledgements before the kill
		acks := runAndKill(t, run, n, dir, base64.StdEncoding.EncodeToString(der))
		for _, id := range acks {
			acked[id] = true
		}
		var opts audit.VerifyOptions
		if cp, err := os.ReadFile(path + ".checkpoint"); err == nil {
			opts.Checkpoint, opts.Key = cp, vkey
		}
		rep, err := audit.VerifyLog(path, opts)
		if err != nil {
			t.Fatalf("run %d, killed after %d acks: VerifyLog: %v", run, len(acks), err)
		}
		present := map[string]bool{}
		err = audit.Scan(path, 1, func(_ uint64, line []byte) error {
			var r struct {
				PeerAddr string `json:"peer_addr"`
			}
			if err := json.Unmarshal(line, &r); err != nil {
				return err
			}
			present[r.PeerAddr] = true
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		for id := range acked {
			if !present[id] {
				t.Fatalf("run %d: record %s was acknowledged durable and is missing (%d records)", run, id, rep.Records)
			}
		}
		cp := uint64(0)
		if rep.Checkpoint != nil {
			cp = rep.Checkpoint.Size
		}
		t.Logf("run %d: killed after %d acks; %d records, checkpoint %d, %d torn bytes", run, len(acks), rep.Records, cp, rep.TornBytes)
	}
	if segs, _ := audit.Segments(path); len(segs) < 3 {
		t.Errorf("only %d files: the kills should have spanned rotations", len(segs))
	}
}

// runAndKill starts the child and kills it once it has acknowledged n records; it returns
// every acknowledgement the child wrote before it died.
func runAndKill(t *testing.T, run, n int, dir, key string) []string {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestCrashChild$", "-test.count=1")
	cmd.Env = append(os.Environ(), crashDirEnv+"="+dir, crashKeyEnv+"="+key, crashRunEnv+"="+fmt.Sprint(run))
	cmd.Stderr = os.Stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var acks []string
	sc := bufio.NewScanner(stdout)
	killed := false
	for sc.Scan() {
		id, ok := strings.CutPrefix(sc.Text(), "ack ")
		if !ok {
			continue // the test framework's own lines
		}
		acks = append(acks, id)
		if len(acks) >= n && !killed {
			if err := cmd.Process.Kill(); err != nil {
				t.Fatal(err)
			}
			killed = true // what is still in the pipe was acknowledged before the kill
		}
	}
	err = cmd.Wait()
	if !killed {
		t.Fatalf("run %d: the child exited by itself: %v", run, err)
	}
	if ee, ok := errors.AsType[*exec.ExitError](err); !ok || ee.Exited() {
		t.Fatalf("run %d: child = %v, want killed", run, err)
	}
	return acks
}
