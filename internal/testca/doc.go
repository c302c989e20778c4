// Package testca is an in-memory SPIFFE certificate authority for unit tests.
// It owns a root and an intermediate (real ECDSA P-256 keys, real X.509
// certificates) and issues X509-SVIDs from them, including deliberately bad
// ones (expired, two URI SANs, chosen serials) so tests can exercise refusals.
// It also provides [Credentials], a hot-swappable holder of an SVID and the
// CA's bundle with the method set the proxy reads on every handshake.
//
// It does not persist anything, speak any CA protocol, or check what it is
// asked to issue: it is a test helper, never imported by non-test code
// outside internal test utilities. Every helper takes a testing.TB and fails
// the test instead of returning an error.
package testca
