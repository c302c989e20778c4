package meshapi

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strings"
)

// MaxResponse bounds what the client reads from the CA.
const MaxResponse = 1 << 20

// ResponseError is an answer of the CA that is not a success: a step-ca API error on the
// HTTPS API, or an admin-socket error for RequestToken. Message is the CA's own message
// (step-ca keeps the details in its log).
type ResponseError struct {
	Op      string // "sign", "rekey", "token", "register", "directory", "agent token", "register entry", ...
	Status  int    // HTTP status code
	Message string
}

func (e *ResponseError) Error() string {
	msg := e.Message
	if msg == "" {
		msg = http.StatusText(e.Status)
	}
	return fmt.Sprintf("ca: %s: %d %s", e.Op, e.Status, msg)
}

// Permanent reports whether retrying the same request cannot succeed: true for 4xx
// answers (bad or used token, expired or revoked certificate, refused request) except 408
// Request Timeout and 429 Too Many Requests. The rotator switches from Renew to Enroll on
// a permanent error.
func (e *ResponseError) Permanent() bool {
	return e.Status >= 400 && e.Status < 500 &&
		e.Status != http.StatusRequestTimeout && e.Status != http.StatusTooManyRequests
}

// ErrorMessage extracts the message of a step-ca error body ({"status":N,
// "message":"..."}), or a bounded prefix of a body that is not one.
func ErrorMessage(b []byte) string {
	var e struct {
		Message string `json:"message"`
	}
	if json.Unmarshal(b, &e) == nil && e.Message != "" {
		return e.Message
	}
	s := strings.TrimSpace(string(b))
	if len(s) > 200 {
		s = s[:200] + "..."
	}
	return s
}

// ReadLimited reads r to the end, failing rather than truncating past limit bytes.
func ReadLimited(r io.Reader, limit int64) ([]byte, error) {
	b, err := io.ReadAll(io.LimitReader(r, limit+1))
	if err != nil {
		return nil, err
	}
	if int64(len(b)) > limit {
		return nil, fmt.Errorf("answer exceeds %d bytes", limit)
	}
	return b, nil
}

// DecodeRevokeResult decodes the answer to a revoke request.
func DecodeRevokeResult(b []byte) (*RevokeResult, error) {
	var res RevokeResult
	if err := json.Unmarshal(b, &res); err != nil || res.ListVersion == 0 {
		return nil, errors.New("ca: revoke: malformed answer")
	}
	return &res, nil
}

// DecodeReinstateResult decodes the answer to a reinstate request.
func DecodeReinstateResult(b []byte) (*ReinstateResult, error) {
	var res ReinstateResult
	if err := json.Unmarshal(b, &res); err != nil || res.SPIFFEID == "" {
		return nil, errors.New("ca: reinstate: malformed answer")
	}
	return &res, nil
}
