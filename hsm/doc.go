// Package hsm owns agentmesh's use of PKCS#11 tokens: it prepares the embedded SoftHSM2
// token (configuration, token directory, PIN file, and the process-wide SOFTHSM2_CONF
// it depends on), opens tokens for go.step.sm/crypto/kms/pkcs11 (OpenKMS, for step-ca's
// authority), and provides Keys, a key store for workload keys that are generated,
// used and deleted inside a token. It does not decide when keys rotate, record their
// lifecycle states, issue or hold certificates, or keep keys in memory: those belong to
// the rotator (which declares the KeyStore interface Keys satisfies), the CA, and the
// rotator's in-memory default store. It imports nothing else of agentmesh, so the CA
// and the proxy share it.
//
// # SoftHSM and the process environment
//
// SoftHSM2 reads its configuration from the SOFTHSM2_CONF environment variable, when
// the module is initialised (C_Initialize), and the module stays initialised while any
// context in the process uses it. The SoftHSM function therefore sets SOFTHSM2_CONF
// before the first PKCS#11 call, and a process serves the tokens of one SoftHSM
// directory at a time (ErrSoftHSMInUse). Several tokens in that directory, and several
// users of each (the CA's KMS and a Keys, say), work together. A token reached through
// another module (a hardware HSM named by its URI) has no such limit. Within the
// process, this package serialises the calls that create, delete or search token
// objects, because SoftHSM 2.6's object store fails at random under concurrent writes;
// signing runs in parallel.
//
// # Workload keys
//
// Keys.NewKey generates an EC P-256 key pair in the token. The private object is
// CKA_SENSITIVE and not CKA_EXTRACTABLE from its creation, which PKCS#11 makes one-way:
// its value can never be read out of the token, and every signature (the CSR, each TLS
// handshake) is computed by the token. Keys.Destroy deletes both objects; a Key whose
// objects are gone refuses to sign, so a stale object handle can never reach whatever
// object the token gives that handle next.
//
// A key outlives the process that made it, as token objects do. Keys.Ref names it (its
// label, not secret) and Keys.Open finds it again in a later process, so a restarted
// proxy keeps using the key of the certificate it holds; Open refuses an object under
// that label that is not sensitive and never extractable, as NewKey makes them.
//
// What destruction guarantees: the private key never exists in this process's memory,
// so, unlike an in-memory key, it leaves no Go bytes to overwrite. In SoftHSM the key
// is an object file under tokens/; it is a private object, so its attributes are
// encrypted with the token's key, itself wrapped by a key derived from the user PIN.
// Deletion unlinks that file. Unlinking does not overwrite the disk blocks, so someone
// who later obtains both the disk and the PIN file (kept outside the SoftHSM directory,
// see SoftHSM) might recover a deleted key from
// unallocated blocks; an encrypted filesystem, or a hardware token (whose deletion is
// the vendor's), closes that gap. Nothing about a key is written outside the token
// directory.
//
// The package needs cgo: the PKCS#11 KMS and crypto11 are compiled only with cgo.
package hsm
