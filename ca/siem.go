package ca

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/audit/siem"
	"github.com/agentmesh/agentmesh/meshapi"
	"github.com/agentmesh/agentmesh/policy"
)

// LoadSIEMSettings reads the SIEM file of `agentmesh ca --siem FILE`: the fields of a
// proxy's audit.siem section at the top level, relative paths resolved against the file's
// directory. Errors name the file, and the line and field when there is one.
func LoadSIEMSettings(path string) (*siem.Settings, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("ca: siem settings: %w", err)
	}
	var s siem.Settings
	root, err := policy.DecodeYAML(data, &s, "empty file")
	if err != nil {
		return nil, fmt.Errorf("ca: siem settings %s: %w", path, err)
	}
	var fe *siem.FieldError
	if err := s.Validate(); errors.As(err, &fe) {
		return nil, fmt.Errorf("ca: siem settings %s: %w", path,
			&policy.FieldError{Line: policy.YAMLLine(root, fe.Field), Field: fe.Field, Reason: fe.Err.Error()})
	}
	base := filepath.Dir(path)
	for _, p := range []*string{&s.CAFile, &s.CertFile, &s.KeyFile} {
		if *p != "" && !filepath.IsAbs(*p) {
			*p = filepath.Join(base, *p)
		}
	}
	return &s, nil
}

// newSIEMSink makes the sink of the CA's audit log, nil without settings.
func newSIEMSink(cfg ProcessConfig, log *audit.Log, reg prometheus.Registerer) (*siem.Sink, error) {
	if cfg.SIEM == nil {
		return nil, nil
	}
	sc, err := cfg.SIEM.Config(cfg.AuditPath)
	if err != nil {
		return nil, fmt.Errorf("ca: %w", err)
	}
	sc.Origin, sc.Audit, sc.Registerer = meshapi.CAAuditOrigin(cfg.CA.TrustDomain), log, reg
	sc.Logger = cfg.Logger.With("component", "siem")
	return siem.New(sc)
}
