package unixhttp

import (
	"errors"
	"io"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// serve answers on a unix socket in a temporary directory: /echo returns the request's
// method, content type and body with status 201.
func serve(t *testing.T) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "test.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/echo", func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		w.WriteHeader(http.StatusCreated)
		_, _ = io.WriteString(w, r.Method+" "+r.Header.Get("Content-Type")+" "+string(b))
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ln) }()
	t.Cleanup(func() {
		_ = srv.Close()
		if err := <-done; !errors.Is(err, http.ErrServerClosed) {
			t.Error(err)
		}
	})
	return sock
}

func TestDo(t *testing.T) {
	t.Parallel()
	sock := serve(t)
	status, body, err := Do(t.Context(), Request{Socket: sock, Method: http.MethodPost, Path: "/echo", Body: []byte(`{"a":1}`), Limit: 1 << 10})
	if err != nil || status != http.StatusCreated || string(body) != `POST application/json {"a":1}` {
		t.Fatalf("Do = %d %q %v", status, body, err)
	}
	status, body, err = Do(t.Context(), Request{Socket: sock, Method: http.MethodGet, Path: "/missing", Limit: 1 << 10})
	if err != nil || status != http.StatusNotFound {
		t.Fatalf("Do /missing = %d %q %v, want 404", status, body, err)
	}
	if _, _, err := Do(t.Context(), Request{Socket: sock, Method: http.MethodPost, Path: "/echo", Body: []byte("0123456789"), Limit: 8}); err == nil {
		t.Fatal("an answer over the limit was accepted")
	}
	missing := filepath.Join(t.TempDir(), "none.sock")
	if _, _, err := Do(t.Context(), Request{Socket: missing, Method: http.MethodGet, Path: "/echo", Limit: 8}); err == nil || !strings.Contains(err.Error(), missing) {
		t.Fatalf("Do on a missing socket = %v, want an error naming it", err)
	}
}
