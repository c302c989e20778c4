package siem_test

import (
	"bufio"
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"io"
	"math/big"
	"net"
	"path/filepath"
	"regexp"
	"strconv"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/internal/testaudit"
)

// receiver is a loopback RFC 5425 listener: it parses every frame of every connection
// and passes the messages on, in order, on msgs.
type receiver struct {
	ln    net.Listener
	srv   *tls.Config
	roots *x509.CertPool
	msgs  chan message
	conns chan net.Conn // each accepted connection, so a test can drop it
}

// message is one received syslog message, split into the parts the tests check.
type message struct {
	raw    string
	seq    uint64
	msgID  string
	origin string
	line   string
}

// msgRE is the RFC 5424 message the sink writes.
var msgRE = regexp.MustCompile(`^<110>1 (\S+) (\S+) agentmesh - (\S+) \[agentmesh@32473 seq="(\d+)" origin="((?:[^"\\]|\\.)*)"\] (.*)$`)

func newReceiver(t testing.TB) *receiver {
	t.Helper()
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	now := time.Now()
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test syslog ca"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(caDER)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "syslog.test"},
		DNSNames: []string{"syslog.test"}, NotBefore: now.Add(-time.Hour), NotAfter: now.Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	srv := &tls.Config{MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{{Certificate: [][]byte{der}, PrivateKey: key}}}
	roots := x509.NewCertPool()
	roots.AddCert(ca)
	return listen(t, "127.0.0.1:0", srv, roots)
}

// relisten is a new receiver of r's certificate on addr (r's address, once r is closed).
func relisten(t testing.TB, r *receiver, addr string) *receiver {
	t.Helper()
	return listen(t, addr, r.srv, r.roots)
}

func listen(t testing.TB, addr string, srv *tls.Config, roots *x509.CertPool) *receiver {
	t.Helper()
	ln, err := tls.Listen("tcp", addr, srv)
	if err != nil {
		t.Fatal(err)
	}
	r := &receiver{ln: ln, srv: srv, roots: roots, msgs: make(chan message, 100000), conns: make(chan net.Conn, 16)}
	t.Cleanup(func() { _ = ln.Close() })
	go r.accept(t)
	return r
}

func (r *receiver) tlsConfig() *tls.Config {
	return &tls.Config{RootCAs: r.roots, ServerName: "syslog.test", MinVersion: tls.VersionTLS12}
}

func (r *receiver) accept(t testing.TB) {
	for {
		c, err := r.ln.Accept()
		if err != nil {
			return
		}
		r.conns <- c
		go r.read(t, c)
	}
}

// read parses `LEN SP MSG` frames until the connection ends.
func (r *receiver) read(t testing.TB, c net.Conn) {
	defer func() { _ = c.Close() }()
	br := bufio.NewReader(c)
	for {
		lenText, err := br.ReadString(' ')
		if err != nil {
			return
		}
		n, err := strconv.Atoi(lenText[:len(lenText)-1])
		if err != nil || n <= 0 {
			t.Errorf("frame length %q", lenText)
			return
		}
		buf := make([]byte, n)
		if _, err := io.ReadFull(br, buf); err != nil {
			return
		}
		m := msgRE.FindSubmatch(buf)
		if m == nil {
			t.Errorf("not the expected RFC 5424 message: %q", buf)
			return
		}
		seq, _ := strconv.ParseUint(string(m[4]), 10, 64)
		r.msgs <- message{raw: string(buf), seq: seq, msgID: string(m[3]), origin: string(m[5]), line: string(m[6])}
	}
}

// next waits for the next message.
func (r *receiver) next(t testing.TB) message {
	t.Helper()
	select {
	case m := <-r.msgs:
		return m
	case <-time.After(10 * time.Second):
		t.Fatal("no message within 10s")
		return message{}
	}
}

// openLog starts a log in a new directory and returns it with its path.
func openLog(t testing.TB) (*audit.Log, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "audit.log")
	return testaudit.Start(t, path), path
}

// appendN appends n handshake records, results alternating ok and refused (odd seqs
// are ok when the log starts empty), and waits until they are durable.
func appendN(t testing.TB, l *audit.Log, n int) {
	t.Helper()
	for i := range n {
		res := audit.ResultOK
		if i%2 == 1 {
			res = audit.ResultRefused
		}
		if err := l.Append(audit.Handshake{Direction: "inbound", Result: res, Transport: "tls"}); err != nil {
			t.Fatal(err)
		}
	}
	if err := l.Sync(t.Context()); err != nil {
		t.Fatal(err)
	}
}

// lines reads the log's record lines by seq.
func lines(t testing.TB, path string) map[uint64]string {
	t.Helper()
	out := map[uint64]string{}
	err := audit.Scan(path, 1, func(seq uint64, line []byte) error {
		out[seq] = string(bytes.Clone(line))
		return nil
	})
	if err != nil && !errors.Is(err, audit.ErrStop) {
		t.Fatal(err)
	}
	return out
}

// metric is the value of the metric name in reg, summed over its series.
func metric(t testing.TB, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var v float64
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			v += m.GetCounter().GetValue() + m.GetGauge().GetValue()
		}
	}
	return v
}
