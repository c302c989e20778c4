//go:build !linux

package redirect

import "context"

// Install needs Linux iptables; elsewhere it returns ErrUnsupported (after validating cfg,
// so a bad config is still reported as such). Agents on these platforms use the proxy's
// explicit HTTP CONNECT / SOCKS5 listener instead.
func Install(ctx context.Context, cfg Config) error {
	if _, err := Rules(cfg); err != nil {
		return err
	}
	return ErrUnsupported
}

// Remove needs Linux iptables; elsewhere it returns ErrUnsupported.
func Remove(ctx context.Context, cfg Config) error { return ErrUnsupported }
