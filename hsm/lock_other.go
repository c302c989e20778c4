//go:build !unix

package hsm

// lockDir does nothing where flock does not exist: only one process at a time may
// prepare a directory there (within a process, tokenMu serialises preparation).
func lockDir(string) (unlock func(), err error) {
	return func() {}, nil
}
