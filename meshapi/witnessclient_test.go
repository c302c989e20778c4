package meshapi

import (
	"errors"
	"net/http"
	"net/http/httptest"
	"testing"
)

// FuzzWitnessedLog checks that decoding a witness's answer and turning it into what
// audit.VerifyLog reads never panics, and that a bad history hash is refused as such.
func FuzzWitnessedLog(f *testing.F) {
	f.Fuzz(func(t *testing.T, data []byte) {
		w, err := DecodeWitnessedLog(data)
		if err != nil {
			if !errors.Is(err, ErrWitnessedLogMalformed) {
				t.Fatalf("error %v does not wrap ErrWitnessedLogMalformed", err)
			}
			return
		}
		v, err := w.View()
		if err != nil {
			if !errors.Is(err, ErrWitnessedLogMalformed) {
				t.Fatalf("error %v does not wrap ErrWitnessedLogMalformed", err)
			}
			return
		}
		if len(v.History) != len(w.History) {
			t.Fatalf("View kept %d of %d history entries", len(v.History), len(w.History))
		}
	})
}

// TestFetchWitnessedLogStatus: an answer other than 200 is a *ResponseError with the
// witness's status, never a decoded empty log.
func TestFetchWitnessedLogStatus(t *testing.T) {
	t.Parallel()
	srv := httptest.NewTLSServer(http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		if r.URL.Path != WitnessPrefix+WitnessCheckpointsPath || r.URL.Query().Get("origin") != "example.org/host/a b/audit" {
			t.Errorf("GET %s", r.URL)
		}
		http.Error(rw, `{"message":"no such log"}`, http.StatusNotFound)
	}))
	defer srv.Close()
	_, err := FetchWitnessedLog(t.Context(), srv.Client(), srv.URL+"/", "example.org/host/a b/audit")
	if re, ok := errors.AsType[*ResponseError](err); !ok || re.Status != http.StatusNotFound {
		t.Fatalf("FetchWitnessedLog = %v, want a 404 ResponseError", err)
	}
}
