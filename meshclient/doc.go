// Package meshclient is the proxy side of the mesh API of agentmesh ca. Each type does
// one job, and each request presents the proxy's current SVID (Config.Certificate) on
// a new connection, through Config.Control, never through HTTP(S)_PROXY:
//
//   - Watch long-polls the directory and polls the deny-list as a fallback; it
//     publishes each new *meshapi.State behind an atomic pointer (State) and signals
//     Updated; nothing else. It verifies every deny-list (signature, trust domain,
//     order) before it joins a State, audits (Config.Audit) and counts
//     (agentmesh_revocation_*) refused ones, and reports how fresh the deny-list is
//     (Confirmed, CheckFresh), so that a proxy can fail closed. What a new State
//     changes (entries, deny-list, fleet rotation) is for its reader to diff and apply.
//   - Heartbeat registers the proxy's addresses, tunnel port and transports, and again
//     every Config.Heartbeat.
//   - AgentTokens asks for the bootstrap token of an agent registered to this host.
//   - Client enrols (bootstrap token) and renews (mTLS rekey) SVIDs: the rotator's
//     Issuer.
//   - RevokeRemote and ReinstateRemote send an operator's request over mTLS.
//   - Watch.AckAnchor acknowledges a step of a rotation of the CA's trust anchors
//     with the host SVID; a 409 answer wraps ErrStaleStep.
//   - AuditWitness is the CA as the witness of the proxy's audit log (audit.Witness):
//     it sends each checkpoint and returns it cosigned, a 409 as an
//     *audit.WitnessConflict, a refusal as inconsistent wrapping audit.ErrInconsistent;
//     the CA's own checkpoint each answer carries goes to a CALog, whose cosignature
//     the next request carries back (docs/audit.md).
//
// Every client verifies the CA's serving certificate, and the Watch every deny-list,
// with Anchors when set (Config.Anchors, ClientConfig.Anchors): the proxy replaces them
// with its bundle in force, so that it still reaches a CA that serves under a new root.
// Without them, Roots are fixed at construction.
//
// Member composes the Watch, the Heartbeat and AgentTokens for a proxy that runs them
// all. Failures are retried with capped exponential backoff and full jitter
// (github.com/cenkalti/backoff/v5), never longer than a heartbeat, and never end Run.
// The package imports meshapi and audit, never ca, proxy or rotator. See
// docs/directory.md.
package meshclient
