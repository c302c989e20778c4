package node

import (
	"runtime/debug"
	"strings"

	"github.com/agentmesh/agentmesh/meshapi"
	"github.com/agentmesh/agentmesh/rotator"
)

// maxStatusText bounds each free-text field of the status a heartbeat reports (why not
// ready, an identity's last error): a join of every agent's error can grow without
// bound, and the CA's fleet view shows a line, not a log.
const maxStatusText = 1024

// kicker asks the heartbeat to report this proxy's status at once.
type kicker interface{ Kick() }

// onRotate is every rotator's OnRotate: the bundle in force is recomputed, and the CA's
// fleet view learns of the new key at once rather than a heartbeat later. Neither
// blocks the rotation.
func (a *applier) onRotate() {
	a.anchor.onRotate()
	a.kickHeartbeat()
}

// kickHeartbeat asks for a heartbeat now, when there is one.
func (a *applier) kickHeartbeat() {
	if a.heartbeat != nil {
		a.heartbeat.Kick()
	}
}

// proxyStatus is this proxy's status for its heartbeat: readiness as /readyz computes
// it, and every identity held.
func (n *node) proxyStatus() *meshapi.ProxyStatus {
	return newProxyStatus(n.version, proxyReadiness(n.ready, n.px), n.identities())
}

// newProxyStatus converts the identities' state (the host's first) and the proxy's
// readiness (nil: ready) to what a heartbeat reports, keeping the first
// meshapi.MaxProxyStatusIdentities identities.
func newProxyStatus(version string, notReady error, ids []rotator.Status) *meshapi.ProxyStatus {
	st := &meshapi.ProxyStatus{Version: version, Ready: notReady == nil}
	if notReady != nil {
		st.NotReady = clip(notReady.Error())
	}
	ids = ids[:min(len(ids), meshapi.MaxProxyStatusIdentities)]
	st.Identities = make([]meshapi.IdentityStatus, 0, len(ids))
	for _, id := range ids {
		st.Identities = append(st.Identities, identityStatus(id))
	}
	return st
}

// identityStatus lists the keys of one identity in the order rotator.Status gives them:
// the current one, those in overlap, then retired ones, newest first.
func identityStatus(s rotator.Status) meshapi.IdentityStatus {
	out := meshapi.IdentityStatus{SPIFFEID: s.SPIFFEID, Ready: s.Ready, Error: clip(s.Error), RenewAt: s.RenewAt,
		Keys: make([]meshapi.KeyStatus, 0, 1+len(s.Overlap)+len(s.Retired))}
	if s.Current != nil {
		out.Keys = append(out.Keys, keyStatus(*s.Current))
	}
	for _, group := range [][]rotator.CredentialStatus{s.Overlap, s.Retired} {
		for _, c := range group {
			out.Keys = append(out.Keys, keyStatus(c))
		}
	}
	return out
}

func keyStatus(c rotator.CredentialStatus) meshapi.KeyStatus {
	return meshapi.KeyStatus{Version: c.Version, Serial: c.Serial, State: string(c.State), Cause: string(c.Cause),
		Since: c.Since, NotBefore: c.NotBefore, NotAfter: c.NotAfter}
}

// clip cuts s to maxStatusText bytes, and a character cut in two with it.
func clip(s string) string {
	if len(s) > maxStatusText {
		return strings.ToValidUTF8(s[:maxStatusText], "")
	}
	return s
}

// buildVersion names the build from its module information: the module's version (a
// tag, or "(devel)" for a build from a checkout), with the VCS revision and "+dirty"
// for uncommitted changes when the build recorded them.
func buildVersion(bi *debug.BuildInfo, ok bool) string {
	if !ok {
		return "unknown"
	}
	v := bi.Main.Version
	if v == "" {
		v = "(devel)"
	}
	var rev, dirty string
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			rev = s.Value[:min(len(s.Value), 12)]
		case "vcs.modified":
			if s.Value == "true" {
				dirty = "+dirty"
			}
		default:
			// Other build settings (flags, GOOS, ...) do not name the build.
		}
	}
	if rev != "" {
		v += " " + rev + dirty
	}
	return v
}
