package meshclient

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/internal/testmesh"
)

var testTD = testmesh.TD

var addrs = testmesh.Addrs

func fixedToken(tok string) func(context.Context) (string, error) {
	return func(context.Context) (string, error) { return tok, nil }
}

// permanent reports whether err says retrying cannot succeed.
func permanent(err error) bool {
	var p interface{ Permanent() bool }
	return errors.As(err, &p) && p.Permanent()
}

var (
	idA = spiffeid.RequireFromPath(testTD, "/host/a")
	idB = spiffeid.RequireFromPath(testTD, "/host/b")
)

// writeError answers as the CA does, in step-ca's error format.
func writeError(w http.ResponseWriter, status int, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(map[string]any{"status": status, "message": msg})
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(v)
}
