package siem

import (
	"bytes"
	"strconv"
	"strings"
	"testing"
	"time"
)

func TestAppendFrame(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name, line, hostname, origin string
		want                         string
	}{
		{name: "record", hostname: "host-a", origin: "example.org/host/a/audit",
			line: `{"seq":7,"time":"2026-12-07T23:01:02.123456789Z","type":"handshake","prev":"00","result":"ok","hash":"ff"}`,
			want: `<110>1 2026-12-07T23:01:02.123456Z host-a agentmesh - handshake [agentmesh@32473 seq="7" origin="example.org/host/a/audit"] ` +
				`{"seq":7,"time":"2026-12-07T23:01:02.123456789Z","type":"handshake","prev":"00","result":"ok","hash":"ff"}`},
		{name: "offset time in UTC, whole seconds keep six digits", hostname: "h", origin: "o",
			line: `{"seq":7,"time":"2026-12-08T01:01:02+02:00","type":"x"}`,
			want: `<110>1 2026-12-07T23:01:02.000000Z h agentmesh - x [agentmesh@32473 seq="7" origin="o"] {"seq":7,"time":"2026-12-08T01:01:02+02:00","type":"x"}`},
		{name: "not a record", hostname: "", origin: `a"b\c]d`, line: `garbage`,
			want: `<110>1 - - agentmesh - - [agentmesh@32473 seq="7" origin="a\"b\\c\]d"] garbage`},
		{name: "header tokens lose spaces and stop at their bound", hostname: "my host", origin: "o",
			line: `{"time":"bad","type":"a type with spaces that is far longer than thirty-two octets"}`,
			want: `<110>1 - myhost agentmesh - atypewithspacesthatisfarlongerth [agentmesh@32473 seq="7" origin="o"] ` +
				`{"time":"bad","type":"a type with spaces that is far longer than thirty-two octets"}`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			frame, _ := appendFrame(nil, nil, 7, []byte(tc.line), tc.hostname, tc.origin)
			want := strconv.Itoa(len(tc.want)) + " " + tc.want
			if string(frame) != want {
				t.Errorf("frame\n%s\nwant\n%s", frame, want)
			}
		})
	}
}

func TestFilter(t *testing.T) {
	t.Parallel()
	streamsOut := Filter{Exclude: []Rule{{Type: "connection", Result: "ok"}}}
	onlyRefusals := Filter{Include: []Rule{{Result: "refused"}, {Type: "revocation"}}, Exclude: []Rule{{Type: "handshake"}}}
	tests := []struct {
		name         string
		f            Filter
		kind, result string
		want         bool
	}{
		{"no rules send all", Filter{}, "handshake", "ok", true},
		{"excluded type and result", streamsOut, "connection", "ok", false},
		{"same type, other result", streamsOut, "connection", "error", true},
		{"other type", streamsOut, "handshake", "ok", true},
		{"included by result", onlyRefusals, "rotation", "refused", true},
		{"included by type", onlyRefusals, "revocation", "", true},
		{"not included", onlyRefusals, "rotation", "ok", false},
		{"included, then excluded", onlyRefusals, "handshake", "refused", false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			if got := tc.f.pass(tc.kind, tc.result); got != tc.want {
				t.Errorf("pass(%q, %q) = %v, want %v", tc.kind, tc.result, got, tc.want)
			}
		})
	}
}

func TestResultOf(t *testing.T) {
	t.Parallel()
	for line, want := range map[string]string{
		`{"seq":1,"type":"handshake","result":"refused","hash":"x"}`: "refused",
		`{"seq":1,"type":"policy"}`:                                  "",
		`{"seq":1,"result":3}`:                                       "",
		`not json`:                                                   "",
	} {
		if got := resultOf([]byte(line)); got != want {
			t.Errorf("resultOf(%s) = %q, want %q", line, got, want)
		}
	}
}

// TestResendFrom: after a failure, delivery goes back to the first batch written less
// than the window before it, or goes on when every batch is older.
func TestResendFrom(t *testing.T) {
	t.Parallel()
	t0 := time.Date(2026, 12, 7, 23, 0, 0, 0, time.UTC)
	marks := []mark{{seq: 1, t: t0}, {seq: 50, t: t0.Add(time.Second)}, {seq: 80, t: t0.Add(2500 * time.Millisecond)}}
	tests := []struct {
		name string
		at   time.Duration
		want uint64
	}{
		{"all within the window", 1500 * time.Millisecond, 1},
		{"the first batch just out", 2 * time.Second, 50},
		{"the last batch only", 3200 * time.Millisecond, 80},
		{"all older: nothing again", 10 * time.Second, 100},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			d := &delivery{next: 100, marks: append([]mark(nil), marks...)}
			if got := d.resendFrom(t0.Add(tc.at), 2*time.Second); got != tc.want {
				t.Errorf("resendFrom(+%v) = %d, want %d", tc.at, got, tc.want)
			}
		})
	}
}

// FuzzFrame: any line makes one well-formed frame, whose length prefix counts the
// message and whose message ends with the line unchanged.
func FuzzFrame(f *testing.F) {
	f.Add([]byte(`{"seq":1,"time":"2026-12-07T23:01:02.123456789Z","type":"handshake","prev":"00","result":"ok","hash":"ff"}`), "host", "o")
	f.Add([]byte(`{"type":"`), "", `"]\`)
	f.Add([]byte{0xff, ' ', '"', '\n'}, "a b", "")
	f.Fuzz(func(t *testing.T, line []byte, hostname, origin string) {
		frame, _ := appendFrame(nil, nil, 42, line, hostname, origin)
		lenText, msg, ok := bytes.Cut(frame, []byte(" "))
		if !ok {
			t.Fatalf("no length prefix: %q", frame)
		}
		if n, err := strconv.Atoi(string(lenText)); err != nil || n != len(msg) {
			t.Fatalf("length %q for a message of %d octets", lenText, len(msg))
		}
		if !bytes.HasSuffix(msg, line) {
			t.Fatalf("message %q does not end with the line", msg)
		}
		if fields := bytes.SplitN(msg, []byte(" "), 7); len(fields) < 7 || !bytes.HasPrefix(fields[6], []byte("[agentmesh@32473 ")) {
			t.Fatalf("header fields of %q", msg)
		}
		_ = resultOf(line)
		_ = chained(line, 42, hashOf(line))
	})
}

func TestChained(t *testing.T) {
	t.Parallel()
	h1, h2 := strings.Repeat("1", 64), strings.Repeat("2", 64)
	line := `{"seq":5,"time":"t","type":"x","prev":"` + h1 + `","hash":"` + h2 + `"}`
	tests := []struct {
		name string
		line string
		seq  uint64
		prev string
		want bool
	}{
		{"follows", line, 5, h1, true},
		{"prev unknown", line, 5, "", true},
		{"another seq", line, 6, h1, false},
		{"another prev", line, 5, h2, false},
		{"the middle of a line", line[3:], 5, h1, false},
		{"no prev field", `{"seq":5,"type":"x"}`, 5, h1, true},
		{"not a record", `garbage`, 5, "", false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			var prev []byte
			if tc.prev != "" {
				prev = []byte(tc.prev)
			}
			if got := chained([]byte(tc.line), tc.seq, prev); got != tc.want {
				t.Errorf("chained = %v, want %v", got, tc.want)
			}
		})
	}
	if got := string(hashOf([]byte(line))); got != h2 {
		t.Errorf("hashOf = %q, want %q", got, h2)
	}
	if got := hashOf([]byte(`{"seq":5}`)); got != nil {
		t.Errorf("hashOf of a line without hash = %q", got)
	}
}
