package ca

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/netip"
	"slices"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// maxAgentTokenResponse bounds the answer to an agent token request (a JWT of about
// 1 KiB).
const maxAgentTokenResponse = 64 << 10

// addEntries adds doc's registration entries to snap: the list, sorted by ID, and the
// agents with a port by the addresses of their host's proxy. A malformed entry (no ID
// or host, an ID listed twice, a port of a host listed twice) refuses the document,
// as a malformed peer does: the CA validates every entry.
func (snap *dirSnapshot) addEntries(doc *DirectoryDocument) error {
	if len(doc.Entries) == 0 {
		return nil
	}
	entries := slices.SortedFunc(slices.Values(doc.Entries), compareEntries)
	byHost := make(map[spiffeid.ID]map[uint16]spiffeid.ID)
	for i, e := range entries {
		switch {
		case e.ID.IsZero() || e.Host.IsZero():
			return fmt.Errorf("malformed directory: entry %d has no id or no host", i)
		case i > 0 && entries[i-1].ID == e.ID:
			return fmt.Errorf("malformed directory: entry %s listed twice", e.ID)
		case e.Port == 0:
			continue
		}
		ports := byHost[e.Host]
		if ports == nil {
			ports = make(map[uint16]spiffeid.ID)
			byHost[e.Host] = ports
		}
		if other, dup := ports[e.Port]; dup {
			return fmt.Errorf("malformed directory: port %d of %s registered to %s and %s", e.Port, e.Host, other, e.ID)
		}
		ports[e.Port] = e.ID
	}
	snap.entries = entries
	if len(byHost) == 0 {
		return nil
	}
	snap.agents = make(map[netip.Addr]map[uint16]spiffeid.ID)
	for _, p := range doc.Peers {
		ports := byHost[p.SPIFFEID]
		if ports == nil {
			continue
		}
		for _, a := range p.Addresses {
			// This proxy's own entry was not checked with the others' (directoryRoutes
			// leaves it out of the routes); its agents are still listed.
			if !a.IsValid() || checkAdvertisable(a) != nil {
				return fmt.Errorf("malformed directory: peer %s has an invalid address %q", p.SPIFFEID, a)
			}
			snap.agents[a.Unmap()] = ports
		}
	}
	return nil
}

// Entries returns the registration entries of the latest directory version, sorted by
// ID (a copy; nil before the first directory or when there are none).
func (d *Directory) Entries() []Entry { return slices.Clone(d.snap.Load().entries) }

// AgentsAt returns the agents registered with a port, by port, to the host of the
// proxy that advertises addr (this proxy's own addresses included), or nil when there
// are none or no proxy advertises addr. The map is shared and read-only: callers must
// not modify it. It reads an immutable snapshot without locking or allocating.
func (d *Directory) AgentsAt(addr netip.Addr) map[uint16]spiffeid.ID {
	return d.snap.Load().agents[addr.Unmap()]
}

// AgentToken asks the CA for a one-time bootstrap token for the agent identity id
// (POST /mesh/v1/agents/token), over mTLS with DirectoryConfig.Certificate and through
// DirectoryConfig.Control like every request of the Directory. The CA grants it only
// to the proxy of the host that id's registration entry names. A refusal is a
// *ResponseError with Op "agent token" carrying the CA's message (403 when id has no
// entry or it names another host, or id is revoked).
func (d *Directory) AgentToken(ctx context.Context, id spiffeid.ID) (string, error) {
	body, err := json.Marshal(agentTokenRequest{ID: id.String()})
	if err != nil {
		return "", fmt.Errorf("ca: agent token: %w", err)
	}
	ctx, cancel := context.WithTimeout(ctx, defaultClientTimeout)
	defer cancel()
	b, err := d.do(ctx, "agent token", http.MethodPost, d.base+meshPrefix+meshAgentTokenPath, body, maxAgentTokenResponse)
	if err != nil {
		return "", err
	}
	var ans tokenResponse
	if err := json.Unmarshal(b, &ans); err != nil || ans.Token == "" {
		return "", errors.New("ca: agent token: malformed answer")
	}
	return ans.Token, nil
}
