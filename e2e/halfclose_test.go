package e2e

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"os/exec"
	"testing"
	"time"
)

// halfCloseClient is the agent: a Python program that speaks through a route with
// socket.shutdown(SHUT_WR), as a real client does. "request" sends its payload, shuts
// down writing and prints what comes back until EOF. "answer" reads until EOF, then
// sends its payload, shuts down writing, checks that nothing more comes, and prints
// what it had read. Payloads are pattern(n) (halfClosePattern).
const halfCloseClient = `
import socket, sys
host, port, mode, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
payload = bytes(i % 251 for i in range(n))
def read_all(s):
    parts = []
    while True:
        b = s.recv(65536)
        if not b:
            return b"".join(parts)
        parts.append(b)
s = socket.create_connection((host, port), timeout=60)
if mode == "request":
    s.sendall(payload)
    s.shutdown(socket.SHUT_WR)
    got = read_all(s)
else:
    got = read_all(s)
    s.sendall(payload)
    s.shutdown(socket.SHUT_WR)
    rest = read_all(s)
    if rest:
        sys.exit("%d bytes after the target's half-close and ours" % len(rest))
s.close()
sys.stdout.buffer.write(got)
`

// halfClosePattern is what halfCloseClient sends with size n.
func halfClosePattern(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i % 251)
	}
	return b
}

// halfCloseSize is the size of every payload: several splice buffers, and more than a
// stream's flow-control window takes at once on neither transport.
const halfCloseSize = 300_000

// TestHalfClose: through two proxies, on each transport, a client that shuts down
// writing still reads the whole answer of a target that reads until EOF first
// (request), and a target that answers and half-closes first still reads everything
// the client sends after it saw that EOF (answer). Both connections end cleanly: a
// connection record without a reason on both proxies.
func TestHalfClose(t *testing.T) {
	requireE2E(t)
	python, err := exec.LookPath("python3")
	if err != nil {
		t.Skip("python3 is not installed: run make deps")
	}
	ca := startCA(t, time.Minute)
	// request: reads until EOF, then answers with what it read, reversed.
	reqLn, reqPort := listenerPort(t)
	go serveConns(reqLn, func(c *net.TCPConn) {
		_ = c.SetDeadline(time.Now().Add(2 * time.Minute))
		got, err := io.ReadAll(c)
		if err != nil {
			return
		}
		_, _ = c.Write(reversed(got))
	})
	// answer: sends its payload and half-closes, then reads until EOF.
	late := make(chan []byte, 3)
	ansLn, ansPort := listenerPort(t)
	go serveConns(ansLn, func(c *net.TCPConn) {
		_ = c.SetDeadline(time.Now().Add(2 * time.Minute))
		if _, err := c.Write(halfClosePattern(halfCloseSize)); err != nil {
			late <- nil
			return
		}
		if err := c.CloseWrite(); err != nil {
			late <- nil
			return
		}
		got, _ := io.ReadAll(c)
		late <- got
	})

	idA := "spiffe://" + trustDomain + "/host/a"
	extra := "transports: [h2, quic, tls]\naudit:\n  streams: true\n"
	b := startProxy(t, ca, "b", nil, []service{{port: reqPort, allow: []string{idA}}, {port: ansPort, allow: []string{idA}}}, extra)
	transports := []string{"tls", "h2", "quic"}
	var routes []route
	addr := map[string][2]string{}
	for _, tr := range transports {
		r := [2]string{fmt.Sprintf("127.0.0.1:%d", freePort(t)), fmt.Sprintf("127.0.0.1:%d", freePort(t))}
		addr[tr] = r
		routes = append(routes,
			route{listen: r[0], peer: b.tunnel, peerID: b.id, targetPort: reqPort, transport: tr},
			route{listen: r[1], peer: b.tunnel, peerID: b.id, targetPort: ansPort, transport: tr})
	}
	a := startProxy(t, ca, "a", routes, nil, extra)

	pattern := halfClosePattern(halfCloseSize)
	for _, tr := range transports {
		t.Run(tr, func(t *testing.T) {
			t.Run("client_first", func(t *testing.T) {
				got := runHalfCloseClient(t, python, addr[tr][0], "request")
				if !bytes.Equal(got, reversed(pattern)) {
					t.Fatalf("%d bytes back after the client's half-close, want the %d it sent, reversed", len(got), len(pattern))
				}
				checkClean(t, a, b, tr, reqPort)
			})
			t.Run("target_first", func(t *testing.T) {
				got := runHalfCloseClient(t, python, addr[tr][1], "answer")
				if !bytes.Equal(got, pattern) {
					t.Fatalf("client read %d bytes before the target's half-close, want %d", len(got), len(pattern))
				}
				select {
				case got := <-late:
					if !bytes.Equal(got, pattern) {
						t.Fatalf("target read %d bytes after its half-close, want %d", len(got), len(pattern))
					}
				case <-time.After(60 * time.Second):
					t.Fatal("the target read nothing after its half-close within 60s")
				}
				checkClean(t, a, b, tr, ansPort)
			})
		})
	}
}

// serveConns runs handle on every connection of ln, each on its own goroutine, and
// closes the connection when handle returns.
func serveConns(ln net.Listener, handle func(*net.TCPConn)) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			handle(c.(*net.TCPConn))
		}()
	}
}

// runHalfCloseClient runs halfCloseClient against addr in mode and returns its output.
func runHalfCloseClient(t *testing.T, python, addr, mode string) []byte {
	t.Helper()
	host, port, _ := net.SplitHostPort(addr)
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, python, "-c", halfCloseClient, host, port, mode, itoa(halfCloseSize))
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("client (%s) through %s: %v: %s", mode, addr, err, stderr.String())
	}
	return out
}

// checkClean waits for the connection records of the connection to port on both
// proxies and checks that it ended cleanly, every byte carried both ways.
func checkClean(t *testing.T, a, b *meshProxy, transport string, port int) {
	t.Helper()
	for _, p := range []*meshProxy{a, b} {
		rec := awaitRecord(t, p, map[string]string{"type": "connection", "transport": transport,
			"target": fmt.Sprintf("127.0.0.1:%d", port)}, 30*time.Second)
		if rec["reason"] != nil || rec["bytes_in"] != float64(halfCloseSize) || rec["bytes_out"] != float64(halfCloseSize) {
			t.Errorf("%s: connection record %v, want a clean close with %d bytes each way", p.name, rec, halfCloseSize)
		}
	}
}

func reversed(b []byte) []byte {
	out := make([]byte, len(b))
	for i, c := range b {
		out[len(b)-1-i] = c
	}
	return out
}
