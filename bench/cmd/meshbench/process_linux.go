package main

import (
	"os/exec"
	"syscall"
)

// dieWithParent makes the child get SIGTERM if meshbench dies without stopping it (a
// SIGKILL, or a SIGPIPE on a closed stderr), so no CA or proxy outlives the run.
func dieWithParent(cmd *exec.Cmd) {
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
}
