// Package unixhttp sends one HTTP request to a server on a unix socket: the CA's admin
// socket and the proxy's control socket, whose callers the kernel authenticates
// (SO_PEERCRED). It does not authorise, retry or decode answers: the caller owns its
// request and answer types.
package unixhttp

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"time"
)

// Request is one request to the server on a unix socket.
type Request struct {
	// Socket is the path of the unix socket. Required.
	Socket string
	// Method and Path are the request's (Path with its leading slash). Required.
	Method, Path string
	// Body is sent as application/json when not nil.
	Body []byte
	// Limit is the most bytes of the answer read; a longer answer is an error. Required.
	Limit int64
	// Timeout bounds the whole exchange. Default 0: only ctx bounds it.
	Timeout time.Duration
}

// Do sends req and returns the answer's status and body, whatever the status. A
// connection error names the socket.
func Do(ctx context.Context, req Request) (status int, body []byte, err error) {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", req.Socket)
		},
		DisableKeepAlives: true,
	}
	defer tr.CloseIdleConnections()
	client := &http.Client{Transport: tr, Timeout: req.Timeout}
	var rd io.Reader
	if req.Body != nil {
		rd = bytes.NewReader(req.Body)
	}
	// The host is a placeholder: the transport always dials the socket.
	hreq, err := http.NewRequestWithContext(ctx, req.Method, "http://localhost"+req.Path, rd)
	if err != nil {
		return 0, nil, err
	}
	if req.Body != nil {
		hreq.Header.Set("Content-Type", "application/json")
	}
	resp, err := client.Do(hreq)
	if err != nil {
		return 0, nil, fmt.Errorf("socket %s: %w", req.Socket, err)
	}
	defer func() { _ = resp.Body.Close() }()
	b, err := io.ReadAll(io.LimitReader(resp.Body, req.Limit+1))
	if err != nil {
		return resp.StatusCode, nil, fmt.Errorf("read answer: %w", err)
	}
	if int64(len(b)) > req.Limit {
		return resp.StatusCode, nil, fmt.Errorf("answer exceeds %d bytes", req.Limit)
	}
	return resp.StatusCode, b, nil
}
