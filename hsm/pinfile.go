package hsm

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/agentmesh/agentmesh/internal/atomicfile"
)

// The user PIN of a SoftHSM token decrypts every object in the token directory. Kept
// beside them, one copy of the directory (a backup, a snapshot, a stolen disk image of
// the state) would carry both the encrypted keys and their key. So the PIN file lives
// outside the SoftHSM directory: by default next to it (DefaultPINFile), or wherever
// the operator puts it, such as a systemd credential ($CREDENTIALS_DIRECTORY/hsm.pin).

// ErrPINFile is returned by SoftHSM for a PIN file it cannot use: inside the SoftHSM
// directory, or in conflict with the PIN an earlier version left there.
var ErrPINFile = errors.New("hsm: pin file")

// DefaultPINFile is where SoftHSM keeps the PIN of the tokens in dir when not told
// otherwise: dir's own name with ".pin" appended, beside dir and not in it
// (/var/lib/agentmesh-ca → /var/lib/agentmesh-ca.pin).
func DefaultPINFile(dir string) string {
	return filepath.Clean(dir) + ".pin"
}

// checkPINFile refuses a PIN file inside dir (both absolute).
func checkPINFile(dir, pinFile string) error {
	rel, err := filepath.Rel(dir, pinFile)
	if err == nil && rel != ".." && !strings.HasPrefix(rel, ".."+string(filepath.Separator)) {
		return fmt.Errorf("%w: %s is inside the SoftHSM directory %s: a copy of the directory would carry the PIN with the keys", ErrPINFile, pinFile, dir)
	}
	return nil
}

// loadPIN returns the PIN of dir's tokens from pinFile, creating a random one when
// there is none. A PIN that an earlier version kept in dir (dir/hsm.pin) is moved to
// pinFile (written first, then removed from dir), or, when pinFile already holds the
// same PIN (a systemd credential made from it), removed from dir. Two different PINs
// are an error: the operator must say which one the tokens use. The caller holds the
// directory's lock.
func loadPIN(dir, pinFile string) ([]byte, error) {
	legacyPath := filepath.Join(dir, filePIN)
	legacy, legacyErr := os.ReadFile(legacyPath)
	if legacyErr != nil && !errors.Is(legacyErr, fs.ErrNotExist) {
		return nil, fmt.Errorf("hsm: read %s: %w", legacyPath, legacyErr)
	}
	pin, err := os.ReadFile(pinFile)
	switch {
	case err == nil && legacyErr == nil:
		if !bytes.Equal(bytes.TrimSpace(pin), bytes.TrimSpace(legacy)) {
			return nil, fmt.Errorf("%w: %s and %s hold different PINs: keep the one the tokens use", ErrPINFile, pinFile, legacyPath)
		}
		if err := os.Remove(legacyPath); err != nil {
			return nil, fmt.Errorf("hsm: remove %s: %w", legacyPath, err)
		}
		return pin, nil
	case err == nil:
		return pin, nil
	case !errors.Is(err, fs.ErrNotExist):
		return nil, fmt.Errorf("hsm: read %s: %w", pinFile, err)
	case legacyErr == nil:
		if err := atomicfile.Write(pinFile, legacy, 0o600); err != nil {
			return nil, fmt.Errorf("%w: move %s to %s: %w", ErrPINFile, legacyPath, pinFile, err)
		}
		if err := os.Remove(legacyPath); err != nil {
			return nil, fmt.Errorf("hsm: remove %s: %w", legacyPath, err)
		}
		return legacy, nil
	}
	// The PIN file is written before the token exists: if we crash in between, the
	// next start initialises the token with the same PIN.
	pin = []byte(randomPIN())
	if err := atomicfile.Write(pinFile, pin, 0o600); err != nil {
		return nil, fmt.Errorf("%w: create %s: %w", ErrPINFile, pinFile, err)
	}
	return pin, nil
}
