// Package authority is the certificate authority proper of agentmesh's CA: it embeds
// step-ca (github.com/smallstep/certificates, its authority and api packages on our own
// listener) with the root, intermediate and provisioner keys generated and used inside a
// PKCS#11 token (go.step.sm/crypto/kms/pkcs11; by default a SoftHSM2 token created in the
// state directory by the hsm package), mints the one-time bootstrap tokens, serves
// step-ca's API over HTTPS and writes the audit record of every issuance. It does not
// decide who may hold an identity: revocation, registration entries, lineages, the mesh
// directory and the admin socket belong to package ca, which composes an Authority with
// them and hands it its issuance policy (Policy: the database and the checks step-ca
// applies to /sign, /renew and /rekey). It is named after step-ca's own authority
// package, which it wraps; importers of both alias step-ca's.
//
// # Life cycle
//
// Open opens the token and loads or creates the hierarchy; Listen binds the HTTPS
// listener and names the endpoint (the first DNS name is the tokens' audience); Start
// builds step-ca's authority and issues the TLS serving certificate; Serve serves an
// http.Server with TLSConfig and BaseContext; RenewServingCert keeps the serving
// certificate fresh; Close releases all of it (step-ca's authority, once started,
// closes the KMS and the database).
//
// # Keys and certificates
//
// The root is self-signed for ten years with the trust domain's URI SAN and critical
// name constraints permitting only URIs in the trust domain; the intermediate carries
// the same constraints, cannot sign CAs, ends with the root and signs every SVID. Both
// are written atomically to StateDir/root.crt and StateDir/intermediate.crt; their keys
// (ECDSA P-256, never extractable) stay in the token, where a first start interrupted
// after key generation finds them again.
//
// # Generations and rotation
//
// The keys and certificates come in generations (Generation). Generation 1 is the
// hierarchy above (key labels agentmesh-root and agentmesh-intermediate); a rotation of
// the CA's trust anchors, which package ca coordinates, prepares the next (Prepare: new
// keys generated in the token, labelled agentmesh-intermediate-N and, for a root
// rotation, agentmesh-root-N, and their certificates; a new root is cross-signed with
// the old one both ways), makes it the active one (Activate; Revert undoes it) and
// finally deletes the keys of the one it replaced from the token (DestroyPrevious; an
// abort uses DiscardNext). Which generations are active, next and previous is
// StateDir/pki.json, their certificates gen-N-*.crt beside it; root.crt and
// intermediate.crt hold the active generation's. Each operation persists before it
// publishes and is idempotent, so a CA killed during one re-runs it after a restart.
//
// step-ca issues through a signer function that reads the active generation, so
// SVIDs, renewals, CRLs and the serving certificate follow Activate at once. Client
// certificates must chain to an anchor (SetAnchors; by default the roots of every
// generation held) through the intermediate of any generation held; /roots,
// /roots.pem and /root/{sha} serve the anchors, /intermediates the generations'
// intermediates. Probe issues a test chain under a generation, which proxies verify
// to prove they trust its root.
//
// One JWK provisioner, "agentmesh", whose key is the provisioner key in the token,
// signs bootstrap tokens (Authority.Token). Its template makes X509-SVIDs: exactly the
// token's one URI SAN, empty subject, digitalSignature, serverAuth+clientAuth, not a
// CA; its claims make the SVID lifetime the default and maximum lifetime and allow
// renewal only before expiry; Config.Backdate is step-ca's backdate. Token IDs are
// recorded as used by a hash, never in plain text (UseToken).
//
// # HTTPS
//
// The API is step-ca's own (/roots, /sign, /renew, /rekey, /revoke, /crl, /health, at
// / and /1.0; Route), so the step CLI works against it. Its TLS certificate is issued
// by the authority and renewed at two thirds of its life, failures retried with an
// exponential backoff (github.com/cenkalti/backoff/v5) from 1s to 1m. Client
// certificates are requested, not required: every request that presents one must
// chain to an anchor for client authentication at that moment
// (RequireValidClientCert), or it gets a 401 (an expired SVID is thus a permanent
// error telling the rotator to re-enrol, not a handshake failure).
//
// # Issuance audit
//
// AuditIssuance wraps step-ca's handlers: every enrolment, renewal and rekey, granted
// or refused, is one audit.Issuance record naming its caller, the refusals of the
// client-certificate check included. A record never holds a token: it is named by the
// SHA-256 of its ID (TokenRecordID).
//
// # SoftHSM and the process environment
//
// SoftHSM2 reads its configuration from the SOFTHSM2_CONF environment variable, once,
// when the module is initialised (C_Initialize). Open therefore has hsm.SoftHSM set
// SOFTHSM2_CONF before the first PKCS#11 call, and a process can serve the embedded
// token of one state directory at a time (hsm.ErrSoftHSMInUse). A hardware token named
// by Config.KMS has no such limit.
//
// The package needs cgo: the PKCS#11 KMS is compiled only with cgo (hsm imports it).
package authority
