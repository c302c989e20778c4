package siem

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"time"
)

// Settings is the SIEM section of a configuration file (the proxy's audit.siem, the CA's
// --siem file): where to send and what.
type Settings struct {
	// Address is the receiver, host:port (6514 is RFC 5425's port). Required.
	Address string `yaml:"address"`
	// CAFile holds the PEM certificates the receiver's chain must end at. Required.
	CAFile string `yaml:"ca_file"`
	// ServerName is the name the receiver's certificate must carry. Default: Address's host.
	ServerName string `yaml:"server_name"`
	// CertFile and KeyFile are a client certificate and its key, for a receiver that
	// authenticates senders. Both or neither.
	CertFile string `yaml:"cert_file"`
	KeyFile  string `yaml:"key_file"`
	// Hostname is the messages' HOSTNAME. Default: the machine's host name.
	Hostname string `yaml:"hostname"`
	// Include and Exclude choose the records sent (Filter).
	Include []Rule `yaml:"include"`
	Exclude []Rule `yaml:"exclude"`
	// ResendWindow is Config.ResendWindow. Default 2s.
	ResendWindow time.Duration `yaml:"resend_window"`
	// MaxBacklog is Config.MaxBacklog. Default 1000000.
	MaxBacklog int64 `yaml:"max_backlog"`
}

// FieldError is a Settings field that is not valid; Field is its YAML name.
type FieldError struct {
	Field string
	Err   error
}

func (e *FieldError) Error() string { return "siem: " + e.Field + ": " + e.Err.Error() }

func (e *FieldError) Unwrap() error { return e.Err }

// Validate checks the settings without reading any file.
func (s Settings) Validate() error {
	if _, port, err := net.SplitHostPort(s.Address); err != nil || port == "" {
		return &FieldError{"address", errors.New("must be host:port")}
	}
	if s.CAFile == "" {
		return &FieldError{"ca_file", errors.New("required: the receiver's CA certificates")}
	}
	if (s.CertFile == "") != (s.KeyFile == "") {
		return &FieldError{"key_file", errors.New("cert_file and key_file go together")}
	}
	for _, r := range []struct {
		field string
		rules []Rule
	}{{"include", s.Include}, {"exclude", s.Exclude}} {
		for i, rule := range r.rules {
			if rule.Type == "" && rule.Result == "" {
				return &FieldError{r.field + "[" + strconv.Itoa(i) + "]", errors.New("needs a type, a result or both")}
			}
		}
	}
	if s.ResendWindow < 0 {
		return &FieldError{"resend_window", errors.New("must not be negative (0: 2s)")}
	}
	if s.MaxBacklog < 0 {
		return &FieldError{"max_backlog", errors.New("must not be negative (0: 1000000)")}
	}
	return nil
}

// Config makes the Sink's Config for the log at path, reading the certificate files. The
// caller adds Origin, Audit, Registerer and Logger.
func (s Settings) Config(path string) (Config, error) {
	if err := s.Validate(); err != nil {
		return Config{}, err
	}
	tc, err := s.tlsConfig()
	if err != nil {
		return Config{}, err
	}
	return Config{Log: path, Address: s.Address, TLS: tc, Hostname: s.Hostname,
		Filter: Filter{Include: s.Include, Exclude: s.Exclude}, ResendWindow: s.ResendWindow,
		MaxBacklog: s.MaxBacklog}, nil
}

func (s Settings) tlsConfig() (*tls.Config, error) {
	pem, err := os.ReadFile(s.CAFile)
	if err != nil {
		return nil, &FieldError{"ca_file", err}
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pem) {
		return nil, &FieldError{"ca_file", fmt.Errorf("%s holds no PEM certificate", s.CAFile)}
	}
	name := s.ServerName
	if name == "" {
		name, _, _ = net.SplitHostPort(s.Address)
	}
	// TLS 1.2 at least: RFC 5425 asks for 1.2 today, and rsyslog's GnuTLS driver speaks 1.3.
	tc := &tls.Config{RootCAs: roots, ServerName: name, MinVersion: tls.VersionTLS12}
	if s.CertFile != "" {
		cert, err := tls.LoadX509KeyPair(s.CertFile, s.KeyFile)
		if err != nil {
			return nil, &FieldError{"cert_file", err}
		}
		tc.Certificates = []tls.Certificate{cert}
	}
	return tc, nil
}
