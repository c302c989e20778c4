// Package proxy owns agentmesh's data path: the listeners agents and peer
// proxies connect to, the mTLS tunnel between proxies (TLS 1.3, SPIFFE
// X509-SVIDs on both sides, the wire format in docs/tunnel.md), peer
// verification and authorization in VerifyConnection, splicing bytes with
// half-close, the registry of live connections (CloseWhere, for revocation
// and drain), and one audit record per handshake and per closed connection.
//
// It does not obtain, renew or store credentials: it reads the current SVID
// and trust bundles from a Credentials (the rotator) on every handshake, so a
// rotation needs no call into the proxy. It does not parse policy files (a
// Config lists Routes and Services), and it does not capture traffic
// transparently yet: Routes are explicit listeners.
//
// Only the "tls" transport exists so far: one TLS connection per proxied
// connection, without session resumption.
package proxy
