//go:build !unix

package ca

import (
	"fmt"
	"os"
	"path/filepath"
)

// lockStateDir opens StateDir/lock. Without flock there is no exclusion on this
// platform: run one CA per state directory.
func lockStateDir(dir string) (*os.File, error) {
	path := filepath.Join(dir, fileLock)
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	return f, nil
}
