package meshclient

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/meshapi"
)

// maxAgentTokenResponse bounds the answer to an agent token request (a JWT of about
// 1 KiB).
const maxAgentTokenResponse = 64 << 10

// AgentTokens asks the CA for the bootstrap tokens of the agents registered to this
// proxy's host. Safe for concurrent use.
type AgentTokens struct{ conn *conn }

// NewAgentTokens checks cfg (URL, Roots, Certificate, Control) and returns an
// AgentTokens. It does not contact the CA.
func NewAgentTokens(cfg Config) (*AgentTokens, error) {
	c, err := newConn(cfg.withDefaults())
	if err != nil {
		return nil, err
	}
	return &AgentTokens{conn: c}, nil
}

// AgentToken asks the CA for a one-time bootstrap token for the agent identity id
// (POST /mesh/v1/agents/token), over mTLS with Config.Certificate and through
// Config.Control. The CA grants it only to the proxy of the host that id's
// registration entry names. A refusal is a *meshapi.ResponseError with Op "agent
// token" carrying the CA's message (403 when id has no entry or it names another
// host, or id is revoked).
func (a *AgentTokens) AgentToken(ctx context.Context, id spiffeid.ID) (string, error) {
	body, err := json.Marshal(meshapi.AgentTokenRequest{ID: id.String()})
	if err != nil {
		return "", fmt.Errorf("ca: agent token: %w", err)
	}
	ctx, cancel := context.WithTimeout(ctx, defaultTimeout)
	defer cancel()
	b, err := a.conn.do(ctx, "agent token", http.MethodPost, meshapi.AgentTokenPath, body, maxAgentTokenResponse)
	if err != nil {
		return "", err
	}
	var ans meshapi.TokenResponse
	if err := json.Unmarshal(b, &ans); err != nil || ans.Token == "" {
		return "", errors.New("ca: agent token: malformed answer")
	}
	return ans.Token, nil
}
