package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/x509"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"reflect"
	"syscall"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/ca"
	"github.com/agentmesh/agentmesh/hsm"
	"github.com/agentmesh/agentmesh/policy"
	"github.com/agentmesh/agentmesh/proxy"
	"github.com/agentmesh/agentmesh/rotator"
)

// configPoll is how often the proxy looks for a changed configuration file, besides
// SIGHUP.
const configPoll = 2 * time.Second

// openKeyStore returns where the proxy's SVID keys live: a PKCS#11 token by default
// ("softhsm", the default: a SoftHSM2 token in the state directory; "pkcs11:…": that
// token), where they are generated, used and destroyed without ever leaving it and
// outlive the process, so a restarted proxy keeps its identity; or process memory
// ("memory"), lost with the process, so every start enrols with a new token.
func openKeyStore(ctx context.Context, cfg *proxyConfig) (rotator.KeyStore, func(), error) {
	uri := cfg.Keys
	release := func() {}
	switch {
	case uri == "memory":
		return rotator.MemoryKeys{}, func() {}, nil
	case uri == "" || uri == "softhsm":
		var err error
		// The PIN: a systemd credential when the unit passes one, else
		// STATE/hsm.pin, beside the token directory STATE/hsm and not in it.
		if uri, release, err = hsm.SoftHSM(filepath.Join(cfg.State, "hsm"), "agentmesh-proxy", credentialPIN()); err != nil {
			return nil, nil, fmt.Errorf("keys: %w", err)
		}
	}
	keys, err := hsm.OpenKeys(ctx, uri, "svid-")
	if err != nil {
		release()
		return nil, nil, fmt.Errorf("keys: %w", err)
	}
	return keys, func() { _ = keys.Close(); release() }, nil
}

// rotateNow is the operator's rotation (control socket, fleet command, configuration
// change): the rotator renews now, and for a compromised key the proxy drops every
// session-ticket key and the CA revokes every certificate of the identity's lineage but
// the new one (asked with the new SVID, since a proxy may revoke its own identity's
// lineage except the certificate it presents): the old serial, and any fork a thief
// renewed from the stolen key before the rotation.
func rotateNow(rot *rotator.Rotator, px *proxy.Proxy, cc ca.ClientConfig, logger *slog.Logger) rotateFunc {
	return func(ctx context.Context, req rotator.RotateRequest) (rotator.RotateResult, error) {
		if req.Compromised {
			px.ResetTicketKeys("compromise")
		}
		res, err := rot.Rotate(ctx, req)
		if err != nil || !req.Compromised || res.OldSerial == "" {
			return res, err
		}
		cert, err := rot.TLSCertificate()
		if err != nil {
			return res, fmt.Errorf("rotated, but cannot revoke serial %s: %w", res.OldSerial, err)
		}
		leaf := cert.Leaf
		if leaf == nil {
			if leaf, err = x509.ParseCertificate(cert.Certificate[0]); err != nil {
				return res, fmt.Errorf("rotated, but cannot revoke serial %s: %w", res.OldSerial, err)
			}
		}
		keep := leaf.SerialNumber.String()
		rr, err := ca.RevokeRemote(ctx, cc, *cert, ca.RevokeRequest{SPIFFEID: rot.ID().String(), Except: keep,
			Reason: "key-compromise: " + req.Reason})
		if err != nil {
			return res, fmt.Errorf("rotated, but the CA did not revoke the lineage of serial %s: %w", res.OldSerial, err)
		}
		logger.Info("compromised lineage revoked", "spiffe_id", rot.ID().String(), "serial", keep,
			"serials", rr.Serials, "initiator", req.Initiator)
		return res, nil
	}
}

// watcher re-reads the configuration file, the CA root file and the policy file on
// SIGHUP and whenever their content changes. An invalid file is refused with its file,
// line and field, and what is in force stays. A valid change of the rotation policy
// applies it, replaces the session-ticket keys (a policy change is a security event) and
// rotates (trigger config); other settings need a restart, which it says. A changed root
// file becomes the trust bundle; if it drops a CA, every ticket key is replaced too, so
// no session of that CA resumes. A changed authorization policy applies at once, to new,
// resumed and live connections alike.
type watcher struct {
	path   string
	cur    *proxyConfig
	rot    *rotator.Rotator
	agents *agents
	px     *proxy.Proxy
	rotate rotateFunc // every identity held
	audit  *audit.Log
	logger *slog.Logger
	// policyVersion is the version of the policy in force, as SetPolicy numbers them.
	policyVersion uint64
}

func (w *watcher) run(ctx context.Context) {
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	tick := time.NewTicker(configPoll)
	defer tick.Stop()
	cfgDigest, rootDigest, policyDigest := fileDigest(w.path), fileDigest(w.cur.CARoot), fileDigest(w.cur.PolicyPath)
	for {
		initiator := "file"
		select {
		case <-ctx.Done():
			return
		case <-hup:
			initiator = "sighup"
		case <-tick.C:
		}
		if d := fileDigest(w.cur.CARoot); initiator == "sighup" || !bytes.Equal(d, rootDigest) {
			rootDigest = d
			reloadBundle(w.cur, w.rot, w.px, w.audit, w.logger)
		}
		if w.cur.PolicyPath != "" {
			if d := fileDigest(w.cur.PolicyPath); initiator == "sighup" || !bytes.Equal(d, policyDigest) {
				policyDigest = d
				w.reloadPolicy(initiator)
			}
		}
		if d := fileDigest(w.path); initiator == "sighup" || !bytes.Equal(d, cfgDigest) {
			cfgDigest = d
			w.reloadConfig(ctx, initiator)
		}
	}
}

// reloadConfig applies a changed configuration file, as watcher says.
func (w *watcher) reloadConfig(ctx context.Context, initiator string) {
	next, err := loadProxyConfig(w.path)
	if err != nil {
		w.logger.Error("configuration refused; the one in force stays", "err", err)
		w.auditConfig(initiator, err)
		return
	}
	cur := w.cur
	if reflect.DeepEqual(next, cur) {
		return
	}
	other := *next
	other.Rotation = cur.Rotation
	if !reflect.DeepEqual(&other, cur) {
		w.logger.Warn("configuration changed beyond rotation: restart the proxy to apply the rest")
	}
	if reflect.DeepEqual(next.Rotation, cur.Rotation) {
		return
	}
	if err := w.rot.SetPolicy(next.Rotation); err != nil {
		w.logger.Error("configuration refused; the one in force stays", "err", err)
		w.auditConfig(initiator, err)
		return
	}
	if err := w.agents.setRotation(next.Rotation); err != nil {
		w.logger.Error("rotation policy refused by an agent's rotator", "err", err)
	}
	cur.Rotation = next.Rotation
	w.px.ResetTicketKeys("policy")
	w.logger.Info("configuration reloaded", "initiator", initiator)
	w.auditConfig(initiator, nil)
	req := rotator.RotateRequest{Trigger: rotator.TriggerConfig, Initiator: initiator, Reason: "configuration changed"}
	if _, err := w.rotate(ctx, req); err != nil {
		w.logger.Warn("rotation after the configuration change failed", "err", err)
	}
}

// auditConfig records a configuration change applied, or refused with err.
func (w *watcher) auditConfig(initiator string, err error) {
	rec := audit.ConfigChange{Path: w.path, Initiator: initiator, Result: audit.ConfigApplied}
	if err != nil {
		rec.Result, rec.Error = audit.ConfigRefused, err.Error()
	}
	if err := w.audit.Append(rec); err != nil {
		w.logger.Error("audit configuration change", "err", err)
	}
}

// reloadPolicy applies a changed authorization policy file and audits the outcome; an
// invalid one is refused and the one in force stays.
func (w *watcher) reloadPolicy(initiator string) {
	rec := audit.Policy{Path: w.cur.PolicyPath}
	a, err := loadPolicy(w.cur.PolicyPath)
	if err != nil {
		rec.Result, rec.Error, rec.Version = "refused", err.Error(), w.policyVersion
		w.logger.Error("policy refused; the one in force stays", "err", err)
	} else {
		rec.Result = "applied"
		rec.Version, rec.Closed = w.px.SetPolicy(a)
		w.policyVersion = rec.Version
		w.logger.Info("policy reloaded", "initiator", initiator, "version", rec.Version, "closed", rec.Closed)
	}
	if err := w.audit.Append(rec); err != nil {
		w.logger.Error("audit policy change", "err", err)
	}
}

// startPolicy loads the policy file named in the configuration, if any, and audits it as
// version 1.
func startPolicy(path string, log *audit.Log) (*policy.Authz, error) {
	if path == "" {
		return nil, nil
	}
	a, err := loadPolicy(path)
	if err != nil {
		return nil, err
	}
	return a, log.Append(audit.Policy{Path: path, Version: 1, Result: "applied"})
}

// reloadBundle makes the root file the trust bundle when it changed and is valid. The
// rotator audits each change of anchors and each bundle it refuses; a file that does
// not load is audited here.
func reloadBundle(cur *proxyConfig, rot *rotator.Rotator, px *proxy.Proxy, log *audit.Log, logger *slog.Logger) {
	next, err := x509bundle.Load(cur.ID.TrustDomain(), cur.CARoot)
	if err != nil {
		logger.Error("trust bundle refused; the one in force stays", "file", cur.CARoot, "err", err)
		if err := log.Append(rot.BundleRefused(err)); err != nil {
			logger.Error("audit trust bundle change", "err", err)
		}
		return
	}
	held, err := rot.GetX509BundleForTrustDomain(cur.ID.TrustDomain())
	if err != nil || held.Equal(next) {
		return
	}
	if err := rot.SetBundle(next); err != nil {
		logger.Error("trust bundle refused; the one in force stays", "file", cur.CARoot, "err", err)
		return
	}
	for _, a := range held.X509Authorities() {
		if !next.HasX509Authority(a) {
			px.ResetTicketKeys("ca_removed")
			break
		}
	}
	logger.Info("trust bundle reloaded", "file", cur.CARoot, "authorities", len(next.X509Authorities()))
}

// fileDigest is the SHA-256 of the file, or nil when it cannot be read.
func fileDigest(path string) []byte {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil
	}
	sum := sha256.Sum256(b)
	return sum[:]
}

// credentialPIN is the SoftHSM PIN file systemd passes as the credential hsm.pin
// (LoadCredential=hsm.pin:…, in $CREDENTIALS_DIRECTORY), or "" for hsm.SoftHSM's
// default, beside the token directory.
func credentialPIN() string {
	dir := os.Getenv("CREDENTIALS_DIRECTORY")
	if dir == "" {
		return ""
	}
	if _, err := os.Stat(filepath.Join(dir, "hsm.pin")); err != nil {
		return ""
	}
	return filepath.Join(dir, "hsm.pin")
}
