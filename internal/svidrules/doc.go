// Package svidrules holds the certificate rules that an X509-SVID presented by a peer
// must meet beyond go-spiffe's x509svid.Verify, which checks the chain to the bundle,
// the URI SAN and the CA flag but not what the leaf may be used for, how long the
// chain is, or how long the SPIFFE ID is. The proxy applies them to every tunnel
// handshake and the CA to every client certificate it is presented, so both refuse
// the same certificates for the same typed reasons.
//
// It checks only the certificates' fields; it verifies no signature and knows no
// trust bundle beyond the anchors it is handed.
package svidrules
