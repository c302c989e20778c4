package siem

import (
	"bytes"
	"strconv"
	"time"
)

// sdID is the structured data element of every message: agentmesh's, under the IANA
// private enterprise number 32473 that RFC 5612 reserves for documentation.
const sdID = "agentmesh@32473"

// pri is facility 13 (log audit) × 8 + severity 6 (informational).
const pri = "<110>1 "

// maxMsgID and maxHostname are RFC 5424's bounds on MSGID and HOSTNAME.
const (
	maxMsgID    = 32
	maxHostname = 255
)

// header is what appendFrame needs of a record line: its seq (from the line's position
// in the log), type and time. The rest of the line is passed through unparsed.
type header struct {
	kind []byte
	time []byte
}

// parseHeader reads the type and time of a record line positionally, as the writer wrote
// them; a line it does not recognize still goes out, with "-" in their places.
func parseHeader(line []byte) header {
	return header{kind: field(line, `"type":"`), time: field(line, `"time":"`)}
}

// field returns the string value after key in the header part of line, or nil.
func field(line []byte, key string) []byte {
	head := line[:min(len(line), 512)]
	i := bytes.Index(head, []byte(key))
	if i < 0 {
		return nil
	}
	v := head[i+len(key):]
	j := bytes.IndexByte(v, '"')
	if j < 0 {
		return nil
	}
	return v[:j]
}

// appendFrame appends one RFC 5425 frame, `LEN SP SYSLOG-MSG`, carrying line as the MSG of
// an RFC 5424 message, to dst. scratch is reused for the message.
func appendFrame(dst, scratch []byte, seq uint64, line []byte, hostname, origin string) ([]byte, []byte) {
	h := parseHeader(line)
	msg := append(scratch[:0], pri...)
	msg = appendTimestamp(msg, h.time)
	msg = append(msg, ' ')
	msg = appendToken(msg, []byte(hostname), maxHostname)
	msg = append(msg, " agentmesh - "...)
	msg = appendToken(msg, h.kind, maxMsgID)
	msg = append(msg, " ["+sdID+` seq="`...)
	msg = strconv.AppendUint(msg, seq, 10)
	msg = append(msg, `" origin="`...)
	msg = appendParamValue(msg, origin)
	msg = append(msg, `"] `...)
	msg = append(msg, line...)
	dst = strconv.AppendInt(dst, int64(len(msg)), 10)
	dst = append(dst, ' ')
	return append(dst, msg...), msg
}

// appendTimestamp writes the record's RFC 3339 time with at most microseconds, as RFC
// 5424 allows at most six digits of fraction, or "-" when it does not parse.
func appendTimestamp(dst, v []byte) []byte {
	t, err := time.Parse(time.RFC3339Nano, string(v))
	if err != nil {
		return append(dst, '-')
	}
	return t.UTC().AppendFormat(dst, "2006-01-02T15:04:05.000000Z07:00")
}

// appendToken writes v as an RFC 5424 header token: printable US-ASCII without spaces, at
// most limit octets, "-" when nothing is left.
func appendToken(dst, v []byte, limit int) []byte {
	n := 0
	for _, c := range v {
		if n == limit {
			break
		}
		if c > 32 && c < 127 {
			dst = append(dst, c)
			n++
		}
	}
	if n == 0 {
		dst = append(dst, '-')
	}
	return dst
}

// appendParamValue escapes '"', '\' and ']' in an SD-PARAM value (RFC 5424 §6.3.3).
func appendParamValue(dst []byte, v string) []byte {
	for i := range len(v) {
		switch c := v[i]; c {
		case '"', '\\', ']':
			dst = append(dst, '\\', c)
		default:
			dst = append(dst, c)
		}
	}
	return dst
}
