package audit

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// The record format, one line each:
//
//	{"seq":N,"time":"RFC3339Nano","type":"kind","prev":"<64 hex>",<event fields>,"hash":"<64 hex>"}
//
// hash is SHA-256 of the line without its `,"hash":"…"` suffix, i.e. of
// `{"seq":…,<event fields>}`. The header is written in this fixed order and parsed
// positionally, so a reader never has to trust a JSON decoder's handling of duplicate keys.
const (
	hashKey = `,"hash":"`
	// suffixLen is the length of `,"hash":"<64 hex>"}`.
	suffixLen = len(hashKey) + sha256.Size*2 + len(`"}`)
	// maxRecordBytes bounds one line (without its newline). Append refuses larger events and
	// Verify reports longer lines, so a reader's buffer stays bounded.
	maxRecordBytes = 1 << 20
	// maxHeaderBytes is a generous bound on everything but the event fields.
	maxHeaderBytes = 512
	maxKindLen     = 64
)

// reservedKeys are the header field names an event may not use.
var reservedKeys = [...]string{"seq", "time", "type", "prev", "hash"}

// appendRecord appends the complete line for one record, newline included, to dst and
// returns it with the record's hash. fields is the event marshalled as a JSON object.
func appendRecord(dst []byte, seq uint64, t time.Time, kind string, prev *[sha256.Size]byte, fields []byte) ([]byte, [sha256.Size]byte) {
	start := len(dst)
	dst = append(dst, `{"seq":`...)
	dst = strconv.AppendUint(dst, seq, 10)
	dst = append(dst, `,"time":"`...)
	dst = t.AppendFormat(dst, time.RFC3339Nano)
	dst = append(dst, `","type":"`...)
	dst = append(dst, kind...)
	dst = append(dst, `","prev":"`...)
	dst = hex.AppendEncode(dst, prev[:])
	dst = append(dst, '"')
	if len(fields) > len("{}") {
		dst = append(dst, ',')
		dst = append(dst, fields[1:len(fields)-1]...)
	}
	dst = append(dst, '}')
	sum := sha256.Sum256(dst[start:])
	dst = append(dst[:len(dst)-1], hashKey...)
	dst = hex.AppendEncode(dst, sum[:])
	dst = append(dst, "\"}\n"...)
	return dst, sum
}

// record is what a reader needs from one line to check the chain.
type record struct {
	seq  uint64
	prev [sha256.Size]byte
	hash [sha256.Size]byte // as written in the line
}

// parseRecord checks that line (without newline) is a well-formed record whose hash field
// matches its content. scratch is reused between calls to avoid an allocation per line. On
// failure it returns a reason for an operator; it never panics.
func parseRecord(line, scratch []byte) (record, []byte, string) {
	var r record
	if len(line) > maxRecordBytes {
		return r, scratch, "line longer than 1 MiB"
	}
	if len(line) < suffixLen+len(`{"seq":`) {
		return r, scratch, "malformed record: too short"
	}
	body, suffix := line[:len(line)-suffixLen], line[len(line)-suffixLen:]
	if !bytes.HasPrefix(suffix, []byte(hashKey)) || !bytes.HasSuffix(suffix, []byte(`"}`)) {
		return r, scratch, `malformed record: does not end with ,"hash":"<64 hex>"}`
	}
	if !decodeHash(&r.hash, suffix[len(hashKey):len(hashKey)+sha256.Size*2]) {
		return r, scratch, "malformed record: hash is not 64 lowercase hex digits"
	}

	p := parser{b: body}
	p.expect(`{"seq":`)
	r.seq = p.uint()
	p.expect(`,"time":`)
	ts := p.str()
	p.expect(`,"type":`)
	kind := p.str()
	p.expect(`,"prev":`)
	prev := p.str()
	if p.err != "" {
		return r, scratch, "malformed record: " + p.err
	}
	if _, err := time.Parse(time.RFC3339Nano, string(ts)); err != nil {
		return r, scratch, "malformed record: time is not RFC 3339"
	}
	if !validKind(string(kind)) {
		return r, scratch, "malformed record: bad type"
	}
	if !decodeHash(&r.prev, prev) {
		return r, scratch, "malformed record: prev is not 64 lowercase hex digits"
	}
	if rest := p.b; len(rest) > 0 && rest[0] != ',' {
		return r, scratch, "malformed record: junk after header"
	}
	if !json.Valid(line) {
		return r, scratch, "malformed record: not valid JSON"
	}

	scratch = append(append(scratch[:0], body...), '}')
	if sha256.Sum256(scratch) != r.hash {
		return r, scratch, "hash mismatch: the record was edited"
	}
	return r, scratch, ""
}

// parser consumes the fixed-order header. After the first error every method is a no-op, so
// the caller checks err once.
type parser struct {
	b   []byte
	err string
}

func (p *parser) expect(s string) {
	if p.err != "" {
		return
	}
	if !bytes.HasPrefix(p.b, []byte(s)) {
		p.err = fmt.Sprintf("expected %s", s)
		return
	}
	p.b = p.b[len(s):]
}

// uint reads a decimal without sign or leading zeros, as strconv.AppendUint writes it.
func (p *parser) uint() uint64 {
	if p.err != "" {
		return 0
	}
	i := 0
	for i < len(p.b) && p.b[i] >= '0' && p.b[i] <= '9' {
		i++
	}
	if i == 0 || (i > 1 && p.b[0] == '0') {
		p.err = "seq is not a canonical decimal"
		return 0
	}
	n, err := strconv.ParseUint(string(p.b[:i]), 10, 64)
	if err != nil {
		p.err = "seq out of range"
		return 0
	}
	p.b = p.b[i:]
	return n
}

// str reads a JSON string that needs no escaping, which holds for every header value.
func (p *parser) str() []byte {
	if p.err != "" {
		return nil
	}
	if len(p.b) == 0 || p.b[0] != '"' {
		p.err = "expected a string"
		return nil
	}
	for i := 1; i < len(p.b); i++ {
		switch c := p.b[i]; {
		case c == '"':
			s := p.b[1:i]
			p.b = p.b[i+1:]
			return s
		case c == '\\' || c < 0x20:
			p.err = "unexpected escape in header string"
			return nil
		}
	}
	p.err = "unterminated string"
	return nil
}

// decodeHash accepts exactly 64 lowercase hex digits, the only form the writer produces, so
// that a record has one byte representation.
func decodeHash(dst *[sha256.Size]byte, src []byte) bool {
	if len(src) != sha256.Size*2 {
		return false
	}
	for _, c := range src {
		if (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	_, err := hex.Decode(dst[:], src)
	return err == nil
}

// validKind accepts short identifiers of [a-z0-9_.-] starting with a letter; they are written
// into the record without JSON escaping.
func validKind(k string) bool {
	if len(k) == 0 || len(k) > maxKindLen || k[0] < 'a' || k[0] > 'z' {
		return false
	}
	for i := 0; i < len(k); i++ {
		c := k[i]
		if (c < 'a' || c > 'z') && (c < '0' || c > '9') && c != '_' && c != '.' && c != '-' {
			return false
		}
	}
	return true
}

// encodeEvent marshals e for the writer. It runs in Append, on the caller's goroutine, so a
// bad event is reported to the caller that made it, the event's state is captured at the
// moment of the call (a pointer event may be reused afterwards), and the marshalling cost is
// spread over the callers instead of serialised in the writer.
func encodeEvent(e Event) (string, []byte, error) {
	if e == nil {
		return "", nil, fmt.Errorf("%w: nil", ErrInvalidEvent)
	}
	kind := e.Kind()
	if !validKind(kind) {
		return "", nil, fmt.Errorf("%w: kind %q is not a short lowercase identifier", ErrInvalidEvent, kind)
	}
	fields, err := json.Marshal(e)
	if err != nil {
		return "", nil, fmt.Errorf("%w: marshal %s: %w", ErrInvalidEvent, kind, err)
	}
	if len(fields) > maxRecordBytes-maxHeaderBytes {
		return "", nil, fmt.Errorf("%w: %s is %d bytes, limit %d", ErrInvalidEvent, kind, len(fields), maxRecordBytes-maxHeaderBytes)
	}
	switch e.(type) {
	case Handshake, *Handshake, Rotation, *Rotation, Connection, *Connection:
		// Our own types are known to be objects without header names (tested).
	default:
		if err := checkFields(fields); err != nil {
			return "", nil, fmt.Errorf("%w: %s: %w", ErrInvalidEvent, kind, err)
		}
	}
	return kind, fields, nil
}

// checkFields makes sure an event from another package marshals to an object whose keys do
// not shadow the header.
func checkFields(fields []byte) error {
	if len(fields) == 0 || fields[0] != '{' {
		return fmt.Errorf("marshals to %.20s, not a JSON object", fields)
	}
	var m map[string]json.RawMessage
	if err := json.Unmarshal(fields, &m); err != nil {
		return err
	}
	// Case-insensitive because encoding/json matches keys that way when a consumer decodes
	// a record into a struct.
	for k := range m {
		for _, r := range reservedKeys {
			if strings.EqualFold(k, r) {
				return fmt.Errorf("field %q collides with the record header", k)
			}
		}
	}
	return nil
}
