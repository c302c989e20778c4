package node

import (
	"runtime/debug"
	"strings"

	"github.com/agentmesh/agentmesh/meshapi"
	"github.com/agentmesh/agentmesh/rotator"
)

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
	st := &meshapi.ProxyStatus{Version: clip(version, meshapi.MaxStatusVersion), Ready: notReady == nil}
	if notReady != nil {
		st.NotReady = clip(notReady.Error(), meshapi.MaxStatusText)
	}
	ids = ids[:min(len(ids), meshapi.MaxProxyStatusIdentities)]
	st.Identities = make([]meshapi.IdentityStatus, 0, len(ids))
	for _, id := range ids {
		st.Identities = append(st.Identities, identityStatus(id))
	}
	return st
}

// identityStatus lists the keys of one identity in the order rotator.Status gives them,
// the first meshapi.MaxStatusKeys: the current one, those in overlap, then retired
// ones, newest first.
func identityStatus(s rotator.Status) meshapi.IdentityStatus {
	var keys []rotator.CredentialStatus
	if s.Current != nil {
		keys = append(keys, *s.Current)
	}
	keys = append(append(keys, s.Overlap...), s.Retired...)
	keys = keys[:min(len(keys), meshapi.MaxStatusKeys)]
	out := meshapi.IdentityStatus{SPIFFEID: s.SPIFFEID, Ready: s.Ready, Error: clip(s.Error, meshapi.MaxStatusText),
		RenewAt: s.RenewAt, Keys: make([]meshapi.KeyStatus, 0, len(keys))}
	for _, c := range keys {
		out.Keys = append(out.Keys, meshapi.KeyStatus{Version: c.Version, Serial: c.Serial, State: string(c.State),
			Cause: string(c.Cause), Since: c.Since, NotBefore: c.NotBefore, NotAfter: c.NotAfter})
	}
	return out
}

// clip makes s printable ASCII of at most n bytes, as the CA keeps it: the lines of a
// joined error become "; "-separated, other bytes outside printable ASCII "?".
func clip(s string, n int) string {
	var b strings.Builder
	for i := 0; i < len(s) && b.Len() < n; i++ {
		switch c := s[i]; {
		case c == '\n':
			b.WriteString("; ")
		case c < 0x20 || c > 0x7e:
			b.WriteByte('?')
		default:
			b.WriteByte(c)
		}
	}
	return b.String()[:min(b.Len(), n)]
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
