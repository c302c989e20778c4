// Package proxy owns agentmesh's data path: the listeners agents and peer
// proxies connect to, outbound capture (transparent, from an iptables
// REDIRECT with SO_ORIGINAL_DST, and explicit, as a SOCKS5 and HTTP proxy;
// docs/capture.md), the mTLS tunnel between proxies (TLS 1.3, SPIFFE
// X509-SVIDs on both sides, the wire format in docs/tunnel.md), peer
// verification and authorization in VerifyConnection, splicing bytes with
// half-close, the registry of live connections (CloseWhere, for revocation
// and drain), and one audit record per handshake (or capture decision) and
// per closed connection.
//
// It does not obtain, renew or store credentials: it reads the current SVID
// and trust bundles from a Credentials (the rotator) on every handshake, so a
// rotation needs no call into the proxy. It does not parse policy files (a
// Config lists Routes and Services), does not know by itself which proxy
// lives where (a Directory, fed from the registry, tells it), and does not
// install iptables rules (`agentmesh redirect` does; Config.Mark lets them
// exclude the proxy's own traffic).
//
// Only the "tls" transport exists so far: one TLS connection per proxied
// connection, without session resumption.
package proxy
