package meshclient

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"

	"github.com/agentmesh/agentmesh/meshapi"
)

// AckAnchor acknowledges a step of a rotation of the CA's trust anchors with the host
// SVID (Config.Certificate): POST /mesh/v1/rotation/ack. A 409 answer wraps
// ErrStaleStep; any other refusal is a *meshapi.ResponseError with Op "rotation ack".
// It does not retry. Safe for concurrent use.
func (w *Watch) AckAnchor(ctx context.Context, ack meshapi.AnchorAck) error {
	body, err := json.Marshal(ack)
	if err != nil {
		return fmt.Errorf("ca: rotation ack: %w", err)
	}
	ctx, cancel := context.WithTimeout(ctx, defaultTimeout)
	defer cancel()
	_, err = w.conn.do(ctx, "rotation ack", http.MethodPost, meshapi.AnchorAckPath, body, meshapi.MaxResponse)
	if re, ok := errors.AsType[*meshapi.ResponseError](err); ok && re.Status == http.StatusConflict {
		return fmt.Errorf("%w: %w", ErrStaleStep, err)
	}
	return err
}
