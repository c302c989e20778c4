// Package proxy owns agentmesh's data path: the listeners agents and peer
// proxies connect to, outbound capture (transparent, from an iptables
// REDIRECT with SO_ORIGINAL_DST, and explicit, as a SOCKS5 and HTTP proxy;
// docs/capture.md), the mTLS tunnels between proxies (TLS 1.3, SPIFFE
// X509-SVIDs on both sides, the wire formats in docs/tunnel.md), peer
// verification and authorization in VerifyConnection, splicing bytes with
// half-close, the registry of live connections (CloseWhere, for revocation
// and drain), and one audit record per handshake (or capture decision) and
// per closed connection (for streams of pooled connections: per refused
// stream, and per closed one with Config.StreamAudit). Refusals before
// authentication are aggregated instead, one record per source address and
// interval, and connections and handshakes in flight are capped
// (Config.MaxConnections, MaxHandshakes; docs/limits.md), so unauthenticated
// peers cannot make the proxy write, hold or compute without bound. A
// connection carries traffic only once its handshake record is durable
// (Config.AuditAck), and none is served while the audit log fails.
//
// It does not obtain, renew or store credentials: it reads the current SVID
// and trust bundles from a Credentials (the rotator) on every handshake, so a
// rotation needs no call into the proxy. It does not parse policy files (a
// Config lists Routes and Services, and takes a parsed policy.Authz), does
// not know by itself which proxy lives where (a Directory, fed from the
// registry, tells it), and does not install iptables rules (`agentmesh
// redirect` does; Config.Mark lets them exclude the proxy's own traffic).
//
// Identities and authorization: with Config.Agents, each captured
// connection is attested to the local agent registered for the uid that
// owns the agent's socket (found in the kernel's socket table) and its
// tunnel presents that agent's SVID; other processes get the host identity
// or are refused (Config.Unattested). Inbound tunnels always present the
// host SVID. The authorization policy (Config.Policy, SetPolicy) decides
// outbound which local identity may call which remote agent or proxy, and
// inbound which peers may reach which local ports and agents, alongside the
// Services; a new policy applies to new handshakes, resumed ones and streams
// at once and closes the live connections it no longer allows. SetServices
// replaces the Services the same way, and SetRoutes the routes: new ones
// listen at once, unchanged ones keep their listeners and connections, and a
// removed one's connections are drained after a grace (SetDrainGrace).
//
// It enforces revocation but does not fetch it: SetDenyList takes each new
// deny-list (the directory client verifies and feeds it), refuses denied
// peers in VerifyConnection, closes live connections that a denied
// credential authenticated (the peer's or our own) and replaces the
// session-ticket keys; Config.Revocation lets the caller fail handshakes
// closed while the list may be stale. It does not decide when a credential's
// overlap ends either: the rotator calls Drain, which closes the connections
// still on that credential after a grace. The session-ticket keys are the
// proxy's own: versioned, with NIST SP 800-57 states audited as
// key_state records (TicketKeys, ResetTicketKeys).
//
// Three tunnel transports carry agent connections, chosen per peer
// (Config.Transports, Peer.Transports, Route.Transport): "tls", one TLS
// connection per agent connection, whose sessions resume with ticket keys
// the proxy owns and rotates (Config.TicketKeyPeriod, DisableResumption);
// "h2", one HTTP/2 CONNECT stream per agent connection on long-lived,
// pooled mTLS connections on the same TCP port; and "quic", one QUIC stream
// per agent connection on pooled quic-go connections on the UDP port of the
// same number. A pooled connection makes one handshake for many agent
// connections and presents the certificate current when it was dialed: a
// rotation moves new streams to a new connection, and every stream is a
// registered connection, so revocation and drain reach streams and pooled
// connections alike. A pooled connection takes new streams only while both
// certificates that authenticated it are valid and it is younger than
// Config.PoolMaxLifetime, then drains; the receiving side refuses a stream
// on a connection whose certificates expired, whatever the peer does, and
// both sides cap concurrent streams and close idle connections
// (poollimits.go). Every handshake and every stream decision goes through
// the same verification and policy, resumed sessions included
// (docs/tunnel.md).
package proxy
