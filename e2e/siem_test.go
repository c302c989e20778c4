package e2e

import (
	"bufio"
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/agentmesh/agentmesh/audit/siem"
)

// outage is how long the receiver is away while the proxy is under load.
const outage = 10 * time.Second

// TestSIEM: a real rsyslogd, with its GnuTLS stream driver and certificates of the
// test's own, receives the audit logs of a proxy under load and of the CA. It is stopped
// for 10 s and started again: every record of both logs arrives, unchanged, and the only
// ones that arrive twice are records written within the resend window before the
// receiver went away (or during the outage, before the sink noticed it). The proxy serves
// every request meanwhile: the log's writer never waits for the SIEM.
func TestSIEM(t *testing.T) {
	requireE2E(t)
	rs := newRsyslog(t)
	rs.start(t)

	caSIEM := filepath.Join(t.TempDir(), "siem.yaml")
	writeFile(t, caSIEM, rs.settings("", "ca.test"))
	authority := startCAOn(t, host{}, fmt.Sprintf("127.0.0.1:%d", freePort(t)), time.Minute, "--siem", caSIEM)
	httpPort := serveHTTP(t, func(w http.ResponseWriter, _ *http.Request) { _, _ = io.WriteString(w, "ok") })
	idA := "spiffe://" + trustDomain + "/host/a"
	b := startProxy(t, authority, "b", nil, []service{{port: httpPort, allow: []string{idA}}},
		"audit:\n  siem:\n"+rs.settings("    ", "host-b.test"))
	routeAddr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	startProxy(t, authority, "a", []route{{listen: routeAddr, peer: b.tunnel, peerID: b.id, targetPort: httpPort}}, nil, "")
	originB, originCA := trustDomain+"/host/b/audit", trustDomain+"/ca/audit"

	load := startLoad(routeAddr)
	defer load.stop()
	waitForEvery(t, 500*time.Millisecond, time.Minute, "the receiver holding 200 records of proxy b", func() error {
		if n := len(rs.received(t)[originB]); n < 200 {
			return fmt.Errorf("%d", n)
		}
		return nil
	})

	// The outage, under load.
	stoppedAt := time.Now()
	if err := rs.stop(); err != nil {
		t.Fatalf("stop rsyslogd: %v", err)
	}
	awaitMetric(t, b, "agentmesh_audit_siem_connected", func(v float64) bool { return v == 0 }, 10*time.Second)
	atStop := lastSeq(t, b.auditPath())
	waitForEvery(t, time.Second, outage+30*time.Second, "the receiver away for 10 s while the log grows", func() error {
		if d := time.Since(stoppedAt); d < outage {
			return fmt.Errorf("away for %v", d.Round(time.Second))
		}
		if n := lastSeq(t, b.auditPath()); n < atStop+100 {
			return fmt.Errorf("%d records written since the stop", n-atStop)
		}
		return nil
	})
	backlog := awaitMetric(t, b, "agentmesh_audit_siem_backlog_records", func(v float64) bool { return v > 0 }, 5*time.Second)
	restartedAt := time.Now()
	rs.start(t)
	atRestart := lastSeq(t, b.auditPath())
	waitForEvery(t, 200*time.Millisecond, time.Minute, "the receiver holding every record proxy b wrote before the restart", func() error {
		return missing(rs.received(t)[originB], atRestart)
	})
	catchUp := time.Since(restartedAt)

	// The load ends; then every record of both logs is there, each line as in the log.
	served, failed := load.stop()
	if failed > 0 {
		t.Errorf("%d of %d requests through the proxies failed while the SIEM was away", failed, served+failed)
	}
	var got map[string]map[uint64][]string
	logs := map[string]string{originB: b.auditPath(), originCA: authority.auditPath()}
	waitForEvery(t, 500*time.Millisecond, time.Minute, "every record of proxy b and the ca at the receiver", func() error {
		got = rs.received(t)
		for origin, path := range logs {
			if err := missing(got[origin], lastSeq(t, path)); err != nil {
				return fmt.Errorf("%s: %w", origin, err)
			}
		}
		return nil
	})
	dups := map[string]int{}
	for origin, path := range logs {
		dups[origin] = checkReceived(t, origin, path, got[origin], stoppedAt, restartedAt)
	}
	// What arrived twice is what the sink sent again, nothing else.
	if resent := metricValue(t, b, "agentmesh_audit_siem_resent_total"); float64(dups[originB]) > resent {
		t.Errorf("proxy b: %d records received twice, but the sink resent %v", dups[originB], resent)
	}
	t.Logf("siem: proxy b wrote %d records (%d during the %v outage, backlog metric %.0f at the restart), the ca %d; "+
		"received twice: %d of proxy b, %d of the ca; every record written before the restart was at the receiver %v after it; %d requests served",
		lastSeq(t, b.auditPath()), atRestart-atStop, outage, backlog, lastSeq(t, authority.auditPath()), dups[originB], dups[originCA],
		catchUp.Round(10*time.Millisecond), served)
}

// checkReceived compares the records of one log with those received: each line as in
// the log, at most twice, and twice only when written from the resend window before the
// stop until the restart. It returns how many arrived twice.
func checkReceived(t *testing.T, origin, path string, got map[uint64][]string, stoppedAt, restartedAt time.Time) int {
	t.Helper()
	// Two seconds more: the sink's lag behind the writer (its poll, a busy machine).
	from := stoppedAt.Add(-siem.DefaultResendWindow - 2*time.Second)
	dups := 0
	for seq, line := range logLines(t, path) {
		copies := got[seq]
		for _, c := range copies {
			if c != line {
				t.Errorf("%s seq %d: received %q, the log has %q", origin, seq, c, line)
			}
		}
		if len(copies) < 2 {
			continue
		}
		dups++
		at := recordTimeOf(t, line)
		if len(copies) > 2 || at.Before(from) || at.After(restartedAt) {
			t.Errorf("%s seq %d (written %v, receiver stopped %v, restarted %v) received %d times",
				origin, seq, at.Format(time.StampMilli), stoppedAt.Format(time.StampMilli),
				restartedAt.Format(time.StampMilli), len(copies))
		}
	}
	return dups
}

// missing names the first seq up to last that has not been received.
func missing(got map[uint64][]string, last uint64) error {
	for seq := uint64(1); seq <= last; seq++ {
		if len(got[seq]) == 0 {
			return fmt.Errorf("seq %d of %d not received (%d received)", seq, last, len(got))
		}
	}
	return nil
}

// logLines returns the complete record lines of an audit log by seq.
func logLines(t *testing.T, path string) map[uint64]string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	out := map[uint64]string{}
	for i, line := range bytes.SplitAfter(b, []byte("\n")) {
		if len(line) == 0 || line[len(line)-1] != '\n' {
			break // being written
		}
		out[uint64(i)+1] = string(line[:len(line)-1])
	}
	return out
}

// lastSeq is the seq of the last complete record of an audit log.
func lastSeq(t *testing.T, path string) uint64 {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return uint64(bytes.Count(b, []byte("\n")))
}

func recordTimeOf(t *testing.T, line string) time.Time {
	t.Helper()
	m := regexp.MustCompile(`"time":"([^"]+)"`).FindStringSubmatch(line)
	if m == nil {
		t.Fatalf("no time in %q", line)
	}
	at, err := time.Parse(time.RFC3339Nano, m[1])
	if err != nil {
		t.Fatal(err)
	}
	return at
}

// rsyslog is an rsyslogd of the test's own: its configuration, certificates, work
// directory, pid file and output file in a temporary directory, listening on loopback
// with imtcp and the gtls driver only (no imuxsock or imklog, so it leaves any system
// syslog alone), writing the structured data and MSG of agentmesh's messages to out.log.
type rsyslog struct {
	bin, dir, addr string
	proc           *process
}

func newRsyslog(t *testing.T) *rsyslog {
	t.Helper()
	bin, err := exec.LookPath("rsyslogd")
	if err != nil {
		t.Fatal("rsyslogd missing: make deps installs rsyslog and rsyslog-gnutls")
	}
	dir := t.TempDir()
	rs := &rsyslog{bin: bin, dir: dir, addr: fmt.Sprintf("127.0.0.1:%d", freePort(t))}
	writeTLSFiles(t, dir)
	if err := os.Mkdir(filepath.Join(dir, "work"), 0o700); err != nil {
		t.Fatal(err)
	}
	_, port, _ := net.SplitHostPort(rs.addr)
	writeFile(t, filepath.Join(dir, "rsyslog.conf"), fmt.Sprintf(`global(
  workDirectory="%[1]s/work"
  maxMessageSize="64k"
  defaultNetstreamDriver="gtls"
  defaultNetstreamDriverCAFile="%[1]s/ca.pem"
  defaultNetstreamDriverCertFile="%[1]s/server.pem"
  defaultNetstreamDriverKeyFile="%[1]s/server.key"
)
module(load="imtcp" streamDriver.name="gtls" streamDriver.mode="1" streamDriver.authMode="anon")
input(type="imtcp" address="127.0.0.1" port="%[2]s")
# Each message is written by the input's thread before the next is read: nothing waits
# in a queue that a stop could discard.
main_queue(queue.type="Direct")
template(name="sdmsg" type="string" string="%%structured-data%% %%msg%%\n")
if $app-name == "agentmesh" then {
  action(type="omfile" file="%[1]s/out.log" template="sdmsg" fileCreateMode="0600")
}
`, dir, port))
	return rs
}

// settings is the SIEM section (siem.Settings) pointing at the receiver, each line
// indented by indent.
func (rs *rsyslog) settings(indent, hostname string) string {
	return fmt.Sprintf("%[1]saddress: %[2]s\n%[1]sca_file: %[3]s/ca.pem\n%[1]sserver_name: syslog.test\n%[1]shostname: %[4]s\n",
		indent, rs.addr, rs.dir, hostname)
}

// start runs rsyslogd in the foreground and waits until it accepts TLS connections.
func (rs *rsyslog) start(t *testing.T) {
	t.Helper()
	rs.proc = startCmd(t, "rsyslogd", exec.Command(rs.bin, "-n", "-f", filepath.Join(rs.dir, "rsyslog.conf"),
		"-i", filepath.Join(rs.dir, "rsyslogd.pid")))
	waitFor(t, 30*time.Second, "rsyslogd listening", func() error {
		select {
		case <-rs.proc.done:
			t.Fatalf("rsyslogd exited (%v):\n%s", rs.proc.err, rs.proc.tail(20))
		default:
		}
		c, err := net.DialTimeout("tcp", rs.addr, time.Second)
		if err == nil {
			_ = c.Close()
		}
		return err
	})
}

func (rs *rsyslog) stop() error { return rs.proc.stop() }

// receivedRE is one line of out.log: the structured data the sink wrote, then the MSG.
var receivedRE = regexp.MustCompile(`^\[agentmesh@32473 seq="(\d+)" origin="([^"]*)"\] ?(.*)$`)

// received reads out.log: by origin and seq, every copy of the record line received.
func (rs *rsyslog) received(t *testing.T) map[string]map[uint64][]string {
	t.Helper()
	out := map[string]map[uint64][]string{}
	f, err := os.Open(filepath.Join(rs.dir, "out.log"))
	if errors.Is(err, os.ErrNotExist) {
		return out
	}
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = f.Close() }() // read only
	r := bufio.NewReaderSize(f, 1<<20)
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			return out // EOF, or a line rsyslogd is still writing
		}
		m := receivedRE.FindStringSubmatch(line[:len(line)-1])
		if m == nil {
			t.Fatalf("out.log: unexpected line %q", line)
		}
		seq, _ := strconv.ParseUint(m[1], 10, 64)
		if out[m[2]] == nil {
			out[m[2]] = map[uint64][]string{}
		}
		out[m[2]][seq] = append(out[m[2]][seq], m[3])
	}
}

// writeTLSFiles writes a CA (ca.pem) and the receiver's certificate for syslog.test
// (server.pem, server.key: rsyslogd reads its key from a file, mode 0600 in the test's
// directory).
func writeTLSFiles(t *testing.T, dir string) {
	t.Helper()
	now := time.Now()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "siem test ca"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	caCert, _ := x509.ParseCertificate(caDER)
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "syslog.test"},
		DNSNames: []string{"syslog.test"}, NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	for name, block := range map[string]*pem.Block{"ca.pem": {Type: "CERTIFICATE", Bytes: caDER},
		"server.pem": {Type: "CERTIFICATE", Bytes: der}, "server.key": {Type: "PRIVATE KEY", Bytes: keyDER}} {
		writeFile(t, filepath.Join(dir, name), string(pem.EncodeToMemory(block)))
	}
}

// load sends requests through a route, each on a new connection (a handshake and a
// connection record on each proxy), at most 100 a second, until stopped.
type load struct {
	served, failed atomic.Int64
	quit           chan struct{}
	wg             sync.WaitGroup
	once           sync.Once
}

func startLoad(addr string) *load {
	l := &load{quit: make(chan struct{})}
	hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	for range 2 {
		l.wg.Go(func() {
			tick := time.NewTicker(20 * time.Millisecond)
			defer tick.Stop()
			for {
				select {
				case <-l.quit:
					return
				case <-tick.C:
				}
				resp, err := hc.Get("http://" + addr + "/")
				if err == nil {
					_, err = io.Copy(io.Discard, resp.Body)
					_ = resp.Body.Close()
				}
				if err != nil {
					l.failed.Add(1)
					continue
				}
				l.served.Add(1)
			}
		})
	}
	return l
}

// stop ends the load and returns the requests served and failed.
func (l *load) stop() (served, failed int64) {
	l.once.Do(func() { close(l.quit) })
	l.wg.Wait()
	return l.served.Load(), l.failed.Load()
}
