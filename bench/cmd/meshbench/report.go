package main

import (
	"bytes"
	"fmt"
	"math"
	"os"
	"runtime"
	"strconv"
	"strings"
	"time"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/plotutil"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
	"gonum.org/v1/plot/vg/vgimg"

	"github.com/agentmesh/agentmesh/internal/atomicfile"
)

// target is one goal of issue 6: a ratio between two measurements of the same run.
type target struct {
	what   string
	value  float64 // NaN when a mode it needs was not measured
	limit  float64
	atMost bool // met when value <= limit, else when value >= limit
}

func (t target) verdict() string {
	switch {
	case math.IsNaN(t.value):
		return "n/a"
	case t.atMost == (t.value <= t.limit):
		return "met"
	default:
		return "**missed**"
	}
}

// ratio is a/b, or NaN when either was not measured.
func ratio(a, b float64) float64 {
	if a <= 0 || b <= 0 || math.IsNaN(a) || math.IsNaN(b) {
		return math.NaN()
	}
	return a / b
}

func targets(results []*modeResult) []target {
	by := map[string]*modeResult{}
	for _, r := range results {
		by[r.name] = r
	}
	// Each accessor returns NaN for a mode that was not run.
	get := func(name string, f func(*modeResult) float64) float64 {
		if r := by[name]; r != nil {
			return f(r)
		}
		return math.NaN()
	}
	rate1 := func(r *modeResult) float64 { return r.newConn[0].rate() }
	rate16 := func(r *modeResult) float64 { return r.newConn[1].rate() }
	p50c1 := func(r *modeResult) float64 { return float64(r.newConn[0].p50) }
	cpu := func(r *modeResult) float64 { return r.cpuPer10k }
	upload := func(r *modeResult) float64 { return r.uploadMB }
	ping := func(i int) func(*modeResult) float64 {
		return func(r *modeResult) float64 { return float64(r.ping[i].p50) }
	}
	var ts []target
	for _, m := range []string{"h2", "quic"} {
		ts = append(ts,
			target{m + ": new connections/s (c=16) vs tls-full", ratio(get(m, rate16), get("tls-full", rate16)), 3, false},
			target{m + ": new-connection p50 (c=1) vs tls-full", ratio(get(m, p50c1), get("tls-full", p50c1)), 0.3, true})
	}
	ts = append(ts,
		target{"tls-resume: new connections/s (c=16) vs tls-full", ratio(get("tls-resume", rate16), get("tls-full", rate16)), 1.5, false},
		// The whole audit path (durable acknowledgement, the Merkle tree, witnessed
		// checkpoints: the default) costs at most 5% of the handshake rate, against
		// records acknowledged once queued and against no checkpoints during the run.
		target{"tls-full: new connections/s (c=1), full audit path vs queued ack", ratio(get("tls-full", rate1), get("tls-full-queued", rate1)), 0.95, false},
		target{"tls-full: new connections/s (c=16), full audit path vs queued ack", ratio(get("tls-full", rate16), get("tls-full-queued", rate16)), 0.95, false},
		target{"tls-full: new connections/s (c=1), checkpoints on vs off", ratio(get("tls-full", rate1), get("tls-full-nocheckpoint", rate1)), 0.95, false},
		target{"tls-full: new connections/s (c=16), checkpoints on vs off", ratio(get("tls-full", rate16), get("tls-full-nocheckpoint", rate16)), 0.95, false},
		target{"tls-full: proxy CPU per new connection vs reference", ratio(get("tls-full", cpu), get("reference", cpu)), 1.1, true})
	mesh := []string{"tls-full", "tls-resume", "h2", "quic"}
	for _, m := range mesh {
		for i, c := range concurrency {
			ts = append(ts, target{fmt.Sprintf("%s: persistent p50 (c=%d) vs reference", m, c),
				ratio(get(m, ping(i)), get("reference", ping(i))), 1.1, true})
		}
	}
	for _, m := range mesh {
		ts = append(ts, target{m + ": upload MB/s vs reference", ratio(get(m, upload), get("reference", upload)), 1.1, false})
	}
	for _, m := range mesh {
		v := math.NaN()
		if r := by[m]; r != nil && r.rotation != nil {
			v = ratio(float64(r.rotation.p99), float64(r.newConn[1].p99))
		}
		ts = append(ts, target{fmt.Sprintf("%s: new-connection p99 (c=%d) rotating vs not", m, concurrency[1]), v, 1.2, true})
	}
	return ts
}

// report renders the Markdown page.
func report(s settings, results []*modeResult, timings []timing, foreign float64, now time.Time) string {
	var b strings.Builder
	b.WriteString("# agentmesh benchmark\n\n")
	run := "full"
	if s.quick {
		run = "quick (BENCH_QUICK=1)"
	}
	fmt.Fprintf(&b, "- Run: %s UTC, %s: each new-connection and ping-pong phase is a %v warm-up then %v measured, "+
		"%d round(s), the modes taking turns; rotation phase %v; upload %s.\n",
		now.UTC().Format("2006-01-02 15:04"), run, s.phase.warmup, s.phase.measure, s.rounds, s.rotation, sizeName(s.bulk))
	fmt.Fprintf(&b, "- Machine: %s, %d CPUs, Linux %s, %s %s/%s.\n",
		cpuModel(), runtime.NumCPU(), readTrim("/proc/sys/kernel/osrelease"), runtime.Version(), runtime.GOOS, runtime.GOARCH)
	fmt.Fprintf(&b, "- Other activity (other processes, hypervisor steal) took %.0f%% of the machine's CPU during the run (near 0%% when undisturbed; "+
		"the more, the noisier the numbers).\n", foreign*100)
	b.WriteString("- Path: load generator → proxy → proxy → echo server, all on loopback, load generator and echo " +
		"server in one process. direct: no proxy; reference: two `bench/cmd/tlsrelay` (crypto/tls, mutual TLS 1.3, " +
		"full handshakes, io.Copy); tls-full: agentmesh `tls` with `resumption: false` and the whole audit path " +
		"(records fsynced before the handshake completes, Merkle tree, checkpoints every 1000 records or 10 s " +
		"witnessed by the CA); tls-full-queued: the same with `audit.ack: queued` (handshake records not waited " +
		"for on disk); tls-full-nocheckpoint: the same as tls-full with no checkpoint after the first; tls-resume: `tls` with " +
		"session resumption; h2 and quic: pooled transports. Latency is per request (connect to echo for a new " +
		"connection). Proxy CPU: user+system time of both proxy (or relay) processes from /proc during the " +
		"c=16 new-connection phase, warm-up included, per 10 000 connections.\n\n")

	b.WriteString("## New connection per request (connect, 64-byte echo, close)\n\n")
	row(&b, "mode", "c=1 conn/s", "p50", "p99", "c=16 conn/s", "p50", "p99", "proxy CPU s / 10k conn", "errors")
	row(&b, "---", "--:", "--:", "--:", "--:", "--:", "--:", "--:", "--:")
	for _, r := range results {
		row(&b, r.name, rate(&r.newConn[0]), fmtDur(r.newConn[0].p50), fmtDur(r.newConn[0].p99),
			rate(&r.newConn[1]), fmtDur(r.newConn[1].p50), fmtDur(r.newConn[1].p99), num(r.cpuPer10k, "%.2f"),
			fmt.Sprint(r.newConn[0].errs+r.newConn[1].errs))
	}

	fmt.Fprintf(&b, "\n## Persistent connections, %d-byte ping-pong\n\n", payload)
	row(&b, "mode", "c=1 req/s", "p50", "p99", "c=16 req/s", "p50", "p99", "errors")
	row(&b, "---", "--:", "--:", "--:", "--:", "--:", "--:", "--:")
	for _, r := range results {
		row(&b, r.name, rate(&r.ping[0]), fmtDur(r.ping[0].p50), fmtDur(r.ping[0].p99),
			rate(&r.ping[1]), fmtDur(r.ping[1].p50), fmtDur(r.ping[1].p99), fmt.Sprint(r.ping[0].errs+r.ping[1].errs))
	}

	fmt.Fprintf(&b, "\n## Upload of %s, and new connections (c=%d) while the client proxy rotates every second\n\n",
		sizeName(s.bulk), concurrency[1])
	row(&b, "mode", "upload MB/s", "p99 not rotating", "p99 rotating", "conn/s rotating", "rotations", "failed requests", "failed rotations")
	row(&b, "---", "--:", "--:", "--:", "--:", "--:", "--:", "--:")
	for _, r := range results {
		up := num(r.uploadMB, "%.0f")
		if r.uploadErr != nil {
			up = "error"
		}
		if r.rotation == nil {
			row(&b, r.name, up, "", "", "", "", "", "")
			continue
		}
		row(&b, r.name, up, fmtDur(r.newConn[1].p99), fmtDur(r.rotation.p99), rate(&r.rotation.stats),
			fmt.Sprint(r.rotation.rotations), fmt.Sprint(r.rotation.errs), fmt.Sprint(r.rotation.failed))
	}

	b.WriteString("\n## Tunnel handshakes (from the server proxy's audit log)\n\n")
	row(&b, "mode", "handshakes", "resumed", "agent connections", "connections per handshake")
	row(&b, "---", "--:", "--:", "--:", "--:")
	for _, r := range results {
		if r.kind != kindMesh || r.top == nil {
			continue
		}
		if r.audit == nil {
			row(&b, r.name, "unknown", "", fmt.Sprint(r.conns), "")
			continue
		}
		row(&b, r.name, fmt.Sprint(r.audit.handshakes), fmt.Sprint(r.audit.resumed), fmt.Sprint(r.conns),
			num(float64(r.conns)/float64(max(r.audit.handshakes, 1)), "%.1f"))
	}

	auditCost(&b, results)

	b.WriteString("\n## Targets (ratios within this run)\n\n")
	row(&b, "target", "measured", "required", "")
	row(&b, "---", "--:", "--:", "---")
	for _, t := range targets(results) {
		op := "≥"
		if t.atMost {
			op = "≤"
		}
		row(&b, t.what, num(t.value, "%.2f×"), op+" "+strconv.FormatFloat(t.limit, 'f', -1, 64)+"×", t.verdict())
	}

	if len(timings) > 0 {
		b.WriteString("\n## Timing targets\n\n")
		b.WriteString("The control paths' real-time targets, each on a pair of proxies of its own; the end-to-end\n" +
			"tests check the same behaviour with deadlines a loaded machine cannot miss.\n\n")
		row(&b, "target", "measured", "required", "")
		row(&b, "---", "--:", "--:", "---")
		for _, t := range timings {
			v := "n/a"
			if t.err == nil {
				v = fmtDur(t.value)
			}
			row(&b, t.what, v, "≤ "+t.limit.String(), t.verdict())
		}
	}

	var errs []string
	for _, r := range results {
		for _, e := range []error{r.err, r.newConn[0].firstErr, r.newConn[1].firstErr, r.ping[0].firstErr,
			r.ping[1].firstErr, r.uploadErr, rotationErr(r)} {
			if e != nil {
				errs = append(errs, fmt.Sprintf("- %s: %s", r.name, strings.ReplaceAll(e.Error(), "\n", " ")))
			}
		}
	}
	if len(errs) > 0 {
		b.WriteString("\n## Errors\n\n" + strings.Join(errs, "\n") + "\n")
	}
	return b.String()
}

func rotationErr(r *modeResult) error {
	if r.rotation == nil {
		return nil
	}
	if r.rotation.firstErr != nil {
		return r.rotation.firstErr
	}
	return r.rotation.rotErr
}

func row(b *strings.Builder, cells ...string) {
	b.WriteString("| " + strings.Join(cells, " | ") + " |\n")
}

func rate(s *stats) string {
	if s.ops() == 0 {
		return "-"
	}
	return fmt.Sprintf("%.0f", s.rate())
}

func num(v float64, format string) string {
	if math.IsNaN(v) || v == 0 {
		return "-"
	}
	return fmt.Sprintf(format, v)
}

func cpuModel() string {
	b, _ := os.ReadFile("/proc/cpuinfo")
	for line := range strings.Lines(string(b)) {
		if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return "unknown CPU"
}

func readTrim(path string) string {
	b, _ := os.ReadFile(path)
	return strings.TrimSpace(string(b))
}

// chart draws four bar charts by mode: new-connection rate, persistent p50, upload
// throughput and proxy CPU per connection.
func chart(results []*modeResult) ([]byte, error) {
	var names, proxied []string
	series := make([][]float64, 6)
	for _, r := range results {
		names = append(names, r.name)
		series[2] = append(series[2], float64(r.ping[0].p50)/float64(time.Microsecond))
		series[3] = append(series[3], float64(r.ping[1].p50)/float64(time.Microsecond))
		series[4] = append(series[4], r.uploadMB)
		series[5] = append(series[5], r.cpuPer10k)
		// Without handshakes, direct is tens of times faster: drawn, it would flatten the
		// bars being compared.
		if r.kind != kindDirect {
			proxied = append(proxied, r.name)
			series[0] = append(series[0], r.newConn[0].rate())
			series[1] = append(series[1], r.newConn[1].rate())
		}
	}
	levels := []string{fmt.Sprintf("c=%d", concurrency[0]), fmt.Sprintf("c=%d", concurrency[1])}
	panels := []struct {
		title, ylabel string
		names         []string
		series        [][]float64
		legend        []string
	}{
		{"New connection per request (direct not drawn)", "connections/s", proxied, series[0:2], levels},
		{fmt.Sprintf("Persistent %d-byte ping-pong", payload), "p50 latency (µs)", names, series[2:4], levels},
		{"Upload", "MB/s", names, series[4:5], nil},
		{"Proxy CPU, new connections", "CPU s per 10k connections", names, series[5:6], nil},
	}
	grid := [][]*plot.Plot{make([]*plot.Plot, 2), make([]*plot.Plot, 2)}
	for i, p := range panels {
		var err error
		if grid[i/2][i%2], err = bars(p.title, p.ylabel, p.names, p.series, p.legend); err != nil {
			return nil, err
		}
	}
	img := vgimg.New(vg.Points(900), vg.Points(640))
	dc := draw.New(img)
	tiles := draw.Tiles{Rows: 2, Cols: 2, PadX: vg.Points(20), PadY: vg.Points(20),
		PadTop: vg.Points(10), PadBottom: vg.Points(10), PadLeft: vg.Points(10), PadRight: vg.Points(10)}
	canvases := plot.Align(grid, tiles, dc)
	for i := range grid {
		for j := range grid[i] {
			grid[i][j].Draw(canvases[i][j])
		}
	}
	var buf bytes.Buffer
	if _, err := (vgimg.PngCanvas{Canvas: img}).WriteTo(&buf); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// bars is a grouped bar chart: one group per name, one bar per series.
func bars(title, ylabel string, names []string, series [][]float64, legend []string) (*plot.Plot, error) {
	p := plot.New()
	p.Title.Text = title
	p.Y.Label.Text = ylabel
	p.Legend.Top = true
	w := vg.Points(18)
	top := 0.0
	for i, vals := range series {
		vs := make(plotter.Values, len(vals))
		for j, v := range vals {
			if !math.IsNaN(v) && !math.IsInf(v, 0) {
				vs[j] = v // a mode not measured draws no bar
				top = max(top, v)
			}
		}
		b, err := plotter.NewBarChart(vs, w)
		if err != nil {
			return nil, err
		}
		b.LineStyle.Width = 0
		b.Color = plotutil.Color(i)
		b.Offset = w * vg.Length(float64(i)-float64(len(series)-1)/2)
		p.Add(b)
		if i < len(legend) {
			p.Legend.Add(legend[i], b)
		}
	}
	// Headroom above the highest bar keeps the legend off the bars.
	p.Y.Min, p.Y.Max = 0, max(top*1.25, 1)
	p.NominalX(names...)
	return p, nil
}

// writeFile replaces path atomically, so an interrupted run leaves the previous results.
func writeFile(path string, data []byte) error {
	return atomicfile.Write(path, data, 0o644)
}

// auditCost writes what the audit path costs the handshake rate: tls-full's new
// connections per second against the modes without durable acknowledgement or without
// checkpoints, and what the server proxy's log held (so that a run where checkpoints
// were not signed or not witnessed shows it).
func auditCost(b *strings.Builder, results []*modeResult) {
	// The modes that differ only in their audit path, the whole path first.
	auditModes := []string{"tls-full", "tls-full-queued", "tls-full-nocheckpoint"}
	by := map[string]*modeResult{}
	for _, r := range results {
		by[r.name] = r
	}
	full := by[auditModes[0]]
	if full == nil {
		return
	}
	b.WriteString("\n## Audit path cost (new connections per request, full handshakes)\n\n")
	row(b, "mode", "c=1 conn/s", "tls-full cost", "c=16 conn/s", "tls-full cost", "server log records", "signed size", "witnessed size")
	row(b, "---", "--:", "--:", "--:", "--:", "--:", "--:", "--:")
	cost := func(r *modeResult, i int) string {
		if r == full {
			return ""
		}
		return num(100*(1-ratio(full.newConn[i].rate(), r.newConn[i].rate())), "%+.1f%%")
	}
	for _, name := range auditModes {
		r := by[name]
		if r == nil {
			continue
		}
		records, signed, witnessed := "unknown", "", ""
		if r.audit != nil {
			records, signed, witnessed = fmt.Sprint(r.audit.records), fmt.Sprint(r.audit.signed), fmt.Sprint(r.audit.witnessed)
		}
		row(b, name, rate(&r.newConn[0]), cost(r, 0), rate(&r.newConn[1]), cost(r, 1), records, signed, witnessed)
	}
	b.WriteString("\ntls-full cost: how much lower tls-full's rate is than the mode's (negative: tls-full was faster, " +
		"within the noise). Signed and witnessed size: the tree size of the server proxy's latest checkpoint and of " +
		"the latest the CA cosigned, when it stopped.\n")
}
