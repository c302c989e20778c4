package proxy

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// The h2 transport's half-close of the server's side (docs/tunnel.md,
// section 10). x/net's HTTP/2 server sends a response's END_STREAM only
// when the handler returns, and then resets a request the client is still
// sending: a target that half-closes would end the stream both ways. So,
// when the client asks for it (framingHeader on the request, echoed on the
// 200), the response body is a sequence of frames, each a 4-byte
// big-endian length and that many bytes, and an empty frame is the
// target's half-close; the handler then keeps reading the request body
// until the agent's own END_STREAM. A client that does not ask gets the
// raw body, and the target's half-close ends its stream as before.

// framingHeader names the response framing; its only value is "1".
const framingHeader = "Agentmesh-Framing"

// frameHeaderLen is the length prefix of a frame.
const frameHeaderLen = 4

// maxFrameLen bounds a frame's length: larger than any write the sender
// makes, small enough that a corrupt length is caught.
const maxFrameLen = 1 << 20

// errBadFrame is a response body that breaks the framing.
var errBadFrame = errors.New("h2 response framing")

// framedWriter is a tunnel side that frames what it sends. copy leaves
// frameHeaderLen bytes free in front of what it read, so that header and
// payload go out in one write (one DATA frame) without a copy.
type framedWriter interface {
	// writeFrame sends frame[frameHeaderLen:] as one frame, using the
	// room in front for the header; it returns the payload bytes sent.
	writeFrame(frame []byte) (int, error)
}

// putFrameHeader writes the header of a frame whose payload is n bytes.
func putFrameHeader(frame []byte, n int) {
	binary.BigEndian.PutUint32(frame[:frameHeaderLen], uint32(n)) //nolint:gosec // n <= spliceBufferSize
}

// frameReader reads the payload of a framed response body; the empty frame
// is its EOF. A body that ends elsewhere was cut short.
type frameReader struct {
	r      io.Reader
	remain int // payload bytes left in the current frame
	ended  bool
	hdr    [frameHeaderLen]byte
}

func (f *frameReader) Read(b []byte) (int, error) {
	for f.remain == 0 {
		if f.ended {
			return 0, io.EOF
		}
		if _, err := io.ReadFull(f.r, f.hdr[:]); err != nil {
			if errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return 0, err
		}
		n := binary.BigEndian.Uint32(f.hdr[:])
		if n == 0 {
			f.ended = true
			return 0, io.EOF
		}
		if n > maxFrameLen {
			return 0, fmt.Errorf("%w: frame of %d bytes", errBadFrame, n)
		}
		f.remain = int(n)
	}
	if len(b) > f.remain {
		b = b[:f.remain]
	}
	n, err := f.r.Read(b)
	f.remain -= n
	if errors.Is(err, io.EOF) {
		if f.remain > 0 {
			return n, io.ErrUnexpectedEOF
		}
		err = nil // the next Read finds the end, or that it is missing
	}
	return n, err
}
