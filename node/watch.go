package node

import (
	"bytes"
	"context"
	"crypto/sha256"
	"log/slog"
	"os"
	"os/signal"
	"reflect"
	"syscall"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/policy"
	"github.com/agentmesh/agentmesh/proxy"
	"github.com/agentmesh/agentmesh/rotator"
)

// configPoll is how often the proxy looks for a changed configuration, root or policy
// file, besides SIGHUP: hashing three small files twice a second is cheap, and a new
// route carries traffic within a second of the edit.
const configPoll = 500 * time.Millisecond

// configTarget is what a configuration change applies to (the applier).
type configTarget interface {
	setRotation(policy.RotationPolicy) error
	rotateAll(ctx context.Context, req rotator.RotateRequest) (rotator.RotateResult, error)
	setPolicy(*policy.Authz) (version uint64, closed int)
	setBundle(*x509bundle.Bundle) (changed bool, err error)
	bundleRefused(error) error
	applyListeners([]proxy.Route, []proxy.Service) error
	appendAudit(audit.Event) error
}

// watcher re-reads the configuration file, the CA root file and the policy file on
// SIGHUP and whenever their content changes, and applies what changed. An invalid file
// is refused with its file, line and field, and what is in force stays. A valid change
// of the rotation policy applies it, replaces the session-ticket keys and rotates
// (trigger config); routes and services go to applyListeners; other settings need a
// restart, which it says. A changed root file changes the trust bundle (bundle.go). A
// changed authorization policy applies at once, to new, resumed and live connections
// alike.
type watcher struct {
	cur    Config // the configuration in force
	to     configTarget
	logger *slog.Logger
	// policyVersion is the version of the policy in force, as SetPolicy numbers them.
	policyVersion uint64
	// The digests of the files as last read; nil when unreadable.
	cfgDigest, rootDigest, policyDigest []byte
}

func newWatcher(cur *Config, to configTarget, logger *slog.Logger) *watcher {
	return &watcher{cur: *cur, to: to, logger: logger,
		cfgDigest: fileDigest(cur.path), rootDigest: fileDigest(cur.CA.Root), policyDigest: fileDigest(cur.Policy)}
}

// run reloads on SIGHUP and on a changed file until ctx is done.
func (w *watcher) run(ctx context.Context) error {
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	w.loop(ctx, hup)
	return nil
}

// loop checks the files every configPoll, and all of them at once on hup.
func (w *watcher) loop(ctx context.Context, hup <-chan os.Signal) {
	tick := time.NewTicker(configPoll)
	defer tick.Stop()
	for {
		initiator := "file"
		select {
		case <-ctx.Done():
			return
		case <-hup:
			initiator = "sighup"
		case <-tick.C:
		}
		w.check(ctx, initiator)
	}
}

// check reloads each file that changed, or every file for a SIGHUP.
func (w *watcher) check(ctx context.Context, initiator string) {
	force := initiator == "sighup"
	if d := fileDigest(w.cur.CA.Root); force || !bytes.Equal(d, w.rootDigest) {
		w.rootDigest = d
		w.reloadBundle()
	}
	if w.cur.Policy != "" {
		if d := fileDigest(w.cur.Policy); force || !bytes.Equal(d, w.policyDigest) {
			w.policyDigest = d
			w.reloadPolicy(initiator)
		}
	}
	if d := fileDigest(w.cur.path); force || !bytes.Equal(d, w.cfgDigest) {
		w.cfgDigest = d
		w.reloadConfig(ctx, initiator)
	}
}

// reloadConfig applies a changed configuration file as a diff, as watcher says.
func (w *watcher) reloadConfig(ctx context.Context, initiator string) {
	next, err := LoadConfig(w.cur.path)
	if err != nil {
		w.logger.Error("configuration refused; the one in force stays", "err", err)
		w.auditConfig(initiator, err)
		return
	}
	cur := &w.cur
	if reflect.DeepEqual(next, cur) {
		return
	}
	if !sameFixed(next, cur) {
		w.logger.Warn("configuration changed beyond rotation, routes and services: restart the proxy to apply the rest")
	}
	if !reflect.DeepEqual(next.routes, cur.routes) || !reflect.DeepEqual(next.services, cur.services) {
		if err := w.to.applyListeners(next.routes, next.services); err != nil {
			w.logger.Error("routes and services refused; those in force stay", "err", err)
			w.auditConfig(initiator, err)
			return
		}
		cur.Routes, cur.routes, cur.Services, cur.services = next.Routes, next.routes, next.Services, next.services
	}
	rotate := !reflect.DeepEqual(next.Rotation, cur.Rotation)
	if rotate {
		if err := w.to.setRotation(next.Rotation); err != nil {
			w.logger.Error("configuration refused; the one in force stays", "err", err)
			w.auditConfig(initiator, err)
			return
		}
		cur.Rotation = next.Rotation
	}
	w.logger.Info("configuration reloaded", "initiator", initiator)
	w.auditConfig(initiator, nil)
	if !rotate {
		return
	}
	req := rotator.RotateRequest{Trigger: rotator.TriggerConfig, Actor: audit.Actor{Initiator: initiator}, Reason: "configuration changed"}
	if _, err := w.to.rotateAll(ctx, req); err != nil {
		w.logger.Warn("rotation after the configuration change failed", "err", err)
	}
}

// auditConfig records a configuration change applied, or refused with err, so that an
// operator sees a refusal and its file:line: field without reading the log.
func (w *watcher) auditConfig(initiator string, err error) {
	rec := audit.ConfigChange{Path: w.cur.path, Actor: audit.Actor{Initiator: initiator}, Result: audit.ConfigApplied}
	if err != nil {
		rec.Result, rec.Error = audit.ConfigRefused, err.Error()
	}
	if err := w.to.appendAudit(rec); err != nil {
		w.logger.Error("audit configuration change", "err", err)
	}
}

// sameFixed reports whether next and cur agree on every setting applied only at start:
// all but the rotation policy, the routes and the services.
func sameFixed(next, cur *Config) bool {
	other := *next
	other.Rotation = cur.Rotation
	other.Routes, other.routes, other.Services, other.services = cur.Routes, cur.routes, cur.Services, cur.services
	return reflect.DeepEqual(&other, cur)
}

// reloadPolicy applies a changed authorization policy file and audits the outcome; an
// invalid one is refused and the one in force stays.
func (w *watcher) reloadPolicy(initiator string) {
	rec := audit.Policy{Path: w.cur.Policy}
	a, err := LoadPolicy(w.cur.Policy)
	if err != nil {
		rec.Result, rec.Error, rec.Version = "refused", err.Error(), w.policyVersion
		w.logger.Error("policy refused; the one in force stays", "err", err)
	} else {
		rec.Result = "applied"
		rec.Version, rec.Closed = w.to.setPolicy(a)
		w.policyVersion = rec.Version
		w.logger.Info("policy reloaded", "initiator", initiator, "version", rec.Version, "closed", rec.Closed)
	}
	if err := w.to.appendAudit(rec); err != nil {
		w.logger.Error("audit policy change", "err", err)
	}
}

// reloadBundle makes the root file's anchors part of the trust bundle when it changed
// and is valid (bundle.go). The rotator audits each change of anchors and each bundle
// it refuses; a file that does not load is audited here.
func (w *watcher) reloadBundle() {
	next, err := x509bundle.Load(w.cur.id.TrustDomain(), w.cur.CA.Root)
	if err != nil {
		w.logger.Error("trust bundle refused; the one in force stays", "file", w.cur.CA.Root, "err", err)
		if err := w.to.bundleRefused(err); err != nil {
			w.logger.Error("audit trust bundle change", "err", err)
		}
		return
	}
	changed, err := w.to.setBundle(next)
	if err != nil {
		w.logger.Error("trust bundle refused; the one in force stays", "file", w.cur.CA.Root, "err", err)
		return
	}
	if changed {
		w.logger.Info("trust bundle reloaded", "file", w.cur.CA.Root, "authorities", len(next.X509Authorities()))
	}
}

// startPolicy loads the policy file named in the configuration, if any, and audits it as
// version 1.
func startPolicy(path string, log *audit.Log) (*policy.Authz, error) {
	if path == "" {
		return nil, nil
	}
	a, err := LoadPolicy(path)
	if err != nil {
		return nil, err
	}
	return a, log.Append(audit.Policy{Path: path, Version: 1, Result: "applied"})
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
