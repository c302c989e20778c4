package e2e

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// The waits below read state a process exposes on purpose (its audit log, status
// --json, its sockets in /proc), never its log text, which is for people.

// awaitRotated waits for p's audit record of a successful rotation of id with trigger
// (any trigger when ""), written at or after since, and returns it.
func awaitRotated(t *testing.T, p *meshProxy, id, trigger string, since time.Time, timeout time.Duration) map[string]any {
	t.Helper()
	want := map[string]string{"type": "rotation", "spiffe_id": id, "result": "ok"}
	if trigger != "" {
		want["trigger"] = trigger
	}
	return awaitRecordSince(t, p.name, p.auditPath(), want, since, timeout)
}

// awaitDenyList waits for p's audit record of the deny-list version applied (any
// version when 0) and returns it.
func awaitDenyList(t *testing.T, p *meshProxy, version uint64, timeout time.Duration) map[string]any {
	t.Helper()
	want := map[string]string{"type": "deny_list", "result": "applied"}
	if version != 0 {
		want["version"] = strconv.FormatUint(version, 10)
	}
	return awaitRecord(t, p, want, timeout)
}

// currentSerial returns the serial of the SVID p holds for id: that of its latest
// successful rotation (the enrolment included), from its audit log, which a proxy in
// another network namespace writes to the test's file system too.
func currentSerial(t *testing.T, p *meshProxy, id string) string {
	t.Helper()
	serial := ""
	for _, r := range readAudit(t, p.auditPath()) {
		if matches(r, map[string]string{"type": "rotation", "spiffe_id": id, "result": "ok"}) {
			serial = fmt.Sprint(r["new_serial"])
		}
	}
	if serial == "" {
		t.Fatalf("%s: no rotation of %s recorded", p.name, id)
	}
	return serial
}

// awaitListen waits until the process p (in whichever network namespace it runs) has a
// TCP socket listening on port, read from its namespace's socket table.
func awaitListen(t *testing.T, p *process, port int) {
	t.Helper()
	waitFor(t, 30*time.Second, fmt.Sprintf("%s listening on port %d", p.name, port), func() error {
		select {
		case <-p.done:
			t.Fatalf("%s exited (%v) before listening:\n%s", p.name, p.err, p.tail(20))
		default:
		}
		for _, table := range []string{"tcp", "tcp6"} {
			b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(p.cmd.Process.Pid), "net", table))
			if err != nil {
				return err
			}
			if listens(string(b), port) {
				return nil
			}
		}
		return errors.New("no listening socket yet")
	})
}

// listens reports whether a /proc/net/tcp{,6} table holds a socket in state LISTEN
// (0A) on port.
func listens(table string, port int) bool {
	suffix := fmt.Sprintf(":%04X", port)
	for line := range strings.Lines(table) {
		f := strings.Fields(line)
		if len(f) > 3 && strings.HasSuffix(f[1], suffix) && f[3] == "0A" {
			return true
		}
	}
	return false
}

// awaitCapture waits until the capturing process p (tcpdump) holds a packet socket
// bound to an interface, that is until it captures: a socket of its own listed in
// its namespace's /proc/net/packet.
func awaitCapture(t *testing.T, p *process) {
	t.Helper()
	pid := strconv.Itoa(p.cmd.Process.Pid)
	waitFor(t, 30*time.Second, p.name+" capturing", func() error {
		b, err := os.ReadFile(filepath.Join("/proc", pid, "net", "packet"))
		if err != nil {
			return err
		}
		fds, err := os.ReadDir(filepath.Join("/proc", pid, "fd"))
		if err != nil {
			return err
		}
		own := map[string]bool{}
		for _, fd := range fds {
			if l, err := os.Readlink(filepath.Join("/proc", pid, "fd", fd.Name())); err == nil {
				own[strings.TrimSuffix(strings.TrimPrefix(l, "socket:["), "]")] = true
			}
		}
		// sk RefCnt Type Proto Iface R Rmem User Inode
		for line := range strings.Lines(string(b)) {
			if f := strings.Fields(line); len(f) >= 9 && f[4] != "0" && own[f[8]] {
				return nil
			}
		}
		return errors.New("no bound packet socket yet")
	})
}
