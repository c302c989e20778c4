// Package softhsmtest gives the tests of one test binary a SoftHSM2 directory and token
// that they all share. SoftHSM reads its configuration (SOFTHSM2_CONF) once per
// initialisation of the module, and the module stays initialised while any test has a
// token open, so a test process serves one SoftHSM directory: tests share it, each with
// a token label or a key label prefix of its own. It does not give tests separate
// directories.
//
// Require and RequireTool are the one way a test finds SoftHSM missing: they skip the
// test on a developer's machine but fail it when CI=true, so that CI never reports
// green for tests that did not run.
package softhsmtest

import (
	"os"
	"os/exec"
	"sync"
	"testing"

	"github.com/agentmesh/agentmesh/hsm"
)

// Dir is a SoftHSM2 directory prepared at first use. The zero value is not usable: set
// Pattern and Label. A package declares one as a variable and calls Remove from its
// TestMain after the tests have run.
type Dir struct {
	// Pattern is the os.MkdirTemp pattern of the directory's name.
	Pattern string
	// Label is the token Token prepares in it.
	Label string

	once    sync.Once
	dir     string
	uri     string
	release func()
	err     error
}

// Require stops tb unless the SoftHSM2 module is installed: it skips it, or fails it
// when CI=true.
func Require(tb testing.TB) {
	tb.Helper()
	if _, err := os.Stat(hsm.SoftHSMModule); err != nil {
		missing(tb, "SoftHSM2 module %s not installed (make deps, or apt-get install softhsm2): %v", hsm.SoftHSMModule, err)
	}
}

// RequireTool returns the path of a command-line tool that tests use on SoftHSM tokens
// (pkcs11-tool, softhsm2-util) and stops tb as Require does when it is missing.
func RequireTool(tb testing.TB, name string) string {
	tb.Helper()
	path, err := exec.LookPath(name)
	if err != nil {
		missing(tb, "%s not installed (make deps): %v", name, err)
	}
	return path
}

func missing(tb testing.TB, format string, args ...any) {
	tb.Helper()
	if os.Getenv("CI") == "true" {
		tb.Fatalf("CI=true: "+format, args...)
		return
	}
	tb.Skipf(format, args...)
}

// Token returns the directory and the PKCS#11 URI of its token Label, creating both at
// the first call. It stops tb as Require does when SoftHSM2 is not installed, and fails
// it when the directory cannot be prepared.
func (d *Dir) Token(tb testing.TB) (dir, uri string) {
	tb.Helper()
	Require(tb)
	d.once.Do(func() {
		if d.dir, d.err = os.MkdirTemp("", d.Pattern); d.err != nil {
			return
		}
		d.uri, d.release, d.err = hsm.SoftHSM(d.dir, d.Label, "")
	})
	if d.err != nil {
		tb.Fatalf("shared SoftHSM: %v", d.err)
	}
	return d.dir, d.uri
}

// Remove releases the SoftHSM configuration and deletes the directory, once every
// test is done with it.
func (d *Dir) Remove() {
	if d.release != nil {
		d.release()
	}
	if d.dir != "" {
		_ = os.RemoveAll(d.dir)
	}
}
