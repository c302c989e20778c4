// Package node owns the proxy process (`agentmesh proxy`): its configuration file,
// decoded once into Config by LoadConfig (unknown fields refused, every error a
// *FileError naming file, line and field), and Run, which builds the components in
// dependency order (audit log, host rotator, agents' supervisor, mesh client, proxy,
// admin port, control socket) and runs them under one errgroup.
//
// While it runs, node applies each new mesh state and each configuration change as a
// diff, in one place (applier). The mesh client's watch publishes states and signals;
// followMesh reads each, diffStates computes what it changes from the one applied
// before (pure), and applyDiff applies it: a newer deny-list reaches every rotator and
// the proxy and is audited with the connections it closed, the registration entries
// become the identities held (one rotator per agent registered to this host, started
// and stopped as entries come and go), the CA's published roots join the root file's
// in the bundle in force (bundle.go: less the roots the CA withdrew, plus every anchor
// an SVID held still needs, recomputed after every renewal; the mesh client verifies
// the CA with it too), a fleet command rotates every identity, once per ID requested after
// start, and a step of a rotation of the CA's anchors is converged to and acknowledged
// (anchor.go: check the step's bundle is in force, verify its probe, renew every SVID
// not from its issuer, acknowledge; audited). The watcher re-reads the configuration, CA root and policy
// files on change and on SIGHUP: the rotation policy, the trust bundle and the authorization
// policy apply live; routes and services go through applyListeners; an invalid file is
// refused (policy files are audited) and the last good configuration stays in force.
// The compromise flow (rotation.now) rotates, drops every session-ticket key and asks
// the CA to revoke the identity's lineage but the new certificate.
//
// The audit log signs checkpoints with an audit key that is no TLS key: in the proxy's
// token under its own label prefix, named in STATE/audit-key.ref (audit.go), or in
// memory with keys: memory. The CA witnesses them through the mesh client, and while the
// log is idle the proxy checks in with its latest checkpoint every interval. Each answer
// carries the CA's own latest checkpoint, which the proxy checks against the one it
// cosigned before (the CA's key pinned at first sight, STATE/ca-audit.json), cosigns and
// sends back: an inconsistent CA log is refused for good, recorded (CAAuditRefusal) and
// counted (auditca.go).
//
// node does not enforce anything itself: interception, tunnels and policy decisions are
// package proxy's, credential lifecycles package rotator's. Its use of the mesh API's
// client is confined to mesh.go, behind interfaces node declares (meshDirectory,
// lineageRevoker, anchorAcker), so the client can change without touching the rest.
package node
