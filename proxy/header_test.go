package proxy

import (
	"bytes"
	"errors"
	"testing"
)

func TestParseHeader(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		in      []byte
		want    header
		wantErr error
	}{
		{name: "connect_8080", in: []byte("AMSH\x01\x01\x1f\x90"), want: header{Version: 1, Command: 1, Port: 8080}},
		{name: "connect_max_port", in: []byte("AMSH\x01\x01\xff\xff"), want: header{Version: 1, Command: 1, Port: 65535}},
		{name: "empty", in: nil, wantErr: ErrBadHeader},
		{name: "short", in: []byte("AMSH\x01\x01\x1f"), wantErr: ErrBadHeader},
		{name: "long", in: []byte("AMSH\x01\x01\x1f\x90x"), wantErr: ErrBadHeader},
		{name: "bad_magic", in: []byte("GET / HT"), wantErr: ErrBadHeader},
		{name: "tls_record", in: []byte("\x16\x03\x01\x02\x00\x01\x00\x01"), wantErr: ErrBadHeader},
		{name: "version_0", in: []byte("AMSH\x00\x01\x1f\x90"), wantErr: ErrUnsupportedVersion},
		{name: "version_2", in: []byte("AMSH\x02\x01\x1f\x90"), wantErr: ErrUnsupportedVersion},
		{name: "unknown_command", in: []byte("AMSH\x01\x02\x1f\x90"), wantErr: ErrBadHeader},
		{name: "port_0", in: []byte("AMSH\x01\x01\x00\x00"), wantErr: ErrBadHeader},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			got, err := parseHeader(tc.in)
			if tc.wantErr != nil {
				if !errors.Is(err, tc.wantErr) {
					t.Fatalf("parseHeader(%q) error = %v, want %v", tc.in, err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("parseHeader(%q): %v", tc.in, err)
			}
			if got != tc.want {
				t.Fatalf("parseHeader(%q) = %+v, want %+v", tc.in, got, tc.want)
			}
		})
	}
}

func TestAppendHeaderRoundTrip(t *testing.T) {
	t.Parallel()
	for _, port := range []uint16{1, 443, 8080, 65535} {
		b := appendHeader(nil, port)
		if len(b) != headerLen {
			t.Fatalf("appendHeader(%d) length %d", port, len(b))
		}
		h, err := parseHeader(b)
		if err != nil || h.Port != port {
			t.Fatalf("parseHeader(appendHeader(%d)) = %+v, %v", port, h, err)
		}
	}
}

// FuzzHeader: the parser sees the first bytes of any authenticated peer. It
// must never panic, must accept only what appendHeader produces, and must
// classify every rejection.
func FuzzHeader(f *testing.F) {
	f.Add([]byte("AMSH\x01\x01\x1f\x90"))
	f.Add([]byte("AMSH\x02\x01\x1f\x90"))
	f.Add([]byte("AMSH\x01\x01\x00\x00"))
	f.Add([]byte("GET / HTTP/1.1\r\n"))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := parseHeader(b)
		if err != nil {
			if !errors.Is(err, ErrBadHeader) && !errors.Is(err, ErrUnsupportedVersion) {
				t.Fatalf("unclassified error %v", err)
			}
			return
		}
		if h.Port == 0 || h.Version != headerVersion1 || h.Command != commandConnect {
			t.Fatalf("accepted invalid header %+v", h)
		}
		if again := appendHeader(nil, h.Port); !bytes.Equal(again, b) {
			t.Fatalf("accepted %q, which re-encodes as %q", b, again)
		}
	})
}
