package meshapi

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strings"

	"github.com/agentmesh/agentmesh/audit"
)

// maxWitnessedLogBytes bounds a WitnessedLog answer: a checkpoint, a few keys and a
// history of 1024 summaries.
const maxWitnessedLogBytes = 1 << 20

// ErrWitnessedLogMalformed is wrapped by the error for a WitnessedLog that does not
// decode or holds a bad hash.
var ErrWitnessedLogMalformed = errors.New("meshapi: witnessed log malformed")

// FetchWitnessedLog GETs what the witness at base (the CA's HTTPS URL) holds of the log
// origin. client verifies the witness (the mesh's root bundle); no client certificate is
// needed.
func FetchWitnessedLog(ctx context.Context, client *http.Client, base, origin string) (WitnessedLog, error) {
	u := strings.TrimSuffix(base, "/") + WitnessPrefix + WitnessCheckpointsPath + "?origin=" + url.QueryEscape(origin)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return WitnessedLog{}, fmt.Errorf("meshapi: witnessed log: %w", err)
	}
	resp, err := client.Do(req)
	if err != nil {
		return WitnessedLog{}, fmt.Errorf("meshapi: witnessed log: %w", err)
	}
	defer func() { _ = resp.Body.Close() }() // read to the end or abandoned
	b, err := ReadLimited(resp.Body, maxWitnessedLogBytes)
	if err != nil {
		return WitnessedLog{}, fmt.Errorf("meshapi: witnessed log: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		return WitnessedLog{}, &ResponseError{Op: "witnessed log", Status: resp.StatusCode, Message: ErrorMessage(b)}
	}
	return DecodeWitnessedLog(b)
}

// DecodeWitnessedLog decodes a WitnessedLog answer. It never panics.
func DecodeWitnessedLog(b []byte) (WitnessedLog, error) {
	var w WitnessedLog
	if err := json.Unmarshal(b, &w); err != nil {
		return WitnessedLog{}, fmt.Errorf("%w: %w", ErrWitnessedLogMalformed, err)
	}
	return w, nil
}

// View is w as audit.VerifyLog checks a log against it.
func (w WitnessedLog) View() (audit.WitnessView, error) {
	v := audit.WitnessView{Key: w.Key, WitnessKeys: w.WitnessKeys, Latest: []byte(w.Latest)}
	for i, h := range w.History {
		raw, err := base64.StdEncoding.DecodeString(h.Hash)
		if err != nil || len(raw) != 32 {
			return audit.WitnessView{}, fmt.Errorf("%w: history[%d].hash is not 32 bytes of base64", ErrWitnessedLogMalformed, i)
		}
		c := audit.Checkpoint{Origin: w.Origin, Size: h.Size}
		copy(c.Hash[:], raw)
		v.History = append(v.History, c)
	}
	return v, nil
}
