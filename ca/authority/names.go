package authority

import "time"

const (
	// MinSVIDLifetime is the shortest SVID lifetime the provisioner accepts.
	MinSVIDLifetime = 10 * time.Second
	// rootValidity is the lifetime of the self-signed root; the intermediate ends
	// with it.
	rootValidity = 10 * 365 * 24 * time.Hour
)

// Files inside the state directory. hsm.SoftHSM names the embedded token's files;
// filePIN is where earlier versions kept the token's PIN.
const (
	fileRoot         = "root.crt"
	fileIntermediate = "intermediate.crt"
	filePKI          = "pki.json"
	filePIN          = "hsm.pin"
)

// Names inside the PKCS#11 token and step-ca.
const (
	tokenLabel      = "agentmesh"
	provisionerName = "agentmesh"
	// Key objects: CKA_ID (hex) and CKA_LABEL. One token holds the keys of one CA.
	keyURIRoot         = "pkcs11:id=a901;object=agentmesh-root"
	keyURIIntermediate = "pkcs11:id=a902;object=agentmesh-intermediate"
	keyURIProvisioner  = "pkcs11:id=a903;object=agentmesh-provisioner"
	// keyURIAudit signs the CA's audit checkpoints and cosigns the proxies': never a
	// TLS or issuing key, and not rotated with the anchors, so the witness key the
	// proxies pin outlives every generation.
	keyURIAudit = "pkcs11:id=a904;object=agentmesh-audit"
)

// Log attribute keys, the same as package ca's.
const (
	keySPIFFEID = "spiffe_id"
	keySerial   = "serial"
	keyNotAfter = "not_after"
	keyErr      = "err"
	keyStateDir = "state_dir"
	keyStatus   = "status"
	keyPath     = "path"
	keyMethod   = "method"
	keyRetryIn  = "retry_in"
	keyExpires  = "expires"
)

// TokenLabel is the label of the embedded SoftHSM2 token, and the key URIs inside it,
// for tools and tests that inspect the token.
const (
	TokenLabel         = tokenLabel
	KeyURIRoot         = keyURIRoot
	KeyURIIntermediate = keyURIIntermediate
	KeyURIAudit        = keyURIAudit
)
