// Command meshbench measures what agentmesh costs on the 2-hop path
// client → proxy → proxy → echo server, on loopback, against no proxy at all and against
// a minimal crypto/tls relay (bench/cmd/tlsrelay), for each tunnel transport. It builds
// and runs the real binary: an `agentmesh ca` with SoftHSM and two `agentmesh proxy`
// processes per mode. The echo server and the load generator run in this process.
//
// It writes bench/results/results.md and bench/results/chart.png and prints progress on
// stderr. BENCH_QUICK=1 runs for about a minute, for CI. It exits non-zero when a mode
// had errors or a file could not be written; it never fails on speed.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"math"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

type kind int

const (
	kindDirect kind = iota // the load generator talks to the echo server itself
	kindRelay              // the reference relays
	kindMesh               // two agentmesh proxies
)

// mode is one way of carrying the load generator's connections to the echo server.
type mode struct {
	name      string
	kind      kind
	config    string // YAML added to both proxies' configuration
	transport string // the route's transport, "" for the default
}

var allModes = []mode{
	{name: "direct", kind: kindDirect},
	{name: "reference", kind: kindRelay},
	// tls-full runs the whole audit path, as by default: each handshake record is
	// acknowledged once fsynced (group commit), hashed into the Merkle tree, and a
	// checkpoint is signed every 1000 records or 10 s and witnessed by the CA.
	{name: "tls-full", kind: kindMesh, config: "resumption: false\n"},
	// tls-full with handshake records acknowledged once queued rather than fsynced: what
	// durable acknowledgement costs the handshake rate.
	{name: "tls-full-queued", kind: kindMesh, config: "resumption: false\naudit:\n  ack: queued\n"},
	// tls-full without checkpoints during the run (only the one every log signs when it
	// opens): what signing and witnessing cost the handshake rate.
	{name: "tls-full-nocheckpoint", kind: kindMesh, config: "resumption: false\naudit:\n  checkpoint_records: 1000000000\n  checkpoint_interval: 8760h\n"},
	{name: "tls-resume", kind: kindMesh},
	{name: "h2", kind: kindMesh, config: "transports: [h2, tls]\n", transport: "h2"},
	{name: "quic", kind: kindMesh, config: "transports: [quic, tls]\n", transport: "quic"},
}

// concurrency holds the levels of the new-connection and ping-pong phases.
var concurrency = [2]int{1, 16}

// settings are the durations and sizes of a run.
type settings struct {
	quick     bool
	phase     phase         // every new-connection and ping-pong phase
	rounds    int           // how often each of those phases runs, taking turns between modes
	rotation  time.Duration // the rotation phase
	bulk      int64         // bytes uploaded
	modes     []mode
	agentmesh string // a prebuilt binary, or "" to build one
	out       string
}

// modeResult is everything measured for one mode.
type modeResult struct {
	mode
	top       *topology
	err       error    // the mode could not be set up or broke down
	newConn   [2]stats // at concurrency[0] and concurrency[1]
	ping      [2]stats
	cpu       time.Duration // proxy CPU time during the new-connection phases at the highest concurrency
	cpuConns  int           // connections made during them
	cpuPer10k float64       // proxy CPU seconds per 10 000 new connections; NaN when not measured
	conns     int           // agent connections made, roughly: failed attempts may count
	audit     *auditSummary // the server proxy's audit log after the run; nil if unknown
	uploadMB  float64       // MB/s
	uploadErr error
	rotation  *rotationResult // mesh modes only
}

// failures counts every failed request, rotation and setup of the mode.
func (r *modeResult) failures() int {
	n := r.newConn[0].errs + r.newConn[1].errs + r.ping[0].errs + r.ping[1].errs
	if r.err != nil {
		n++
	}
	if r.uploadErr != nil {
		n++
	}
	if r.rotation != nil {
		n += r.rotation.errs + r.rotation.failed
	}
	return n
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := 0
	if err := run(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "meshbench:", err)
		code = 1
	}
	stop()
	os.Exit(code)
}

func run(ctx context.Context) error {
	s, err := parseSettings()
	if err != nil {
		return err
	}
	started := time.Now()
	logf := func(format string, args ...any) {
		fmt.Fprintf(os.Stderr, "meshbench [%5.1fs] %s\n", time.Since(started).Seconds(), fmt.Sprintf(format, args...))
	}
	dir, err := os.MkdirTemp("", "meshbench-")
	if err != nil {
		return err
	}
	defer func() {
		if err := os.RemoveAll(dir); err != nil {
			logf("remove %s: %v", dir, err)
		}
	}()

	logf("building agentmesh and tlsrelay")
	binary, relay, err := buildBinaries(ctx, dir, s.agentmesh)
	if err != nil {
		return err
	}
	echo, err := startEcho()
	if err != nil {
		return err
	}
	defer echo.close()
	cpuStart, err := readMachineCPU()
	if err != nil {
		return err
	}

	// Every mode's topology runs for the whole benchmark and the phases take turns
	// between modes, round after round: a drift in the machine's speed then spreads
	// over all modes instead of skewing the ones measured during it. Idle proxies
	// cost next to nothing.
	var ca *meshCA
	var pki *relayPKI
	var live []*modeResult
	results := make([]*modeResult, len(s.modes))
	for i, m := range s.modes {
		r := &modeResult{mode: m, cpuPer10k: math.NaN()}
		results[i] = r
		switch {
		case m.kind == kindMesh && ca == nil:
			logf("starting agentmesh ca (SoftHSM)")
			if ca, err = startCA(ctx, binary, dir); err != nil {
				return err
			}
			defer ca.stop()
		case m.kind == kindRelay && pki == nil:
			if pki, err = newRelayPKI(dir); err != nil {
				return err
			}
		}
		logf("%s: starting", m.name)
		switch m.kind {
		case kindDirect:
			r.top = &topology{addr: echo.addr()}
		case kindRelay:
			r.top, r.err = startRelays(ctx, relay, pki, echo.addr())
		case kindMesh:
			r.top, r.err = startMesh(ctx, ca, dir, m, echo.port())
		}
		if r.err != nil {
			logf("%s: failed: %v", m.name, r.err)
			continue
		}
		defer r.top.stop()
		live = append(live, r)
	}

	if err := measure(ctx, s, binary, live, logf); err != nil {
		return err
	}
	var timings []timing
	if ca != nil {
		timings = timingScenarios(ctx, ca, dir, echo.port(), logf)
	}
	for _, r := range live {
		if err := r.top.healthy(); err != nil {
			r.err = err
			logf("%s: failed: %v", r.name, err)
		} else if r.failures() > 0 {
			// The proxies usually say why their clients saw errors.
			for _, p := range r.top.procs {
				logf("%s: %s: last lines logged:\n%s", r.name, p.name, p.tail(8))
			}
		}
	}

	// Stopped and waited for, the children's CPU time counts as this process's.
	for _, r := range live {
		r.top.stop()
		if r.top.server != nil {
			if sum, err := r.top.server.auditLog(); err != nil {
				logf("%s: %v", r.name, err)
			} else {
				r.audit = &sum
			}
		}
	}
	if ca != nil {
		ca.stop()
	}
	cpuEnd, err := readMachineCPU()
	if err != nil {
		return err
	}
	md := report(s, results, timings, cpuEnd.foreignShare(cpuStart), time.Now())
	if err := os.MkdirAll(s.out, 0o755); err != nil { //nolint:gosec // G301: the results are published, for anyone to read
		return err
	}
	errs := []error{writeFile(filepath.Join(s.out, "results.md"), []byte(md))}
	if png, err := chart(results); err != nil {
		errs = append(errs, fmt.Errorf("chart: %w", err))
	} else {
		errs = append(errs, writeFile(filepath.Join(s.out, "chart.png"), png))
	}
	fmt.Print(md)
	logf("wrote %s and %s", filepath.Join(s.out, "results.md"), filepath.Join(s.out, "chart.png"))
	for _, r := range results {
		if n := r.failures(); n > 0 {
			errs = append(errs, fmt.Errorf("%s: %d failures", r.name, n))
		}
	}
	for _, t := range timings {
		if t.err != nil {
			errs = append(errs, fmt.Errorf("timing: %s: %w", t.what, t.err))
		}
	}
	return errors.Join(errs...)
}

// measure runs every phase for every mode of rs: the new-connection and ping-pong phases
// round-robin over the modes for s.rounds rounds, then the uploads, then the rotation
// runs, which leave the proxies with new credentials and so come last.
func measure(ctx context.Context, s settings, binary string, rs []*modeResult, logf func(string, ...any)) error {
	for round := 1; round <= s.rounds; round++ {
		tag := ""
		if s.rounds > 1 {
			tag = fmt.Sprintf("round %d/%d: ", round, s.rounds)
		}
		for i, c := range concurrency {
			for _, r := range rs {
				// The CPU cost is taken at the highest concurrency, where the proxies are
				// busiest and their idle overhead weighs least.
				cpu := i == len(concurrency)-1 && len(r.top.procs) > 0
				var before time.Duration
				var cpuErr error
				if cpu {
					before, cpuErr = cpuOf(r.top.procs)
				}
				st := newConnections(r.top.addr, c, s.phase)
				if cpu && cpuErr == nil {
					after, err := cpuOf(r.top.procs)
					if err == nil {
						r.cpu += after - before
						r.cpuConns += st.total
					}
				}
				logf("%s%s: new connection per request, c=%d: %v", tag, r.name, c, &st)
				r.newConn[i].add(st)
				r.conns += st.total
				if ctx.Err() != nil {
					return ctx.Err()
				}
			}
		}
		for i, c := range concurrency {
			for _, r := range rs {
				st := pingPong(r.top.addr, c, s.phase)
				logf("%s%s: persistent %d-byte ping-pong, c=%d: %v", tag, r.name, payload, c, &st)
				r.ping[i].add(st)
				r.conns += c
				if ctx.Err() != nil {
					return ctx.Err()
				}
			}
		}
	}
	for _, r := range rs {
		for i := range concurrency {
			r.newConn[i].finish()
			r.ping[i].finish()
		}
		if r.cpuConns > 0 {
			r.cpuPer10k = r.cpu.Seconds() * 10000 / float64(r.cpuConns)
		}
	}
	for _, r := range rs {
		// A smaller upload first, so buffers and windows have grown as they would in use.
		if _, err := upload(ctx, r.top.addr, min(s.bulk/8, 64<<20)); err != nil {
			r.uploadErr = fmt.Errorf("warm-up: %w", err)
		} else {
			r.uploadMB, r.uploadErr = upload(ctx, r.top.addr, s.bulk)
		}
		r.conns += 2
		if r.uploadErr != nil {
			logf("%s: upload %s: %v", r.name, sizeName(s.bulk), r.uploadErr)
		} else {
			logf("%s: upload %s: %.0f MB/s", r.name, sizeName(s.bulk), r.uploadMB)
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
	}
	c := concurrency[len(concurrency)-1]
	for _, r := range rs {
		if r.top.client == nil {
			continue
		}
		rot := underRotation(ctx, r.top.addr, c, s.rotation, func(ctx context.Context) error {
			return r.top.client.rotate(ctx, binary)
		})
		r.rotation = &rot
		r.conns += rot.total
		logf("%s: new connections c=%d while rotating every second: %v, %d rotations, %d failed rotations",
			r.name, c, &rot.stats, rot.rotations, rot.failed)
		if rot.rotErr != nil {
			logf("%s: first failed rotation: %v", r.name, rot.rotErr)
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
	}
	return nil
}

func parseSettings() (settings, error) {
	quick := os.Getenv("BENCH_QUICK") != "" && os.Getenv("BENCH_QUICK") != "0"
	s := settings{quick: quick, phase: phase{warmup: time.Second, measure: 4 * time.Second}, rounds: 3,
		rotation: 10 * time.Second, bulk: 1 << 30}
	if quick {
		// About a minute in all; the CA and the eight proxies take a few seconds to enrol.
		s.phase, s.rounds, s.rotation, s.bulk = phase{warmup: 400 * time.Millisecond, measure: 1200 * time.Millisecond}, 1, 3*time.Second, 64<<20
	}
	root, err := moduleRoot()
	if err != nil {
		return s, err
	}
	var modes string
	flag.DurationVar(&s.phase.warmup, "warmup", s.phase.warmup, "warm-up before each measured phase")
	flag.DurationVar(&s.phase.measure, "duration", s.phase.measure, "length of each measured phase")
	flag.IntVar(&s.rounds, "rounds", s.rounds, "rounds of the new-connection and ping-pong phases")
	flag.DurationVar(&s.rotation, "rotation", s.rotation, "length of the rotation phase")
	flag.Int64Var(&s.bulk, "bulk", s.bulk, "bytes to upload")
	flag.StringVar(&modes, "modes", "", "comma-separated subset of the modes (default all): "+modeNames())
	flag.StringVar(&s.agentmesh, "agentmesh", "", "use this agentmesh binary instead of building ./cmd/agentmesh")
	flag.StringVar(&s.out, "out", filepath.Join(root, "results"), "directory for results.md and chart.png")
	flag.Parse()
	if s.phase.measure <= 0 || s.rounds <= 0 || s.rotation <= 0 || s.bulk <= 0 {
		return s, errors.New("-duration, -rounds, -rotation and -bulk must be positive")
	}
	s.modes = allModes
	if modes != "" {
		s.modes = nil
		for name := range strings.SplitSeq(modes, ",") {
			i := indexMode(strings.TrimSpace(name))
			if i < 0 {
				return s, fmt.Errorf("unknown mode %q: %s", name, modeNames())
			}
			s.modes = append(s.modes, allModes[i])
		}
	}
	return s, nil
}

// moduleRoot is the directory of the bench module's go.mod, so the default output
// directory does not depend on where the command is run from.
func moduleRoot() (string, error) {
	out, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOMOD: %w", err)
	}
	mod := strings.TrimSpace(string(out))
	if mod == "" || mod == os.DevNull {
		return "", errors.New("run meshbench inside the agentmesh bench module")
	}
	return filepath.Dir(mod), nil
}

func indexMode(name string) int {
	for i, m := range allModes {
		if m.name == name {
			return i
		}
	}
	return -1
}

func modeNames() string {
	var names []string
	for _, m := range allModes {
		names = append(names, m.name)
	}
	return strings.Join(names, ",")
}

func sizeName(n int64) string {
	if n >= 1<<30 && n%(1<<30) == 0 {
		return fmt.Sprintf("%d GiB", n>>30)
	}
	return fmt.Sprintf("%d MiB", n>>20)
}
