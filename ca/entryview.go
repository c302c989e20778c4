package ca

import (
	"encoding/json"
	"github.com/agentmesh/agentmesh/meshapi"
	"sync"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// What each proxy learns of the registration entries. A proxy needs its own host's
// entries whole (the uids it attests agents by, the agents whose SVIDs it holds); of the
// other hosts it needs only the agents listening on a port, by ID, host and port: that
// is what its outbound decisions name as the destination (proxy.Peer.Agents, the DstID
// of a policy decision). Uids of other hosts' agents, and their agents without a port,
// are none of its business, so the directory served to a caller leaves them out. The
// CA's admin socket still serves every entry.

// entriesFor returns the entries the proxy of host may see: its own whole, the other
// hosts' with a port, without their uid. entries is not modified.
func entriesFor(entries []meshapi.Entry, host spiffeid.ID) []meshapi.Entry {
	var out []meshapi.Entry
	for _, e := range entries {
		switch {
		case e.Host == host && !host.IsZero():
			out = append(out, e)
		case e.Port != 0:
			out = append(out, meshapi.Entry{ID: e.ID, Host: e.Host, Port: e.Port})
		}
	}
	return out
}

// callerViews caches, for one directory version, the JSON each caller is served (one
// encoding per caller and version however many polls it makes). Safe for concurrent
// use.
type callerViews struct {
	mu    sync.Mutex
	views map[spiffeid.ID][]byte
}

// view returns the JSON of doc as caller may see it, encoding it on first use.
func (c *callerViews) view(doc meshapi.DirectoryDocument, caller spiffeid.ID) ([]byte, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if b, ok := c.views[caller]; ok {
		return b, nil
	}
	doc.Entries = entriesFor(doc.Entries, caller)
	b, err := json.Marshal(doc)
	if err != nil {
		return nil, err
	}
	if c.views == nil {
		c.views = make(map[spiffeid.ID][]byte)
	}
	c.views[caller] = b
	return b, nil
}
