package hsm

import (
	"os"
	"path/filepath"
)

// CredentialPIN is the SoftHSM PIN file systemd passes as the credential hsm.pin
// (LoadCredential=hsm.pin:…, in $CREDENTIALS_DIRECTORY), or "" for SoftHSM's default,
// beside the token directory. The CA and the proxy both read it.
func CredentialPIN() string {
	dir := os.Getenv("CREDENTIALS_DIRECTORY")
	if dir == "" {
		return ""
	}
	if _, err := os.Stat(filepath.Join(dir, "hsm.pin")); err != nil { //nolint:gosec // G703: systemd sets the directory for the unit; no peer chooses it
		return ""
	}
	return filepath.Join(dir, "hsm.pin")
}
