//go:build !linux

package proxy

import (
	"errors"
	"syscall"
)

// markSupported: no SO_MARK here; New refuses a Config with Mark set.
const markSupported = false

func markControl(int) func(network, address string, c syscall.RawConn) error {
	return func(string, string, syscall.RawConn) error { return errors.New("SO_MARK needs Linux") }
}

func checkMark(int) error { return errors.New("SO_MARK needs Linux") }
