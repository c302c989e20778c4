package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// process is a child process whose stderr lines can be awaited.
type process struct {
	name string
	cmd  *exec.Cmd
	done chan struct{}
	err  error

	mu      sync.Mutex
	lines   []string // the last maxLines lines
	waiters []waiter
}

type waiter struct {
	re *regexp.Regexp
	ch chan struct{}
}

const maxLines = 2000

func startProcess(name string, cmd *exec.Cmd) (*process, error) {
	p := &process{name: name, cmd: cmd, done: make(chan struct{})}
	stderr, err := cmd.StderrPipe()
	if err != nil {
		return nil, err
	}
	cmd.Stdout = io.Discard
	dieWithParent(cmd)
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	go p.read(stderr)
	return p, nil
}

func (p *process) read(r io.Reader) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		p.mu.Lock()
		if len(p.lines) == maxLines {
			p.lines = append(p.lines[:0], p.lines[maxLines/2:]...)
		}
		p.lines = append(p.lines, line)
		kept := p.waiters[:0]
		for _, w := range p.waiters {
			if w.re.MatchString(line) {
				close(w.ch)
			} else {
				kept = append(kept, w)
			}
		}
		p.waiters = kept
		p.mu.Unlock()
	}
	p.err = p.cmd.Wait()
	close(p.done)
}

// await waits until the process has logged a line matching pattern.
func (p *process) await(ctx context.Context, pattern string, timeout time.Duration) error {
	re := regexp.MustCompile(pattern)
	w := waiter{re: re, ch: make(chan struct{})}
	p.mu.Lock()
	for _, l := range p.lines {
		if re.MatchString(l) {
			p.mu.Unlock()
			return nil
		}
	}
	p.waiters = append(p.waiters, w)
	p.mu.Unlock()
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case <-w.ch:
		return nil
	case <-p.done:
		return errors.Join(fmt.Errorf("%s exited before logging %q:\n%s", p.name, pattern, p.tail(15)), p.err)
	case <-t.C:
		return fmt.Errorf("%s did not log %q within %v:\n%s", p.name, pattern, timeout, p.tail(15))
	case <-ctx.Done():
		return ctx.Err()
	}
}

// tail returns the last n lines the process logged, indented.
func (p *process) tail(n int) string {
	p.mu.Lock()
	defer p.mu.Unlock()
	lines := p.lines[max(0, len(p.lines)-n):]
	return "    " + strings.Join(lines, "\n    ")
}

// exited reports an error if the process is no longer running.
func (p *process) exited() error {
	select {
	case <-p.done:
		return errors.Join(fmt.Errorf("%s exited:\n%s", p.name, p.tail(15)), p.err)
	default:
		return nil
	}
}

// stop sends SIGTERM and waits for the exit, killing the process after 15 s.
func (p *process) stop() {
	select {
	case <-p.done:
		return
	default:
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	t := time.NewTimer(15 * time.Second)
	defer t.Stop()
	select {
	case <-p.done:
	case <-t.C:
		_ = p.cmd.Process.Kill()
		<-p.done
	}
}

// clockTick is USER_HZ, the unit of /proc/PID/stat times: 100 on every Linux
// architecture Go supports.
const clockTick = 100

// cpu returns the user plus system CPU time the process has used so far.
func (p *process) cpu() (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p.cmd.Process.Pid))
	if err != nil {
		return 0, err
	}
	// The command name (field 2) may contain spaces: fields are counted after its ')'.
	i := strings.LastIndexByte(string(b), ')')
	if i < 0 {
		return 0, fmt.Errorf("malformed /proc/%d/stat", p.cmd.Process.Pid)
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 13 {
		return 0, fmt.Errorf("malformed /proc/%d/stat", p.cmd.Process.Pid)
	}
	utime, err1 := strconv.ParseInt(f[11], 10, 64) // field 14
	stime, err2 := strconv.ParseInt(f[12], 10, 64) // field 15
	if err := errors.Join(err1, err2); err != nil {
		return 0, err
	}
	return time.Duration(utime+stime) * time.Second / clockTick, nil
}

// machineCPU is a snapshot of the CPU time used on the whole machine and by this
// process with its waited-for children.
type machineCPU struct {
	at        time.Time
	all, ours time.Duration
}

func readMachineCPU() (machineCPU, error) {
	m := machineCPU{at: time.Now()}
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return m, err
	}
	// cpu user nice system idle iowait irq softirq steal ...
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	if len(f) < 9 || f[0] != "cpu" {
		return m, errors.New("malformed /proc/stat")
	}
	for i, v := range f[1:9] {
		if i == 3 || i == 4 { // idle, iowait
			continue
		}
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			return m, fmt.Errorf("/proc/stat: %w", err)
		}
		m.all += time.Duration(n) * time.Second / clockTick
	}
	if b, err = os.ReadFile("/proc/self/stat"); err != nil {
		return m, err
	}
	i := strings.LastIndexByte(string(b), ')')
	f = strings.Fields(string(b[i+1:]))
	if i < 0 || len(f) < 15 {
		return m, errors.New("malformed /proc/self/stat")
	}
	for _, v := range f[11:15] { // utime, stime, cutime, cstime
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			return m, fmt.Errorf("/proc/self/stat: %w", err)
		}
		m.ours += time.Duration(n) * time.Second / clockTick
	}
	return m, nil
}

// foreignShare is the share of the machine's CPU capacity between start and m that
// other processes used: anything well above zero means the run was disturbed.
func (m machineCPU) foreignShare(start machineCPU) float64 {
	capacity := m.at.Sub(start.at).Seconds() * float64(runtime.NumCPU())
	if capacity <= 0 {
		return 0
	}
	return max(0, ((m.all-start.all)-(m.ours-start.ours)).Seconds()/capacity)
}

// cpuOf sums the CPU time of procs.
func cpuOf(procs []*process) (time.Duration, error) {
	var sum time.Duration
	for _, p := range procs {
		d, err := p.cpu()
		if err != nil {
			return 0, err
		}
		sum += d
	}
	return sum, nil
}
