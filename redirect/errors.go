package redirect

import (
	"errors"
	"strings"
)

// ErrInvalidConfig is matched (errors.Is) by every *ConfigError: the Config cannot be turned
// into rules. Nothing was run.
var ErrInvalidConfig = errors.New("redirect: invalid config")

// ErrUnsupported is returned by Install and Remove on platforms without iptables (anything
// but Linux). Rules works everywhere.
var ErrUnsupported = errors.New("redirect: transparent redirection needs linux iptables")

// ConfigError names the Config field that is wrong and why.
type ConfigError struct {
	// Field is the Config field, with an index for list entries: "IncludePorts[2]".
	Field string
	// Reason says what is wrong, for an operator.
	Reason string
}

func (e *ConfigError) Error() string {
	return "redirect: invalid config: " + e.Field + ": " + e.Reason
}

// Is makes errors.Is(err, ErrInvalidConfig) true for every ConfigError.
func (e *ConfigError) Is(target error) bool { return target == ErrInvalidConfig }

// CommandError is an iptables tool that failed: its name and arguments as given to
// Config.Command, what it wrote to stderr, and the exec error (exit status, not found, ...).
type CommandError struct {
	Name   string
	Args   []string
	Stderr string
	Err    error
}

func (e *CommandError) Error() string {
	var b strings.Builder
	b.WriteString(e.Name)
	for _, a := range e.Args {
		b.WriteByte(' ')
		b.WriteString(a)
	}
	b.WriteString(": ")
	b.WriteString(e.Err.Error())
	if e.Stderr != "" {
		b.WriteString(": ")
		b.WriteString(e.Stderr)
	}
	return b.String()
}

func (e *CommandError) Unwrap() error { return e.Err }
