// Package ca is agentmesh's certificate authority: it composes the step-ca embedding
// with its keys in a PKCS#11 token (package ca/authority: keys, certificates, tokens,
// step-ca's HTTPS API, the issuance audit) with the state that decides who may hold an
// identity, and issues short-lived SPIFFE X509-SVIDs. It also
// serves the admin unix socket behind `agentmesh token`; and it keeps the mesh directory
// (which proxy lives at which address) and serves the mesh API (meshapi.Mount, with the
// Server as its meshapi.Backend; the wire types and their validation are meshapi's,
// the proxies' side is meshclient); and it revokes identities and certificates,
// publishing a signed, versioned deny-list with the directory, and announces fleet
// rotations (every proxy renews now) the same way; and it keeps the registration
// entries saying which proxy holds which agent identity for which local uid. It does
// not decide when to renew, verify what it is given back, keep workload keys, attest
// processes, route or dial peers, or enforce the deny-list or authorization policy on
// connections: those belong to the rotator and the proxy.
//
// # Server
//
// New prepares everything on disk and in the token and binds the HTTPS listener and
// the admin socket; Run builds step-ca's authority and serves until its context is done.
// The HTTPS API is step-ca's own, served by ca/authority (see there for the serving
// certificate and client certificate checks), plus the mesh API under /mesh/v1.
//
// A Server is composed of parts with one owner each, each guarding its own state: the
// authority (ca/authority.Authority), step-ca's database with the revocation and
// lineage stores (authDB), the mesh registry (registry), and the deny-list, fleet
// rotation, registration entries and address claims in force (parts.go), each an
// immutable value behind an atomic pointer whose writers serialise on the part's own
// mutex. The Server's own mutex guards only its run state.
//
// # Mesh directory
//
// Under /mesh/v1 on the same HTTPS API, proxies register (POST /mesh/v1/register,
// repeated as a heartbeat) and long-poll the directory (GET /mesh/v1/directory?since=V).
// Every mesh request must present an X509-SVID of the trust domain, verified at request
// time; the registered ID is the certificate's, never the body's, and only /host/ IDs
// may register. An address belongs to at most one live entry, and a host may claim only
// the addresses of its address claim (meshapi.HostClaim): set by an operator on the admin socket
// (Server.SetHostClaim, RegisterHost), or learnt once at its first registration from the
// address its request came from, then fixed; claims never overlap, are written to
// StateDir/claims.json before they take effect, and every refusal is audited
// (audit.AddressClaim) and counted. Entries not refreshed within Config.DirectoryTTL
// are dropped. The registry is in memory only: proxies
// re-register within a heartbeat after a restart, and versions are seeded from the
// clock so that they still increase. The admin socket serves GET /directory. See
// docs/directory.md.
//
// # Revocation
//
// Server.Revoke (the admin socket's POST /revoke, RequestRevoke; or POST
// /mesh/v1/revoke for /admin/ SVIDs, meshclient.RevokeRemote) revokes an identity or one
// certificate. Over mTLS any other SVID may revoke a serial of its own identity, and
// nothing else: a proxy that rotated away from a compromised key revokes the old
// certificate with its new one. It is recorded in the database first, and from then on the CA refuses
// bootstrap tokens, issuance, renewal and registration for it. Then the next version of
// the deny-list (meshapi.DenyList: versioned, signed by the intermediate's key in the
// HSM, see meshapi.VerifyDenyList and NextDenyList) is written to StateDir/denylist.json and published
// in the directory document and at GET /mesh/v1/revocations, waking every long-poll;
// last, step-ca revokes each serial, which puts it in the CRL. Every request is audited
// (Config.Audit). step-ca's own /revoke (step ca revoke --cert --key) goes the same way.
//
// An identity's revocation covers its certificates issued before it: the list entry
// carries a NotBefore cutoff, made exact by the CA refusing any certificate whose
// NotBefore is later than its issue time minus the backdate, or before the cutoff of a
// revoked identity. Server.Reinstate (POST /reinstate, RequestReinstate; POST
// /mesh/v1/reinstate for /admin/ SVIDs, meshclient.ReinstateRemote) lets the identity enrol again;
// its older certificates stay refused. Entries whose certificates have all expired are
// dropped from the list, which says so (meshapi.DenyList.ExpiredThrough), so the list stays
// bounded by the live certificates. See docs/directory.md.
//
// # Registration entries
//
// An entry (meshapi.Entry) names an agent identity (spiffe://TD/agent/NAME), the one proxy that may
// hold it (its host's, spiffe://TD/host/H), the uid of the agent's processes on that
// host and optionally the port the agent listens on. Operators change them on the admin
// socket (Server.RegisterEntry and UnregisterEntry; POST and DELETE /entries,
// RegisterEntry, UnregisterEntry, ListEntries): an ID is registered once, and a uid or
// a port of a host belongs to one agent (409 otherwise). Entries are written to
// StateDir/entries.json before they take effect, published in the directory document
// (the version moves, waking every long-poll; meshapi.State.Entries and AgentsAt, which
// the proxy diffs against the state it applied before), and every change is audited. The proxy of the entry's
// host, and no other, gets one-time bootstrap tokens for the agent over the mesh API
// (POST /mesh/v1/agents/token, meshclient.AgentTokens), each grant or refusal audited.
// An /agent/ SVID is renewed only while its entry exists, so unregistering stops the
// agent's credentials at their next renewal, whoever attempts it.
//
// # Lineage
//
// Per identity the CA keeps its lineage (lineage.go, docs/lineage.md): every unexpired
// certificate it issued, the host it was issued to and the serial a renewal replaced.
// /renew and /rekey are allowed only to the newest certificate or the one it replaced
// (overlap); anything else is a fork of a stolen key and is refused, audited
// (audit.Lineage) and counted (Config.Registerer). Agent SVIDs never renew themselves: their
// host re-enrols them with a token the CA grants only to the host the entry names, and
// the certificate records that host. A revocation with meshapi.RevokeRequest.Except revokes the
// whole lineage but that certificate (rotate --compromised); registering an agent to
// another host revokes the certificates issued to the previous one.
//
// # Fleet rotation
//
// Server.RotateFleet (the admin socket's POST /rotate, RequestFleetRotation) records
// a meshapi.FleetRotation with a new ID (StateDir/fleet-rotation.json, so IDs keep increasing
// across restarts), publishes it in the directory document, waking every long-poll,
// and audits it. Each proxy's meshclient.Watch publishes it in its mesh state, and the
// proxy rotates once per new ID requested after it started (meshapi.FleetDue); its
// rotator then renews with a new key. The CA rotates nothing itself. The document also
// carries the trust bundle (the CA's roots, meshapi.BundleDocument).
//
// # Rotation of the trust anchors
//
// Server.StartAnchorRotation (POST /rotation on the admin socket, StartRotation;
// `agentmesh ca rotate intermediate|root`) replaces the intermediate, or the root and
// the intermediate, through the phases of meshapi.AnchorPhase. anchorstate.go is the
// pure record and its gates, anchor.go persists it (StateDir/rotation.json, before
// each phase's effects run) and serves the operator's requests, anchoreffects.go runs
// each phase's effects (ca/authority's generations, the trust bundle the CA trusts and
// publishes, the step in the directory, the deny-list) and the driver that advances on
// acknowledgements (POST /mesh/v1/rotation/ack) and a one-second tick. Every effect is
// idempotent: a CA killed in any phase re-runs it before serving again.
//
// # Witness of the audit logs
//
// Every proxy sends its audit log's signed checkpoints to POST
// /mesh/v1/audit/checkpoint (witnessapi.go) with a consistency proof from the one the
// CA holds. The CA binds the host's audit key to its origin (meshapi.AuditOrigin) at
// the first checkpoint, cosigns each one that extends the one it holds with its own
// audit key (agentmesh-audit in the token: never a TLS or issuing key), and keeps the
// latest, with a bounded history, per origin in StateDir/witness/ (witness.go, written
// before the answer). A checkpoint that does not extend it is refused (403
// meshapi.CodeAuditInconsistent), audited and counted, and the log's state stays
// "inconsistent" until `agentmesh ca audit forget ORIGIN`; one from a size the CA does
// not hold is answered 409 with the one it holds. A log without a checkpoint for
// Config.WitnessStaleAfter is "stale". The CA's own audit log (Config.OpenAuditLog)
// signs checkpoints with the same key; every answer carries its latest with a proof
// from the one that proxy last cosigned, and the proxies' cosignatures come back with
// their next checkpoints (witnessca.go), so the CA is not its own witness. GET
// /audit/v1/checkpoints?origin= serves what the witness holds, to anyone: it is all
// signed. Metrics: agentmesh_ca_audit_* (witnessmetrics.go); alert rules:
// deploy/prometheus/alerts.yaml.
//
// # Status page
//
// Each registration may carry the proxy's own status (meshapi.ProxyStatus); the CA
// validates and bounds it (fleetstatus.go), keeps the latest per host out of the
// directory document, and accumulates a per-identity key timeline from successive
// reports. GET /status/ renders the fleet, identities, key timeline, revocations,
// rotation of the trust anchors and witness (statuspage.go, statuspagedoc.go, assets
// in statuspage/ embedded); /status/api is the document its script polls. Only SVIDs
// named by Config.AdminIDs open it on the HTTPS port (else 403, audit.StatusAccess,
// agentmesh_ca_status_refused_total); Config.StatusListen serves it on loopback.
// docs/status-page.md.
//
// Bootstrap tokens (Server.Token, RequestToken) and the SVID profile are
// ca/authority's; step-ca's backdate is min(1m, lifetime/10). Token IDs are recorded as
// used in the bbolt database (StateDir/db) by a hash, never in plain text.
//
// # State directory
//
//	root.crt, intermediate.crt   public certificates (0644), written atomically
//	db/ca.db                     step-ca's database (bbolt): issued and revoked
//	                             certificates, used token IDs, the CRL; and ours:
//	                             revocations, live serials by SPIFFE ID,
//	                             lineages
//	denylist.json                the signed deny-list in force (0644), written atomically
//	fleet-rotation.json          the latest fleet rotation (0644), written atomically
//	entries.json                 the registration entries (0600), written atomically
//	claims.json                  the hosts' address claims (0600), written atomically
//	witness/ORIGIN.json          per witnessed audit log (origin path-escaped): its
//	                             key, latest cosigned checkpoint, history, state,
//	                             and the CA checkpoint its host cosigned (0600),
//	                             written atomically
//	audit.log*                   the CA's own audit log (ProcessConfig.AuditPath),
//	                             its checkpoints in audit.log.checkpoint
//	rotation.json                the rotation of the trust anchors running, or the
//	                             last one (0644), written atomically
//	softhsm2.conf, tokens/       the embedded SoftHSM2 token (only without Config.KMS),
//	softhsm2.lock                prepared by hsm.SoftHSM
//	(no hsm.pin)                 its random user PIN is Config.PINFile, outside the
//	                             state directory (default STATE.pin beside it); a
//	                             hsm.pin of an earlier version is moved there
//	admin.sock                   admin API: POST /token, GET /directory, POST /revoke,
//	                             POST /reinstate, POST /rotate, POST, DELETE and GET
//	                             /entries and /hosts, GET and POST /rotation, POST
//	                             /rotation/abort and /rotation/exclude, GET
//	                             /audit/witness, POST /audit/forget (0600;
//	                             root or the CA's uid, via SO_PEERCRED)
//	lock                         flock held while a Server owns the directory
//
// A process can serve the embedded SoftHSM2 token of one state directory at a time
// (ErrSoftHSMInUse; see ca/authority).
//
// The package needs cgo: the PKCS#11 KMS is compiled only with cgo (hsm imports it).
package ca
