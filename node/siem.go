package node

import (
	"context"

	"github.com/agentmesh/agentmesh/audit/siem"
	"github.com/agentmesh/agentmesh/meshapi"
)

// buildSIEM makes the sink of audit.siem, when set: it reads the audit log's files, so it
// needs nothing of the log's writer and never slows it down.
func (n *node) buildSIEM() error {
	s := n.cfg.Audit.SIEM
	if s == nil {
		return nil
	}
	cfg, err := s.Config(n.cfg.Audit.Path)
	if err != nil {
		return err
	}
	cfg.Origin, cfg.Audit, cfg.Registerer, cfg.Logger = meshapi.AuditOrigin(n.cfg.id), n.audit, n.reg, n.component("siem")
	n.siem, err = siem.New(cfg)
	return err
}

// runSIEM runs the sink until ctx is done; without one it returns at once.
func (n *node) runSIEM(ctx context.Context) error {
	if n.siem == nil {
		return nil
	}
	return n.siem.Run(ctx)
}
