//go:build !linux

package main

import "os/exec"

// dieWithParent has no portable equivalent: children are stopped on a normal exit only.
func dieWithParent(*exec.Cmd) {}
