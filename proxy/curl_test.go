package proxy_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/proxy"
)

// TestCurl: stock curl, configured the ways agents are (flags and the
// proxy environment variables), reaches servers behind B through the
// explicit listener, and is refused properly where it must be.
//
// curl reads http_proxy only in lower case (HTTP_PROXY is ignored on
// purpose, see "httpoxy"); HTTPS_PROXY and ALL_PROXY in either case.
func TestCurl(t *testing.T) {
	t.Parallel()
	curl, err := exec.LookPath("curl")
	if err != nil {
		t.Skip("curl is not installed")
	}
	m := newCaptureMesh(t, nil)
	px := m.a.ExplicitAddr().String()
	web := fmt.Sprintf("127.0.0.1:%d", m.webPort)
	byName := fmt.Sprintf("localhost:%d", m.webPort)
	secure := fmt.Sprintf("127.0.0.1:%d", m.tlsPort)
	tests := []struct {
		name     string
		env      []string
		args     []string
		want     string // curl's output; with wantExit, a part of its error message
		wantExit int
		reason   proxy.Reason // for a refusal: the audit reason
	}{
		{name: "proxy_flag_absolute_uri", args: []string{"--proxy", "http://" + px, "http://" + web + "/a?b=c"},
			want: `GET /a?b=c host=` + web + ` proxy_connection="" close=true body=""`},
		{name: "proxy_flag_post", args: []string{"--proxy", "http://" + px, "--data", "hello", "http://" + web + "/up"},
			want: `POST /up host=` + web + ` proxy_connection="" close=true body="hello"`},
		{name: "proxytunnel_connect", args: []string{"--proxytunnel", "--proxy", "http://" + px, "http://" + web + "/t"},
			want: `GET /t host=` + web + ` proxy_connection="" close=false body=""`},
		{name: "socks5h_flag", args: []string{"-x", "socks5h://" + px, "http://" + byName + "/s"},
			want: `GET /s host=` + byName + ` proxy_connection="" close=false body=""`},
		{name: "socks5_flag", args: []string{"-x", "socks5://" + px, "http://" + web + "/s"},
			want: `GET /s host=` + web + ` proxy_connection="" close=false body=""`},
		{name: "https_proxy_env", env: []string{"HTTPS_PROXY=http://" + px}, args: []string{"--insecure", "https://" + secure + "/tls"},
			want: `GET /tls host=` + secure + ` proxy_connection="" close=false body=""`},
		{name: "http_proxy_env", env: []string{"http_proxy=http://" + px}, args: []string{"http://" + byName + "/e"},
			want: `GET /e host=` + byName + ` proxy_connection="" close=true body=""`},
		{name: "all_proxy_env_socks5h", env: []string{"ALL_PROXY=socks5h://" + px}, args: []string{"http://" + byName + "/all"},
			want: `GET /all host=` + byName + ` proxy_connection="" close=false body=""`},
		{name: "all_proxy_env_socks5", env: []string{"ALL_PROXY=socks5://" + px}, args: []string{"--insecure", "https://" + secure + "/all"},
			want: `GET /all host=` + secure + ` proxy_connection="" close=false body=""`},
		{name: "connect_denied", args: []string{"--proxytunnel", "--proxy", "http://" + px, "http://127.0.0.2:9/"},
			wantExit: 56, want: "403", reason: proxy.ReasonUnknownDestination},
		{name: "absolute_uri_denied", args: []string{"--fail", "--proxy", "http://" + px, "http://127.0.0.2:10/"},
			wantExit: 22, want: "403", reason: proxy.ReasonUnknownDestination},
		{name: "socks5_denied", args: []string{"-x", "socks5h://" + px, "http://127.0.0.2:11/"},
			wantExit: 97, want: "SOCKS", reason: proxy.ReasonUnknownDestination},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			from := m.a.audit.len()
			ctx, cancel := context.WithTimeout(t.Context(), waitLimit)
			defer cancel()
			// -q first: no ~/.curlrc. A clean environment: no NO_PROXY
			// or proxy variable of the machine running the test.
			args := append([]string{"-q", "--silent", "--show-error", "--max-time", "15"}, tc.args...)
			cmd := exec.CommandContext(ctx, curl, args...)
			cmd.Env = append([]string{"PATH=" + os.Getenv("PATH"), "HOME=" + t.TempDir()}, tc.env...)
			var stdout, stderr bytes.Buffer
			cmd.Stdout, cmd.Stderr = &stdout, &stderr
			err := cmd.Run()
			var exit *exec.ExitError
			switch {
			case tc.wantExit == 0 && err != nil:
				t.Fatalf("curl %s: %v: %s", strings.Join(args, " "), err, stderr.Bytes())
			case tc.wantExit == 0:
				if stdout.String() != tc.want {
					t.Fatalf("curl printed %q, want %q", stdout.Bytes(), tc.want)
				}
				// It really went through the mesh.
				rec := waitForFrom(t, m.a.audit, from, "closed", func(audit.Connection) bool { return true })
				if rec.PeerID != idB.String() {
					t.Fatalf("connection record %+v, want a tunnel to %s", rec, idB)
				}
			case !errors.As(err, &exit) || exit.ExitCode() != tc.wantExit:
				t.Fatalf("curl %s: %v, want exit code %d: %s", strings.Join(args, " "), err, tc.wantExit, stderr.Bytes())
			default:
				if !strings.Contains(stdout.String()+stderr.String(), tc.want) {
					t.Fatalf("curl said %q %q, want it to mention %q", stdout.Bytes(), stderr.Bytes(), tc.want)
				}
				waitForFrom(t, m.a.audit, from, string(tc.reason), func(h audit.Handshake) bool { return h.Reason == string(tc.reason) })
			}
		})
	}
}
