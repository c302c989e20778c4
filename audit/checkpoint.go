package audit

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"unicode"
	"unicode/utf8"

	"golang.org/x/mod/sumdb/note"
	"golang.org/x/mod/sumdb/tlog"
)

// A checkpoint commits to the whole log up to a size: the C2SP tlog-checkpoint body
// (c2sp.org/tlog-checkpoint), three lines,
//
//	<origin>
//	<size, decimal>
//	<root hash, base64>
//
// signed as a C2SP signed note (c2sp.org/signed-note, golang.org/x/mod/sumdb/note).
// Signatures are of type 0x02: ECDSA P-256 over SHA-256 of the note text, ASN.1 encoded,
// the key ID being the first four bytes of SHA-256 of the public key's DER SPKI. ECDSA
// P-256 rather than the more common Ed25519 because it is what PKCS#11 tokens (SoftHSM2
// through crypto11 included) generate and sign with, so the audit keys of the CA and of
// the proxies stay in their tokens. The writer signs; a witness adds its own signature
// (a cosignature) to the same note after checking the checkpoint is consistent with the
// last one it cosigned.

// Checkpoint is a tlog-checkpoint's body: the log's origin, its size (records) and the
// RFC 6962 Merkle tree hash of its first Size records.
type Checkpoint struct {
	Origin string
	Size   uint64
	Hash   tlog.Hash
}

// Text is the checkpoint's note text, with its final newline.
func (c Checkpoint) Text() string {
	return fmt.Sprintf("%s\n%d\n%s\n", c.Origin, c.Size, base64.StdEncoding.EncodeToString(c.Hash[:]))
}

// maxCheckpointBytes bounds a signed checkpoint: a short body and a few signatures.
const maxCheckpointBytes = 16 << 10

// ErrCheckpoint is wrapped by every error about a checkpoint: malformed, badly signed,
// or not signed by the keys asked for.
var ErrCheckpoint = errors.New("audit: bad checkpoint")

// ErrInconsistent is wrapped when a checkpoint is not an extension of an earlier one of
// the same log: the log was rewritten, cut or forked between them.
var ErrInconsistent = errors.New("audit: checkpoint inconsistent with an earlier one")

// ParseCheckpoint parses a checkpoint's note text. Extension lines after the hash are
// allowed and ignored, as C2SP says. It never panics.
func ParseCheckpoint(text string) (Checkpoint, error) {
	var c Checkpoint
	if len(text) > maxCheckpointBytes || !strings.HasSuffix(text, "\n") {
		return c, fmt.Errorf("%w: not a checkpoint body", ErrCheckpoint)
	}
	lines := strings.SplitN(text, "\n", 4)
	if len(lines) < 4 {
		return c, fmt.Errorf("%w: fewer than three lines", ErrCheckpoint)
	}
	origin, size, hash := lines[0], lines[1], lines[2]
	if !validOrigin(origin) {
		return c, fmt.Errorf("%w: bad origin line", ErrCheckpoint)
	}
	n, err := strconv.ParseUint(size, 10, 63)
	if err != nil || strconv.FormatUint(n, 10) != size {
		return c, fmt.Errorf("%w: size is not a canonical decimal", ErrCheckpoint)
	}
	h, err := base64.StdEncoding.DecodeString(hash)
	if err != nil || len(h) != len(c.Hash) {
		return c, fmt.Errorf("%w: root hash is not 32 bytes of base64", ErrCheckpoint)
	}
	c.Origin, c.Size = origin, n
	copy(c.Hash[:], h)
	return c, nil
}

func validOrigin(s string) bool {
	return s != "" && utf8.ValidString(s) && strings.IndexFunc(s, func(r rune) bool {
		return unicode.IsSpace(r) || unicode.IsControl(r)
	}) < 0
}

// noteSigECDSA is C2SP signed-note's signature type 0x02.
const noteSigECDSA = 0x02

// NoteSigner signs notes with an ECDSA P-256 crypto.Signer, typically a key in a
// PKCS#11 token. It implements note.Signer.
type NoteSigner struct {
	name string
	hash uint32
	key  crypto.Signer
}

// NewNoteSigner returns a signer named name (a key name in the signed-note sense: no
// spaces, no '+') for key, whose public key must be ECDSA P-256.
func NewNoteSigner(name string, key crypto.Signer) (*NoteSigner, error) {
	v, err := NewNoteVerifier(name, key.Public())
	if err != nil {
		return nil, err
	}
	return &NoteSigner{name: name, hash: v.hash, key: key}, nil
}

// Name is the key name. It implements note.Signer.
func (s *NoteSigner) Name() string { return s.name }

// KeyHash is the key ID. It implements note.Signer.
func (s *NoteSigner) KeyHash() uint32 { return s.hash }

// Sign signs msg. It implements note.Signer.
func (s *NoteSigner) Sign(msg []byte) ([]byte, error) {
	d := sha256.Sum256(msg)
	sig, err := s.key.Sign(rand.Reader, d[:], crypto.SHA256)
	if err != nil {
		return nil, fmt.Errorf("audit: sign note: %w", err)
	}
	return sig, nil
}

// VerifierKey is the signer's public key in the note package's encoding,
// "<name>+<key ID, 8 hex>+<base64(0x02 || DER SPKI)>": what a verifier is given.
func (s *NoteSigner) VerifierKey() string {
	v, _ := NewNoteVerifier(s.name, s.key.Public()) // checked by NewNoteSigner
	return v.Key()
}

// NoteVerifier checks type 0x02 signatures of one key. It implements note.Verifier.
type NoteVerifier struct {
	name string
	hash uint32
	spki []byte
	pub  *ecdsa.PublicKey
}

// NewNoteVerifier returns the verifier of name's key pub, which must be ECDSA P-256.
func NewNoteVerifier(name string, pub crypto.PublicKey) (*NoteVerifier, error) {
	ec, ok := pub.(*ecdsa.PublicKey)
	if !ok || ec.Curve != elliptic.P256() {
		return nil, fmt.Errorf("%w: key %q is not ECDSA P-256", ErrCheckpoint, name)
	}
	if !validKeyName(name) {
		return nil, fmt.Errorf("%w: key name %q is empty or holds a space or '+'", ErrCheckpoint, name)
	}
	spki, err := x509.MarshalPKIXPublicKey(ec)
	if err != nil {
		return nil, fmt.Errorf("%w: key %q: %w", ErrCheckpoint, name, err)
	}
	sum := sha256.Sum256(spki)
	return &NoteVerifier{name: name, hash: binary.BigEndian.Uint32(sum[:4]), spki: spki, pub: ec}, nil
}

// ParseVerifierKey parses a key written by VerifierKey, checking its key ID.
func ParseVerifierKey(vkey string) (*NoteVerifier, error) {
	name, rest, _ := strings.Cut(vkey, "+")
	hash16, b64, _ := strings.Cut(rest, "+")
	raw, err := base64.StdEncoding.DecodeString(b64)
	if len(vkey) > 1024 || len(hash16) != 8 || err != nil || len(raw) < 2 || raw[0] != noteSigECDSA {
		return nil, fmt.Errorf("%w: malformed verifier key", ErrCheckpoint)
	}
	pub, err := x509.ParsePKIXPublicKey(raw[1:])
	if err != nil {
		return nil, fmt.Errorf("%w: verifier key: %w", ErrCheckpoint, err)
	}
	v, err := NewNoteVerifier(name, pub)
	if err != nil {
		return nil, err
	}
	if fmt.Sprintf("%08x", v.hash) != hash16 {
		return nil, fmt.Errorf("%w: verifier key %q: key ID does not match the key", ErrCheckpoint, name)
	}
	return v, nil
}

// Name is the key name. It implements note.Verifier.
func (v *NoteVerifier) Name() string { return v.name }

// KeyHash is the key ID. It implements note.Verifier.
func (v *NoteVerifier) KeyHash() uint32 { return v.hash }

// Verify reports whether sig is the key's signature of msg. It implements note.Verifier.
func (v *NoteVerifier) Verify(msg, sig []byte) bool {
	d := sha256.Sum256(msg)
	return ecdsa.VerifyASN1(v.pub, d[:], sig)
}

// Key is the verifier key's text form (see NoteSigner.VerifierKey).
func (v *NoteVerifier) Key() string {
	return fmt.Sprintf("%s+%08x+%s", v.name, v.hash, base64.StdEncoding.EncodeToString(append([]byte{noteSigECDSA}, v.spki...)))
}

// Equal reports whether o is the same key under the same name.
func (v *NoteVerifier) Equal(o *NoteVerifier) bool {
	return o != nil && v.name == o.name && bytes.Equal(v.spki, o.spki)
}

func validKeyName(name string) bool {
	return name != "" && utf8.ValidString(name) && !strings.Contains(name, "+") &&
		strings.IndexFunc(name, unicode.IsSpace) < 0
}

// SignCheckpoint returns c as a signed note, signed by signers in order.
func SignCheckpoint(c Checkpoint, signers ...note.Signer) ([]byte, error) {
	msg, err := note.Sign(&note.Note{Text: c.Text()}, signers...)
	if err != nil {
		return nil, fmt.Errorf("audit: sign checkpoint: %w", err)
	}
	return msg, nil
}

// OpenCheckpoint parses a signed checkpoint and checks that every key in required signed
// it (each verifier must be known: a signature by a key not among required is kept but
// not trusted). It returns the parsed note (for Cosign) and the checkpoint.
func OpenCheckpoint(msg []byte, required ...note.Verifier) (*note.Note, Checkpoint, error) {
	if len(msg) > maxCheckpointBytes {
		return nil, Checkpoint{}, fmt.Errorf("%w: larger than %d bytes", ErrCheckpoint, maxCheckpointBytes)
	}
	if len(required) == 0 {
		return nil, Checkpoint{}, fmt.Errorf("%w: no verifier given", ErrCheckpoint)
	}
	n, err := note.Open(msg, note.VerifierList(required...))
	if err != nil {
		return nil, Checkpoint{}, fmt.Errorf("%w: %w", ErrCheckpoint, err)
	}
	for _, v := range required {
		if !signedBy(n, v) {
			return nil, Checkpoint{}, fmt.Errorf("%w: not signed by %s", ErrCheckpoint, v.Name())
		}
	}
	c, err := ParseCheckpoint(n.Text)
	if err != nil {
		return nil, Checkpoint{}, err
	}
	return n, c, nil
}

func signedBy(n *note.Note, v note.Verifier) bool {
	for _, s := range n.Sigs {
		if s.Name == v.Name() && s.Hash == v.KeyHash() {
			return true
		}
	}
	return false
}

// Cosign is what a witness does with a checkpoint it is sent: msg must be signed by the
// writer's key; when last is not nil (the checkpoint of the same origin the witness
// cosigned before) the new checkpoint must extend it, which proof (a consistency proof
// from last.Size to the new size, RFC 6962 / tlog.TreeProof) shows. It returns the note
// with witness's signature added and the new checkpoint. A new checkpoint of the same
// size as last must have the same hash. An inconsistent checkpoint (a rewritten or
// forked log) wraps ErrInconsistent; a malformed or badly signed one ErrCheckpoint.
func Cosign(msg []byte, writer note.Verifier, last *Checkpoint, proof tlog.TreeProof, witness note.Signer) ([]byte, Checkpoint, error) {
	n, c, err := OpenCheckpoint(msg, writer)
	if err != nil {
		return nil, Checkpoint{}, err
	}
	if err := CheckConsistency(last, c, proof); err != nil {
		return nil, Checkpoint{}, err
	}
	out, err := note.Sign(n, witness)
	if err != nil {
		return nil, Checkpoint{}, fmt.Errorf("audit: cosign checkpoint: %w", err)
	}
	return out, c, nil
}

// CheckConsistency checks that next extends last (nil: nothing to check against) with
// proof: same origin, no smaller size, and a valid consistency proof. The error wraps
// ErrInconsistent.
func CheckConsistency(last *Checkpoint, next Checkpoint, proof tlog.TreeProof) error {
	switch {
	case last == nil:
		return nil
	case last.Origin != next.Origin:
		return fmt.Errorf("%w: origin %q, was %q", ErrInconsistent, next.Origin, last.Origin)
	case next.Size < last.Size:
		return fmt.Errorf("%w: size %d is smaller than %d: the log was cut", ErrInconsistent, next.Size, last.Size)
	case next.Size == last.Size:
		if next.Hash != last.Hash {
			return fmt.Errorf("%w: same size %d, different root hash: the log was rewritten", ErrInconsistent, next.Size)
		}
		return nil
	case last.Size == 0:
		return nil
	}
	if err := tlog.CheckTree(proof, int64(next.Size), next.Hash, int64(last.Size), last.Hash); err != nil {
		return fmt.Errorf("%w: size %d does not extend size %d: %w", ErrInconsistent, next.Size, last.Size, err)
	}
	return nil
}
