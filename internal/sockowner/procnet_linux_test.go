package sockowner

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"testing"
)

const procHeader = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"

// The rows below are real kernel output, which spells addresses in host byte order.
func requireLittleEndian(t testing.TB) {
	t.Helper()
	if binary.NativeEndian.Uint16([]byte{1, 0}) != 1 {
		t.Skip("test rows are spelled for a little-endian host")
	}
}

func TestParseProcNetRow(t *testing.T) {
	t.Parallel()
	requireLittleEndian(t)
	cases := []struct {
		name string
		row  string
		want procEntry
	}{
		{
			name: "ipv4 listener",
			row:  "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 12345 1 0000000000000000 100 0 0 10 0",
			want: procEntry{local: netip.MustParseAddrPort("127.0.0.1:8080"), remote: netip.MustParseAddrPort("0.0.0.0:0"), state: 0x0A, uid: 1000, inode: 12345},
		},
		{
			name: "ipv4 established",
			row:  "  12: 0100007F:A0FB 0200007F:C634 01 00000000:00000000 00:00000000 00000000 65534        0 987654 1 0000000000000000 20 4 30 10 -1",
			want: procEntry{local: netip.MustParseAddrPort("127.0.0.1:41211"), remote: netip.MustParseAddrPort("127.0.0.2:50740"), state: 1, uid: 65534, inode: 987654},
		},
		{
			name: "ipv6 time-wait, fewer columns",
			row:  "   0: 00000000000000000000000001000000:9695 00000000000000000000000001000000:CF1A 06 00000000:00000000 03:00000CF3 00000000     0        0 0 3 000000002196c830",
			want: procEntry{local: netip.MustParseAddrPort("[::1]:38549"), remote: netip.MustParseAddrPort("[::1]:53018"), state: 6},
		},
		{
			name: "dual-stack socket, ipv4-mapped",
			row:  "   1: 0000000000000000FFFF00000100007F:A0FB 0000000000000000FFFF00000100007F:C634 01 00000000:00000000 00:00000000 00000000     0        0 4242 1 00000000a0cf1066 20 4 30 10 -1",
			want: procEntry{local: netip.MustParseAddrPort("[::ffff:127.0.0.1]:41211"), remote: netip.MustParseAddrPort("[::ffff:127.0.0.1]:50740"), state: 1, inode: 4242},
		},
		{
			name: "link-local ipv6",
			row:  "   2: 000080FE00000000FF00FC00010000FE:E1C8 000080FE00000000FF00FC00010000FE:0050 01 00000000:00000000 00:00000000 00000000   104        0 31337 1 0000000000000000 20 4 30 10 -1",
			want: procEntry{local: netip.MustParseAddrPort("[fe80::fc:ff:fe00:1]:57800"), remote: netip.MustParseAddrPort("[fe80::fc:ff:fe00:1]:80"), state: 1, uid: 104, inode: 31337},
		},
		{
			name: "max uid and inode",
			row:  "0: 0100007F:0001 0100007F:0002 01 0:0 0:0 0 4294967295 0 18446744073709551615",
			want: procEntry{local: netip.MustParseAddrPort("127.0.0.1:1"), remote: netip.MustParseAddrPort("127.0.0.1:2"), state: 1, uid: 1<<32 - 1, inode: 1<<64 - 1},
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			got, err := parseProcNetRow([]byte(tc.row))
			if err != nil || got != tc.want {
				t.Fatalf("parseProcNetRow = %+v, %v; want %+v", got, err, tc.want)
			}
		})
	}
}

func TestParseProcNetRowMalformed(t *testing.T) {
	t.Parallel()
	const fields = " 01 00000000:00000000 00:00000000 00000000  1000        0 12345"
	cases := []struct{ name, row string }{
		{"empty", ""},
		{"too few columns", "   0: 0100007F:1F90 0100007F:0050 01 00000000:00000000 00:00000000 00000000  1000 0"},
		{"slot without colon", "   0 0100007F:1F90 0100007F:0050" + fields},
		{"slot not a number", "   x: 0100007F:1F90 0100007F:0050" + fields},
		{"short address", "   0: 0100007:1F90 0100007F:0050" + fields},
		{"address of 12 digits", "   0: 0100007F0000:1F90 0100007F0000:0050" + fields},
		{"address not hex", "   0: 0100007G:1F90 0100007F:0050" + fields},
		{"address without port", "   0: 0100007F 0100007F:0050" + fields},
		{"long port", "   0: 0100007F:1F900 0100007F:0050" + fields},
		{"short port", "   0: 0100007F:1F9 0100007F:0050" + fields},
		{"port not hex", "   0: 0100007F:1F9Z 0100007F:0050" + fields},
		{"mixed families", "   0: 0100007F:1F90 00000000000000000000000001000000:0050" + fields},
		{"long state", "   0: 0100007F:1F90 0100007F:0050 010 00000000:00000000 00:00000000 00000000  1000        0 12345"},
		{"state not hex", "   0: 0100007F:1F90 0100007F:0050 0x 00000000:00000000 00:00000000 00000000  1000        0 12345"},
		{"uid over 32 bits", "   0: 0100007F:1F90 0100007F:0050 01 00000000:00000000 00:00000000 00000000  4294967296        0 12345"},
		{"negative uid", "   0: 0100007F:1F90 0100007F:0050 01 00000000:00000000 00:00000000 00000000  -1        0 12345"},
		{"inode over 64 bits", "   0: 0100007F:1F90 0100007F:0050 01 00000000:00000000 00:00000000 00000000  1000        0 18446744073709551616"},
		{"inode not a number", "   0: 0100007F:1F90 0100007F:0050 01 00000000:00000000 00:00000000 00000000  1000        0 12a45"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			if e, err := parseProcNetRow([]byte(tc.row)); !errors.Is(err, errProcRow) {
				t.Fatalf("parseProcNetRow = %+v, %v; want errProcRow", e, err)
			}
		})
	}
}

func TestScanProcNet(t *testing.T) {
	t.Parallel()
	requireLittleEndian(t)
	const (
		row0 = "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 12345 1 0000000000000000 100 0 0 10 0\n"
		row1 = "   1: 0100007F:A0FB 0100007F:1F90 01 00000000:00000000 00:00000000 00000000  1000        0 12346 1 0000000000000000 20 4 30 10 -1\n"
		bad  = "   2: garbage\n"
	)
	cases := []struct {
		name    string
		table   string
		stopAt  int // stop after this many rows; 0: never
		rows    int
		wantErr bool
	}{
		{name: "header only", table: procHeader},
		{name: "two rows", table: procHeader + row0 + row1, rows: 2},
		{name: "stops when told", table: procHeader + row0 + row1 + bad, stopAt: 1, rows: 1},
		{name: "no trailing newline", table: procHeader + strings.TrimSuffix(row0, "\n"), rows: 1},
		{name: "empty", table: "", wantErr: true},
		{name: "no header", table: row0 + row1, wantErr: true},
		{name: "malformed row", table: procHeader + row0 + bad + row1, rows: 1, wantErr: true},
		{name: "line too long", table: procHeader + strings.Repeat("0", 1<<17), wantErr: true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			rows := 0
			err := scanProcNet(strings.NewReader(tc.table), func(procEntry) bool {
				rows++
				return rows != tc.stopAt
			})
			if (err != nil) != tc.wantErr || rows != tc.rows {
				t.Fatalf("scanProcNet: %d rows, %v; want %d rows, error %v", rows, err, tc.rows, tc.wantErr)
			}
		})
	}
}

// The kernel's own tables parse, and show a listener of ours with our uid.
func TestScanProcNetKernelTables(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct{ table, listen string }{{"tcp", "127.0.0.1:0"}, {"tcp6", "[::1]:0"}} {
		t.Run(tc.table, func(t *testing.T) {
			t.Parallel()
			ln, err := net.Listen("tcp", tc.listen)
			if err != nil {
				t.Skip(err)
			}
			defer ln.Close()
			want := addrPort(ln.Addr())
			f, err := openProcNet(tc.table)
			if err != nil {
				t.Fatal(err)
			}
			defer func() { _ = f.Close() }() // read only
			var found procEntry
			if err := scanProcNet(f, func(e procEntry) bool {
				if e.local == want {
					found = e
				}
				return true
			}); err != nil {
				t.Fatal(err)
			}
			if found.state != tcpListen || found.uid != uint32(os.Geteuid()) || found.inode == 0 {
				t.Fatalf("row of listener %v: %+v", want, found)
			}
		})
	}
}

// formatProcNetRow prints e as the kernel would.
func formatProcNetRow(sl int, e procEntry) string {
	return fmt.Sprintf("%4d: %s %s %02X 00000000:00000000 00:00000000 00000000 %5d        0 %d 1 0000000000000000 20 4 30 10 -1",
		sl, formatProcAddrPort(e.local), formatProcAddrPort(e.remote), e.state, e.uid, e.inode)
}

func formatProcAddrPort(ap netip.AddrPort) string {
	var b strings.Builder
	raw := ap.Addr().AsSlice()
	for w := 0; w < len(raw); w += 4 {
		fmt.Fprintf(&b, "%08X", binary.NativeEndian.Uint32(raw[w:]))
	}
	fmt.Fprintf(&b, ":%04X", ap.Port())
	return b.String()
}

// FuzzParseProcNet feeds arbitrary tables to the parser: it must not panic, and every
// row it accepts must survive being printed the kernel's way and parsed again.
func FuzzParseProcNet(f *testing.F) {
	f.Add([]byte(procHeader))
	f.Add([]byte(procHeader + "   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 12345 1 0000000000000000 100 0 0 10 0\n"))
	f.Add([]byte(procHeader + "   0: 00000000000000000000000001000000:9695 00000000000000000000000001000000:CF1A 06 00000000:00000000 03:00000CF3 00000000     0        0 0 3 000000002196c830\n"))
	f.Add([]byte(procHeader + "0: 0100007F:0001 0100007F:0002 01 0:0 0:0 0 4294967295 0 18446744073709551615\n\n"))
	f.Fuzz(func(t *testing.T, table []byte) {
		var rows []procEntry
		// Most inputs are malformed: the error only ends the scan, and the rows
		// accepted before it are checked all the same.
		_ = scanProcNet(bytes.NewReader(table), func(e procEntry) bool {
			rows = append(rows, e)
			return true
		})
		for i, e := range rows {
			if e.local.Addr().BitLen() != e.remote.Addr().BitLen() {
				t.Fatalf("row %d mixes address families: %+v", i, e)
			}
			row := formatProcNetRow(i, e)
			got, err := parseProcNetRow([]byte(row))
			if err != nil || got != e {
				t.Fatalf("row %d %+v printed as %q parses as %+v, %v", i, e, row, got, err)
			}
		}
	})
}

func (e procEntry) String() string {
	return fmt.Sprintf("{%v -> %v state %#x uid %d inode %d}", e.local, e.remote, e.state, e.uid, e.inode)
}
