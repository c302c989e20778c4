package e2e

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.step.sm/crypto/pemutil"

	"github.com/agentmesh/agentmesh/hsm"
)

// TestRevocationCutoff revokes an identity, reinstates it and enrols it again: the
// certificate from before the revocation stays refused by the CA (renewal) and by a
// proxy (handshakes), the new one is accepted. Once every certificate the revocation
// covered has expired, the CA drops its entries and the proxy accepts the shrunk list
// (its deny-list version moves, the drop is audited with the number of expired
// entries); a CA restored from a backup taken before the shrink then serves a
// rolled-back list, which the proxy refuses and keeps its own.
func TestRevocationCutoff(t *testing.T) {
	requireE2E(t)
	const lifetime = 30 * time.Second
	authority := startCA(t, lifetime)
	svcPort := freePort(t)
	svc := startCmd(t, "service", exec.Command(demoService, "-listen", "127.0.0.1:"+itoa(svcPort), "-name", "service"))
	awaitListen(t, svc, svcPort)
	victim := "spiffe://" + trustDomain + "/host/v"
	b := startProxy(t, authority, "b", nil, []service{{port: svcPort, allow: []string{victim}}}, "revocation:\n  poll: 1s\n")
	awaitMetric(t, b, listVersionMetric, func(v float64) bool { return v >= 1 }, 30*time.Second)

	old := enrollAs(t, authority, victim)
	old.port = uint16(svcPort)
	old.tunnel(t, b.tunnel, nil)
	oldSerial := old.svid.Certificates[0].SerialNumber.String()

	revokedAt := time.Now()
	out, errOut, err := runCmd(t.Context(), "revoke", "--state", authority.state, victim, "--reason", "key-compromise")
	if err != nil {
		t.Fatalf("agentmesh revoke: %v\n%s", err, errOut)
	}
	revoked := listVersion(t, out)
	awaitMetric(t, b, listVersionMetric, func(v float64) bool { return v >= float64(revoked) }, 10*time.Second)
	if old.tunnelErr(b.tunnel, nil) == nil {
		t.Fatal("the proxy accepted the revoked certificate")
	}
	awaitRecord(t, b, map[string]string{"type": "handshake", "result": "refused", "reason": "revoked", "peer_serial": oldSerial}, 10*time.Second)
	// A backup of the CA with the list that still carries the revocation.
	backup := authority.backup(t, lifetime)

	t.Run("reinstate: old certificate refused, new one accepted", func(t *testing.T) {
		if _, _, err := runCmd(t.Context(), "token", "--state", authority.state, victim); err == nil {
			t.Fatal("a token was issued for a revoked identity")
		}
		nobody := exec.Command("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
			binary, "reinstate", "--state", authority.state, victim, "--reason", "test")
		if out, err := nobody.CombinedOutput(); err == nil {
			t.Errorf("an unprivileged user reinstated an identity: %s", out)
		}
		if out, errOut, err := runCmd(t.Context(), "reinstate", "--state", authority.state, victim, "--reason", "host rebuilt"); err != nil {
			t.Fatalf("agentmesh reinstate: %v\n%s%s", err, out, errOut)
		}
		awaitRecordIn(t, "ca", authority.auditPath(), map[string]string{"type": "revocation", "action": "reinstate",
			"result": "ok", "spiffe_id": victim, "reason": "host rebuilt", "initiator": "uid:0"}, 10*time.Second)

		fresh := enrollAs(t, authority, victim) // a new token
		fresh.port = uint16(svcPort)
		fresh.tunnel(t, b.tunnel, nil)
		if err := old.tunnelErr(b.tunnel, nil); err == nil {
			t.Error("the proxy accepted the certificate from before the revocation after the reinstatement")
		}
		if err := old.renewErr(t); err == nil {
			t.Error("the CA renewed the certificate from before the revocation after the reinstatement")
		}
		if err := fresh.renewErr(t); err != nil {
			t.Errorf("renewal of the new certificate: %v", err)
		}
	})

	t.Run("the list shrinks after expiry", func(t *testing.T) {
		// Every certificate the revocation covers has expired a lifetime after it.
		var applied map[string]any
		waitFor(t, 3*lifetime, "the proxy applying a list that drops the revocation's identity and serial entries", func() error {
			expired := 0
			for _, r := range readAudit(t, b.auditPath()) {
				if matches(r, map[string]string{"type": "deny_list", "result": "applied"}) && r["expired"] != nil {
					expired += int(r["expired"].(float64))
					applied = r
				}
			}
			if expired < 2 {
				return fmt.Errorf("%d entries dropped", expired)
			}
			return nil
		})
		if v := metricValue(t, b, listVersionMetric); v <= float64(revoked) || v != applied["version"].(float64) {
			t.Errorf("deny-list version %v after the shrink, want the shrunk version %v (revoked at %d)", v, applied["version"], revoked)
		}
		fmt.Printf("deny_list_shrunk_after_ms=%d (from the revocation; svid lifetime %v)\n",
			recordTime(t, applied).Sub(revokedAt).Milliseconds(), lifetime)
	})

	t.Run("a rolled-back list is refused", func(t *testing.T) {
		held := metricValue(t, b, listVersionMetric)
		refusedBefore := refusedLists(t, b)
		since := time.Now()
		authority.restore(t, backup, lifetime)
		awaitRecordIn(t, "b", b.auditPath(), map[string]string{"type": "deny_list", "result": "refused"}, 30*time.Second)
		if got := refusedLists(t, b); got <= refusedBefore {
			t.Errorf("refused lists counted %v, before %v", got, refusedBefore)
		}
		if v := metricValue(t, b, listVersionMetric); v != held {
			t.Errorf("deny-list version %v after the rollback, want the %v held", v, held)
		}
		for _, r := range readAudit(t, b.auditPath()) {
			if matches(r, map[string]string{"type": "deny_list", "result": "refused"}) && recordTime(t, r).After(since) {
				t.Logf("refused: %v (%v)", r["reason"], r["error"])
			}
		}
	})
}

// TestStepRevoke: `step ca revoke --cert --key` (the real step CLI) against agentmesh ca
// lands on the mesh's deny-list: the proxy refuses the certificate, the CRL lists it,
// the CA audits it with the caller. Revoking another certificate's serial through
// step-ca's API is refused with a message that names agentmesh revoke.
func TestStepRevoke(t *testing.T) {
	requireE2E(t)
	step := stepBinary(t)
	authority := startCA(t, time.Minute)
	svcPort := freePort(t)
	svc := startCmd(t, "service", exec.Command(demoService, "-listen", "127.0.0.1:"+itoa(svcPort), "-name", "service"))
	awaitListen(t, svc, svcPort)
	holder := "spiffe://" + trustDomain + "/host/s"
	b := startProxy(t, authority, "b", nil, []service{{port: svcPort, allow: []string{holder}}}, "revocation:\n  poll: 1s\n")
	held := awaitMetric(t, b, listVersionMetric, func(v float64) bool { return v >= 1 }, 30*time.Second)

	r := enrollAs(t, authority, holder)
	r.port = uint16(svcPort)
	r.tunnel(t, b.tunnel, nil)
	serial := r.svid.Certificates[0].SerialNumber.String()
	other := enrollAs(t, authority, "spiffe://"+trustDomain+"/host/o")

	t.Run("another certificate's serial is refused", func(t *testing.T) {
		status, msg := stepRevokeAPI(t, authority, other, serial)
		if status != http.StatusForbidden || !strings.Contains(msg, "agentmesh revoke") {
			t.Errorf("POST /1.0/revoke of another serial: %d %q, want 403 naming agentmesh revoke", status, msg)
		}
		awaitRecordIn(t, "ca", authority.auditPath(), map[string]string{"type": "revocation", "via": "step-ca",
			"result": "refused", "serial": serial, "initiator": other.svid.ID.String()}, 10*time.Second)
	})

	dir := t.TempDir()
	crt, key := filepath.Join(dir, "svid.crt"), filepath.Join(dir, "svid.key")
	writeSVIDFiles(t, r, crt, key)
	cmd := exec.CommandContext(t.Context(), step, "ca", "revoke", "--cert", crt, "--key", key,
		"--ca-url", authority.url, "--root", authority.root, "--reason", "laptop lost")
	cmd.Env = append(os.Environ(), "STEPPATH="+filepath.Join(dir, "step"), "HOME="+dir)
	started := time.Now()
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("step ca revoke: %v\n%s", err, out)
	}
	t.Logf("step ca revoke: %s", bytes.TrimSpace(out))
	awaitRecordIn(t, "ca", authority.auditPath(), map[string]string{"type": "revocation", "via": "step-ca",
		"result": "ok", "serial": serial, "initiator": holder, "reason": "laptop lost"}, 10*time.Second)
	awaitMetric(t, b, listVersionMetric, func(v float64) bool { return v > held }, 10*time.Second)
	fmt.Printf("step_revoke_enforced_ms=%d\n", time.Since(started).Milliseconds())
	if err := r.tunnelErr(b.tunnel, nil); err == nil {
		t.Error("the proxy accepted a certificate revoked with step ca revoke")
	}
	awaitRecord(t, b, map[string]string{"type": "handshake", "result": "refused", "reason": "revoked", "peer_serial": serial}, 10*time.Second)
	if crl := fetchCRL(t, authority, r); !strings.Contains(strings.Join(crl, " "), serial) {
		t.Errorf("serial %s is not in the CRL %v", serial, crl)
	}
	if err := r.renewErr(t); err == nil {
		t.Error("a certificate revoked with step ca revoke was renewed")
	}
}

const (
	listVersionMetric = "agentmesh_revocation_list_version"
	refusedMetric     = "agentmesh_revocation_lists_refused_total"
)

func refusedLists(t *testing.T, p *meshProxy) float64 { return metricValue(t, p, refusedMetric) }

func (c *meshCA) auditPath() string { return filepath.Join(c.state, "audit.log") }

// backup stops the CA, copies its state directory and starts it again; it returns
// the copy.
func (c *meshCA) backup(t *testing.T, lifetime time.Duration) string {
	t.Helper()
	if err := c.stop(); err != nil {
		t.Fatalf("stop the ca: %v", err)
	}
	copyDir := filepath.Join(t.TempDir(), "ca-backup")
	copyCAState(t, c.state, copyDir)
	c.restartWith(t, c.state, lifetime)
	return copyDir
}

// copyCAState copies a CA's state directory and the token PIN kept beside it
// (hsm.DefaultPINFile).
func copyCAState(t *testing.T, from, to string) {
	t.Helper()
	for _, p := range [][2]string{{from, to}, {hsm.DefaultPINFile(from), hsm.DefaultPINFile(to)}} {
		if out, err := exec.Command("cp", "-a", p[0], p[1]).CombinedOutput(); err != nil {
			t.Fatalf("copy the ca state: %v\n%s", err, out)
		}
	}
}

// restore stops the CA and starts it again on a copy of the state directory backup.
func (c *meshCA) restore(t *testing.T, backup string, lifetime time.Duration) {
	t.Helper()
	if err := c.stop(); err != nil {
		t.Fatalf("stop the ca: %v", err)
	}
	restored := filepath.Join(t.TempDir(), "ca-restored")
	copyCAState(t, backup, restored)
	c.restartWith(t, restored, lifetime)
}

func (c *meshCA) restartWith(t *testing.T, state string, lifetime time.Duration) {
	t.Helper()
	n := startCAIn(t, host{}, strings.TrimPrefix(c.url, "https://"), lifetime, state)
	c.process, c.state = n.process, n.state
}

// stepBinary is the step CLI that make deps installs.
func stepBinary(t *testing.T) string {
	t.Helper()
	if p, err := exec.LookPath("step"); err == nil {
		return p
	}
	if out, err := exec.Command("go", "env", "GOPATH").Output(); err == nil {
		if p := filepath.Join(strings.TrimSpace(string(out)), "bin", "step"); fileExists(p) {
			return p
		}
	}
	if os.Getenv("CI") != "" {
		t.Fatal("the step CLI is not installed: make deps installs it")
	}
	t.Skip("the step CLI is not installed: run make deps")
	return ""
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// writeSVIDFiles writes r's chain and key as PEM files.
func writeSVIDFiles(t *testing.T, r *rogue, crt, key string) {
	t.Helper()
	var chain bytes.Buffer
	for _, c := range r.svid.Certificates {
		_ = pem.Encode(&chain, &pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
	}
	writeFile(t, crt, chain.String())
	block, err := pemutil.Serialize(r.key)
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, key, string(pem.EncodeToMemory(block)))
}

// stepRevokeAPI posts step-ca's revoke request for serial to the CA, authenticated
// by r's certificate, and returns the status and message.
func stepRevokeAPI(t *testing.T, authority *meshCA, r *rogue, serial string) (int, string) {
	t.Helper()
	pool := x509.NewCertPool()
	for _, c := range r.roots {
		pool.AddCert(c)
	}
	cert := tls.Certificate{PrivateKey: r.key, Leaf: r.svid.Certificates[0]}
	for _, c := range r.svid.Certificates {
		cert.Certificate = append(cert.Certificate, c.Raw)
	}
	hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{
		RootCAs: pool, MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{cert}}}}
	body, _ := json.Marshal(map[string]any{"serial": serial, "reasonCode": 0, "passive": true})
	resp, err := hc.Post(authority.url+"/1.0/revoke", "application/json", bytes.NewReader(body))
	if err != nil {
		t.Fatalf("POST /1.0/revoke: %v", err)
	}
	defer resp.Body.Close()
	var answer struct {
		Message string `json:"message"`
	}
	_ = json.NewDecoder(resp.Body).Decode(&answer)
	return resp.StatusCode, answer.Message
}
