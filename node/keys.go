package node

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/agentmesh/agentmesh/hsm"
	"github.com/agentmesh/agentmesh/rotator"
)

// hostSVIDFile, in the state directory, keeps the host SVID's chain and the reference of
// its key across restarts (rotator.Config.StateFile).
const hostSVIDFile = "svid.json"

// openKeyStore returns where the proxy's SVID keys live: a PKCS#11 token by default
// ("softhsm", the default: a SoftHSM2 token in the state directory; "pkcs11:…": that
// token), where they are generated, used and destroyed without ever leaving it and
// outlive the process, so a restarted proxy keeps its identity; or process memory
// ("memory"), lost with the process, so every start enrols with a new token. It also
// returns the token's URI ("" for memory), for the audit key (openAuditKey).
func openKeyStore(ctx context.Context, cfg *Config) (rotator.KeyStore, string, func(), error) {
	uri := cfg.Keys
	release := func() {}
	switch uri {
	case "memory":
		return rotator.MemoryKeys{}, "", func() {}, nil
	case "", "softhsm":
		var err error
		// The PIN: a systemd credential when the unit passes one, else
		// STATE/hsm.pin, beside the token directory STATE/hsm and not in it.
		if uri, release, err = hsm.SoftHSM(filepath.Join(cfg.State, "hsm"), "agentmesh-proxy", hsm.CredentialPIN()); err != nil {
			return nil, "", nil, fmt.Errorf("keys: %w", err)
		}
	}
	keys, err := hsm.OpenKeys(ctx, uri, "svid-")
	if err != nil {
		release()
		return nil, "", nil, fmt.Errorf("keys: %w", err)
	}
	return keys, uri, func() { _ = keys.Close(); release() }, nil
}

// tokenFromFile reads the bootstrap token when the rotator enrols, so an operator can
// drop a fresh token in place for a re-enrolment without restarting the proxy.
func tokenFromFile(path string) func(context.Context) (string, error) {
	return func(context.Context) (string, error) {
		if path == "" {
			return "", tokenError{errors.New("no ca.token_file configured for enrolment")}
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return "", tokenError{fmt.Errorf("read bootstrap token: %w", err)}
		}
		tok := strings.TrimSpace(string(b))
		if tok == "" {
			return "", tokenError{fmt.Errorf("bootstrap token file %s is empty", path)}
		}
		return tok, nil
	}
}

// tokenError is a bootstrap token that cannot be had. Retrying cannot help until an
// operator writes one, so it is permanent: the rotator then reports that a new token
// is needed (and still reads the file again at each retry).
type tokenError struct{ err error }

func (e tokenError) Error() string { return e.err.Error() }
func (e tokenError) Unwrap() error { return e.err }
func (tokenError) Permanent() bool { return true }
