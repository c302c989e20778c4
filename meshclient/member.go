package meshclient

import (
	"context"
	"sync"
)

// Member is what a proxy runs to take part in the mesh: the Watch, the Heartbeat when
// it advertises addresses, and AgentTokens. It only composes them; each does one job
// and can be run on its own.
type Member struct {
	Watch     *Watch
	Heartbeat *Heartbeat // nil without Config.Addresses
	Tokens    *AgentTokens
}

// NewMember checks cfg and builds the clients it calls for. It does not contact the
// CA and starts no goroutine: call Run.
func NewMember(cfg Config) (*Member, error) {
	w, err := NewWatch(cfg)
	if err != nil {
		return nil, err
	}
	t, err := NewAgentTokens(cfg)
	if err != nil {
		return nil, err
	}
	m := &Member{Watch: w, Tokens: t}
	if len(cfg.Addresses) > 0 {
		if m.Heartbeat, err = NewHeartbeat(cfg); err != nil {
			return nil, err
		}
	}
	return m, nil
}

// Run runs the Watch and the Heartbeat until ctx is done, and returns once both have
// exited: nil, or ErrRunning if either was already running.
func (m *Member) Run(ctx context.Context) error {
	var wg sync.WaitGroup
	var hbErr error
	if m.Heartbeat != nil {
		wg.Go(func() { hbErr = m.Heartbeat.Run(ctx) })
	}
	err := m.Watch.Run(ctx)
	wg.Wait()
	if err != nil {
		return err
	}
	return hbErr
}
