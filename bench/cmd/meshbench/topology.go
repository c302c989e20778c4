package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/binary"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"
)

const trustDomain = "example.org"

// freePort returns a loopback port that was free a moment ago.
func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

func freeAddr() (string, error) {
	p, err := freePort()
	return fmt.Sprintf("127.0.0.1:%d", p), err
}

// buildBinaries builds agentmesh (unless prebuilt is set) and tlsrelay into dir. Each is
// built inside its own module: agentmesh in the product's, whose go.sum covers its
// dependencies, tlsrelay in the bench module.
func buildBinaries(ctx context.Context, dir, prebuilt string) (agentmesh, relay string, err error) {
	benchRoot, err := moduleRoot()
	if err != nil {
		return "", "", err
	}
	agentmesh, relay = prebuilt, filepath.Join(dir, "tlsrelay")
	targets := [][3]string{{relay, benchRoot, "./cmd/tlsrelay"}}
	if prebuilt == "" {
		agentmesh = filepath.Join(dir, "agentmesh")
		targets = append(targets, [3]string{agentmesh, filepath.Dir(benchRoot), "./cmd/agentmesh"})
	}
	for _, t := range targets {
		cmd := exec.CommandContext(ctx, "go", "build", "-o", t[0], t[2])
		cmd.Dir = t[1]
		// The PKCS#11 KMS of agentmesh compiles only with cgo.
		cmd.Env = append(os.Environ(), "CGO_ENABLED=1")
		if out, err := cmd.CombinedOutput(); err != nil {
			return "", "", fmt.Errorf("go build %s in %s: %w\n%s", t[2], t[1], err, out)
		}
	}
	return agentmesh, relay, nil
}

// meshCA is a running `agentmesh ca` with SoftHSM.
type meshCA struct {
	*process
	binary, state, url string
}

func startCA(ctx context.Context, binary, dir string) (*meshCA, error) {
	listen, err := freeAddr()
	if err != nil {
		return nil, err
	}
	state := filepath.Join(dir, "ca")
	// SVIDs outlive the run, so only the rotation phase rotates.
	p, err := startProcess("ca", exec.Command(binary, "ca", "--state", state, "--trust-domain", trustDomain,
		"--listen", listen, "--dns-name", "127.0.0.1", "--svid-lifetime", "2h"))
	if err != nil {
		return nil, err
	}
	if err := p.await(ctx, `ca ready`, 2*time.Minute); err != nil {
		p.stop()
		return nil, err
	}
	return &meshCA{process: p, binary: binary, state: state, url: "https://" + listen}, nil
}

// token writes a one-time bootstrap token for id to path.
func (c *meshCA) token(ctx context.Context, id, path string) error {
	out, err := exec.CommandContext(ctx, c.binary, "token", "--state", c.state, id).Output()
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return fmt.Errorf("agentmesh token %s: %w: %s", id, err, ee.Stderr)
		}
		return fmt.Errorf("agentmesh token %s: %w", id, err)
	}
	return os.WriteFile(path, []byte(strings.TrimSpace(string(out))+"\n"), 0o600)
}

// meshProxy is a running `agentmesh proxy`.
type meshProxy struct {
	*process
	id, state string
}

// startProxy enrols spiffe://example.org/host/<name> with config body (everything but the
// identity, state, addresses and CA) and waits until it holds an SVID.
func startProxy(ctx context.Context, ca *meshCA, dir, name, tunnel, body string) (*meshProxy, error) {
	state := filepath.Join(dir, name)
	if err := os.MkdirAll(state, 0o700); err != nil {
		return nil, err
	}
	id := "spiffe://" + trustDomain + "/host/" + name
	if err := ca.token(ctx, id, filepath.Join(state, "token")); err != nil {
		return nil, err
	}
	admin, err := freeAddr()
	if err != nil {
		return nil, err
	}
	var b strings.Builder
	fmt.Fprintf(&b, "id: %s\nstate: %s\ntunnel: %s\nadmin: %s\n", id, state, tunnel, admin)
	fmt.Fprintf(&b, "ca:\n  url: %s\n  root: %s\n  token_file: token\n", ca.url, filepath.Join(ca.state, "root.crt"))
	// Per-connection events are at Debug: logging them would be measured too.
	b.WriteString("log:\n  level: info\n  format: text\n")
	// Keys in memory, as in the recorded results: the benchmark measures the
	// transports, and a SoftHSM signature per full handshake would be measured too.
	b.WriteString("keys: memory\n")
	// The load generators are no registered agents: they travel with the host identity.
	b.WriteString("unattested: host\n")
	b.WriteString(body)
	cfg := filepath.Join(state, "proxy.yaml")
	if err := os.WriteFile(cfg, []byte(b.String()), 0o600); err != nil {
		return nil, err
	}
	p, err := startProcess("proxy "+name, exec.Command(ca.binary, "proxy", "--config", cfg))
	if err != nil {
		return nil, err
	}
	if err := p.await(ctx, `msg=rotated .*trigger=enroll`, time.Minute); err != nil {
		p.stop()
		return nil, err
	}
	return &meshProxy{process: p, id: id, state: state}, nil
}

// rotate asks the proxy to rotate its identity now, as an operator would.
func (p *meshProxy) rotate(ctx context.Context, binary string) error {
	out, err := exec.CommandContext(ctx, binary, "rotate", "--state", p.state, "--reason", "benchmark").CombinedOutput()
	if err != nil {
		return fmt.Errorf("agentmesh rotate: %w: %s", err, strings.TrimSpace(string(out)))
	}
	return nil
}

// topology is what one mode put between the load generator and the echo server.
type topology struct {
	addr   string     // where the load generator connects
	procs  []*process // the two proxies or relays, whose CPU time is measured
	client *meshProxy // the proxy on the client's side, for mesh modes
	server *meshProxy // the proxy in front of the echo server, for mesh modes
}

func (t *topology) stop() {
	for _, p := range t.procs {
		p.stop()
	}
}

// healthy reports an error if a process of the topology has exited.
func (t *topology) healthy() error {
	var errs []error
	for _, p := range t.procs {
		errs = append(errs, p.exited())
	}
	return errors.Join(errs...)
}

// startMesh starts proxy b in front of the echo server and proxy a with a route to it,
// both with the mode's extra configuration.
func startMesh(ctx context.Context, ca *meshCA, dir string, m mode, echoPort int) (*topology, error) {
	tunnelB, err := freeAddr()
	if err != nil {
		return nil, err
	}
	tunnelA, listen := "", ""
	if tunnelA, err = freeAddr(); err != nil {
		return nil, err
	}
	if listen, err = freeAddr(); err != nil {
		return nil, err
	}
	if dir, err = os.MkdirTemp(dir, m.name+"-"); err != nil {
		return nil, err
	}
	// One identity per mode: the meshes of all modes run at once on one CA, and the CA
	// renews only the newest certificate of an identity (a second holder is a fork).
	nameA, nameB := "a-"+m.name, "b-"+m.name
	idA := "spiffe://" + trustDomain + "/host/" + nameA
	b, err := startProxy(ctx, ca, dir, nameB, tunnelB,
		m.config+fmt.Sprintf("services:\n  - port: %d\n    allow: [%s]\n", echoPort, idA))
	if err != nil {
		return nil, err
	}
	route := fmt.Sprintf("routes:\n  - listen: %s\n    peer: %s\n    peer_id: %s\n    target_port: %d\n",
		listen, tunnelB, b.id, echoPort)
	if m.transport != "" {
		route += "    transport: " + m.transport + "\n"
	}
	a, err := startProxy(ctx, ca, dir, nameA, tunnelA, m.config+route)
	if err != nil {
		b.stop()
		return nil, err
	}
	return &topology{addr: listen, procs: []*process{a.process, b.process}, client: a, server: b}, nil
}

// startRelays starts the reference: a tlsrelay server in front of the echo server and a
// tlsrelay client that the load generator connects to.
func startRelays(ctx context.Context, binary string, pki *relayPKI, echoAddr string) (*topology, error) {
	start := func(role, listen, connect, cert, key string) (*process, error) {
		p, err := startProcess("tlsrelay "+role, exec.Command(binary, "-role", role, "-listen", listen,
			"-connect", connect, "-cert", cert, "-key", key, "-ca", pki.root))
		if err != nil {
			return nil, err
		}
		if err := p.await(ctx, `listening on`, 30*time.Second); err != nil {
			p.stop()
			return nil, err
		}
		return p, nil
	}
	serverAddr, err := freeAddr()
	if err != nil {
		return nil, err
	}
	clientAddr, err := freeAddr()
	if err != nil {
		return nil, err
	}
	srv, err := start("server", serverAddr, echoAddr, pki.serverCert, pki.serverKey)
	if err != nil {
		return nil, err
	}
	cli, err := start("client", clientAddr, serverAddr, pki.clientCert, pki.clientKey)
	if err != nil {
		srv.stop()
		return nil, err
	}
	return &topology{addr: clientAddr, procs: []*process{cli, srv}}, nil
}

// relayPKI holds the files of the reference relays' throwaway CA: a root and an
// intermediate (the shape of an SVID chain) and a P-256 leaf for each side. The CA keys
// never leave memory.
type relayPKI struct {
	root, serverCert, serverKey, clientCert, clientKey string
}

func newRelayPKI(dir string) (*relayPKI, error) {
	now := time.Now()
	serial := int64(0)
	issue := func(tmpl *x509.Certificate, parent *x509.Certificate, parentKey *ecdsa.PrivateKey) (*x509.Certificate, *ecdsa.PrivateKey, error) {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return nil, nil, err
		}
		serial++
		tmpl.SerialNumber = big.NewInt(serial)
		tmpl.NotBefore, tmpl.NotAfter = now.Add(-time.Minute), now.Add(24*time.Hour)
		if parent == nil {
			parent, parentKey = tmpl, key
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, &key.PublicKey, parentKey)
		if err != nil {
			return nil, nil, err
		}
		cert, err := x509.ParseCertificate(der)
		return cert, key, err
	}
	ca := func(cn string) *x509.Certificate {
		return &x509.Certificate{Subject: pkix.Name{CommonName: cn}, IsCA: true, BasicConstraintsValid: true,
			KeyUsage: x509.KeyUsageCertSign}
	}
	root, rootKey, err := issue(ca("meshbench root"), nil, nil)
	if err != nil {
		return nil, err
	}
	inter, interKey, err := issue(ca("meshbench intermediate"), root, rootKey)
	if err != nil {
		return nil, err
	}
	p := &relayPKI{
		root:       filepath.Join(dir, "root.pem"),
		serverCert: filepath.Join(dir, "server.pem"), serverKey: filepath.Join(dir, "server-key.pem"),
		clientCert: filepath.Join(dir, "client.pem"), clientKey: filepath.Join(dir, "client-key.pem"),
	}
	if err := os.WriteFile(p.root, pemBlock("CERTIFICATE", root.Raw), 0o600); err != nil {
		return nil, err
	}
	for _, leaf := range []struct {
		certFile, keyFile string
		usage             x509.ExtKeyUsage
	}{
		{p.serverCert, p.serverKey, x509.ExtKeyUsageServerAuth},
		{p.clientCert, p.clientKey, x509.ExtKeyUsageClientAuth},
	} {
		cert, key, err := issue(&x509.Certificate{
			Subject:     pkix.Name{CommonName: "tlsrelay"},
			DNSNames:    []string{"tlsrelay.invalid"},
			KeyUsage:    x509.KeyUsageDigitalSignature,
			ExtKeyUsage: []x509.ExtKeyUsage{leaf.usage},
		}, inter, interKey)
		if err != nil {
			return nil, err
		}
		der, err := x509.MarshalPKCS8PrivateKey(key)
		if err != nil {
			return nil, err
		}
		chain := append(pemBlock("CERTIFICATE", cert.Raw), pemBlock("CERTIFICATE", inter.Raw)...)
		if err := os.WriteFile(leaf.certFile, chain, 0o600); err != nil {
			return nil, err
		}
		if err := os.WriteFile(leaf.keyFile, pemBlock("PRIVATE KEY", der), 0o600); err != nil {
			return nil, err
		}
	}
	return p, nil
}

func pemBlock(typ string, der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der})
}

// Echo server protocol: the first byte of a connection chooses what the server does.
const (
	// modeEcho: echo every byte until EOF.
	modeEcho = 'e'
	// modeSink: an 8-byte big-endian length n follows; read and discard n bytes, then
	// answer with n as 8 bytes. The upload needs no half-close, so it measures the
	// transport, not its end-of-stream handling.
	modeSink = 's'
)

// echoServer is the target of every mode: plain TCP on loopback, in this process.
type echoServer struct {
	ln   net.Listener
	bufs sync.Pool
	wg   sync.WaitGroup
}

func startEcho() (*echoServer, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	s := &echoServer{ln: ln, bufs: sync.Pool{New: func() any { return new([64 << 10]byte) }}}
	s.wg.Go(s.serve)
	return s, nil
}

func (s *echoServer) port() int { return s.ln.Addr().(*net.TCPAddr).Port }

func (s *echoServer) addr() string { return s.ln.Addr().String() }

// close stops accepting and waits for the connections, which end when their clients
// (the load generator, a relay or a proxy) close them.
func (s *echoServer) close() {
	s.ln.Close()
	s.wg.Wait()
}

func (s *echoServer) serve() {
	for {
		c, err := s.ln.Accept()
		if err != nil {
			return
		}
		s.wg.Go(func() { s.handle(c) })
	}
}

func (s *echoServer) handle(c net.Conn) {
	defer c.Close()
	buf := s.bufs.Get().(*[64 << 10]byte)
	defer s.bufs.Put(buf)
	if _, err := io.ReadFull(c, buf[:1]); err != nil {
		return
	}
	switch buf[0] {
	case modeEcho:
		for {
			n, err := c.Read(buf[:])
			if n > 0 {
				if _, werr := c.Write(buf[:n]); werr != nil {
					return
				}
			}
			if err != nil {
				return
			}
		}
	case modeSink:
		if _, err := io.ReadFull(c, buf[:8]); err != nil {
			return
		}
		want := binary.BigEndian.Uint64(buf[:8])
		var got uint64
		for got < want {
			n, err := c.Read(buf[:min(uint64(len(buf)), want-got)])
			got += uint64(n)
			if err != nil {
				return
			}
		}
		binary.BigEndian.PutUint64(buf[:8], got)
		_, _ = c.Write(buf[:8])
	}
}
