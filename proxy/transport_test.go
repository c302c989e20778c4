package proxy

import "testing"

func TestChooseTransport(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		ours    []string
		accepts []string
		want    string
	}{
		{name: "defaults", ours: []string{"tls"}, accepts: nil, want: "tls"},
		{name: "peer_without_list_gets_tls", ours: []string{"h2", "quic", "tls"}, accepts: nil, want: "tls"},
		{name: "first_shared", ours: []string{"quic", "h2", "tls"}, accepts: []string{"h2", "quic"}, want: "quic"},
		{name: "our_order_wins", ours: []string{"h2", "quic"}, accepts: []string{"quic", "h2"}, want: "h2"},
		{name: "skips_unshared", ours: []string{"quic", "h2", "tls"}, accepts: []string{"h2", "tls"}, want: "h2"},
		{name: "tls_preferred", ours: []string{"tls", "h2"}, accepts: []string{"h2"}, want: "tls"},
		{name: "nothing_shared", ours: []string{"quic"}, accepts: []string{"h2"}, want: "tls"},
		{name: "peer_without_tls_still_gets_tls", ours: []string{"tls"}, accepts: []string{"h2"}, want: "tls"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			if got := chooseTransport(tc.ours, tc.accepts); got != tc.want {
				t.Fatalf("chooseTransport(%q, %q) = %q, want %q", tc.ours, tc.accepts, got, tc.want)
			}
		})
	}
}
