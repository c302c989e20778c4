package sockowner

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/netip"
	"os"
)

// procEntry is one socket row of /proc/net/tcp or /proc/net/tcp6.
type procEntry struct {
	local, remote netip.AddrPort
	state         uint8
	uid           uint32
	inode         uint64 // 0: no process holds the socket
}

// procUID finds the socket by scanning the kernel's text tables: IPv4 sockets are in
// tcp, IPv6 ones (dual-stack sockets talking IPv4 included, with mapped addresses) in
// tcp6.
func procUID(q query) (uint32, error) {
	tables := []string{"tcp6"}
	if q.local.Addr().Is4() {
		tables = []string{"tcp", "tcp6"}
	}
	for _, name := range tables {
		uid, err := scanProcTable(name, q)
		if !errors.Is(err, ErrNotFound) {
			return uid, err
		}
	}
	return 0, ErrNotFound
}

func scanProcTable(name string, q query) (uint32, error) {
	f, err := openProcNet(name)
	if errors.Is(err, fs.ErrNotExist) {
		// No such table: IPv6 is disabled.
		return 0, ErrNotFound
	}
	if err != nil {
		return 0, err
	}
	defer func() { _ = f.Close() }() // read only
	var uid uint32
	found := false
	err = scanProcNet(f, func(e procEntry) bool {
		// Rows without an inode are sockets no process holds; the kernel shows
		// uid 0 for some of them. Listeners only match an all-zero remote address.
		if e.inode == 0 || e.state == tcpListen ||
			unmapAddrPort(e.local) != q.local || unmapAddrPort(e.remote) != q.remote {
			return true
		}
		uid, found = e.uid, true
		return false
	})
	if err != nil {
		return 0, fmt.Errorf("%s: %w", f.Name(), err)
	}
	if !found {
		return 0, ErrNotFound
	}
	return uid, nil
}

// openProcNet opens a table of the process's network namespace.
func openProcNet(name string) (*os.File, error) {
	return os.Open("/proc/self/net/" + name)
}

// scanProcNet parses a /proc/net/tcp or /proc/net/tcp6 table and calls fn with each
// socket row until fn returns false. The first line must be the column header. A
// malformed row ends the scan with an error: the format has been fixed for decades, so
// a surprise is reported rather than silently skipped.
func scanProcNet(r io.Reader, fn func(procEntry) bool) error {
	sc := bufio.NewScanner(r)
	if !sc.Scan() {
		if err := sc.Err(); err != nil {
			return err
		}
		return errors.New("empty socket table")
	}
	if f, _ := nextField(sc.Bytes()); string(f) != "sl" {
		return errors.New("socket table without its header line")
	}
	for line := 2; sc.Scan(); line++ {
		e, err := parseProcNetRow(sc.Bytes())
		if err != nil {
			return fmt.Errorf("line %d: %w", line, err)
		}
		if !fn(e) {
			return nil
		}
	}
	return sc.Err()
}

var errProcRow = errors.New("malformed socket row")

// parseProcNetRow parses one row as the kernel prints it (tcp4_seq_show,
// tcp6_seq_show):
//
//	sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode ...
//
// Addresses are the raw in-memory words of the address in hex, so their byte order is
// the host's; ports and the state are plain hex numbers.
func parseProcNetRow(row []byte) (procEntry, error) {
	var e procEntry
	var f [10][]byte
	rest := row
	for i := range f {
		f[i], rest = nextField(rest)
		if len(f[i]) == 0 {
			return procEntry{}, errProcRow
		}
	}
	sl := f[0]
	if sl[len(sl)-1] != ':' {
		return procEntry{}, errProcRow
	}
	if _, ok := parseDec(sl[:len(sl)-1], 32); !ok {
		return procEntry{}, errProcRow
	}
	var ok1, ok2 bool
	e.local, ok1 = parseProcAddrPort(f[1])
	e.remote, ok2 = parseProcAddrPort(f[2])
	if !ok1 || !ok2 || e.local.Addr().BitLen() != e.remote.Addr().BitLen() || len(f[3]) != 2 {
		return procEntry{}, errProcRow
	}
	st, ok := parseHex(f[3])
	if !ok {
		return procEntry{}, errProcRow
	}
	e.state = uint8(st)
	uid, ok := parseDec(f[7], 32)
	if !ok {
		return procEntry{}, errProcRow
	}
	e.uid = uint32(uid)
	if e.inode, ok = parseDec(f[9], 64); !ok {
		return procEntry{}, errProcRow
	}
	return e, nil
}

// parseProcAddrPort parses "0100007F:1F90" (IPv4, 8 hex digits) or the IPv6 form with
// 32 hex digits: 4-byte words in host order, then a 4-digit port.
func parseProcAddrPort(b []byte) (netip.AddrPort, bool) {
	i := bytes.IndexByte(b, ':')
	if i < 0 || len(b)-i-1 != 4 {
		return netip.AddrPort{}, false
	}
	port, ok := parseHex(b[i+1:])
	if !ok {
		return netip.AddrPort{}, false
	}
	hex := b[:i]
	var raw [16]byte
	if len(hex) != 8 && len(hex) != 32 {
		return netip.AddrPort{}, false
	}
	for w := 0; w*8 < len(hex); w++ {
		v, ok := parseHex(hex[w*8 : w*8+8])
		if !ok {
			return netip.AddrPort{}, false
		}
		binary.NativeEndian.PutUint32(raw[w*4:], uint32(v))
	}
	var a netip.Addr
	if len(hex) == 8 {
		a = netip.AddrFrom4([4]byte(raw[:4]))
	} else {
		a = netip.AddrFrom16(raw)
	}
	return netip.AddrPortFrom(a, uint16(port)), true
}

// nextField splits off the first field of b, fields being separated by spaces or tabs.
func nextField(b []byte) (field, rest []byte) {
	i := 0
	for i < len(b) && (b[i] == ' ' || b[i] == '\t') {
		i++
	}
	j := i
	for j < len(b) && b[j] != ' ' && b[j] != '\t' {
		j++
	}
	return b[i:j], b[j:]
}

// parseHex parses up to 8 hex digits of either case.
func parseHex(b []byte) (uint64, bool) {
	if len(b) == 0 || len(b) > 8 {
		return 0, false
	}
	var v uint64
	for _, c := range b {
		switch {
		case '0' <= c && c <= '9':
			c -= '0'
		case 'a' <= c && c <= 'f':
			c -= 'a' - 10
		case 'A' <= c && c <= 'F':
			c -= 'A' - 10
		default:
			return 0, false
		}
		v = v<<4 | uint64(c)
	}
	return v, true
}

// parseDec parses an unsigned decimal that fits in bits bits.
func parseDec(b []byte, bits uint) (uint64, bool) {
	if len(b) == 0 || len(b) > 20 {
		return 0, false
	}
	var v uint64
	limit := uint64(1)<<bits - 1
	if bits == 64 {
		limit = ^uint64(0)
	}
	for _, c := range b {
		if c < '0' || c > '9' {
			return 0, false
		}
		d := uint64(c - '0')
		if v > (limit-d)/10 {
			return 0, false
		}
		v = v*10 + d
	}
	return v, true
}
