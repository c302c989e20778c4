package hsm

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"

	"github.com/ThalesGroup/crypto11"
)

// Ref returns the name under which Open finds key again, in this process or a later
// one: its CKA_LABEL. It is not secret (it is in clear in the token's public object),
// so it may be written beside the key's certificate. key must come from NewKey or Open
// of this store, else ErrUnknownKey.
func (k *Keys) Ref(key crypto.Signer) (string, error) {
	kk, ok := key.(*Key)
	if !ok || kk.keys != k {
		return "", ErrUnknownKey
	}
	return kk.label, nil
}

// Open returns the key that Ref named, made by a store with this prefix on this token,
// possibly by a process that has ended since: a restarted process keeps the certificate
// whose key is in the token instead of asking for a new one. The key signs, and is
// destroyed, as one from NewKey.
//
// Open finds nothing (ErrKeyNotFound) for a reference outside this store's prefix, and
// refuses a key the token does not hold the way NewKey made it: an EC P-256 key pair
// whose private half is sensitive, always was, is not extractable and never was. An
// object planted under the label with weaker attributes is thereby never used. ctx is
// checked before the token is asked.
func (k *Keys) Open(ctx context.Context, ref string) (crypto.Signer, error) {
	if err := k.usable(ctx); err != nil {
		return nil, fmt.Errorf("hsm: open key: %w", err)
	}
	id, err := k.idOf(ref)
	if err != nil {
		return nil, fmt.Errorf("%w: %q: %w", ErrKeyNotFound, ref, err)
	}
	tokenMu.Lock()
	found, err := k.p11.FindKeyPairs(id, []byte(ref))
	var attrs crypto11.AttributeSet
	if err == nil && len(found) == 1 {
		attrs, err = k.p11.GetAttributes(found[0], []crypto11.AttributeType{
			crypto11.CkaSensitive, crypto11.CkaAlwaysSensitive, crypto11.CkaExtractable, crypto11.CkaNeverExtractable,
		})
	}
	tokenMu.Unlock()
	switch {
	case err != nil:
		return nil, fmt.Errorf("%w: open key %s: %w", ErrToken, ref, err)
	case len(found) == 0:
		return nil, fmt.Errorf("%w: %s", ErrKeyNotFound, ref)
	case len(found) > 1:
		return nil, fmt.Errorf("%w: %s names %d key pairs", ErrKeyRefused, ref, len(found))
	}
	s := found[0]
	if pub, ok := s.Public().(*ecdsa.PublicKey); !ok || pub.Curve != elliptic.P256() {
		return nil, fmt.Errorf("%w: %s is not an EC P-256 key", ErrKeyRefused, ref)
	}
	for _, w := range []struct {
		attr crypto11.AttributeType
		name string
		want bool
	}{
		{crypto11.CkaSensitive, "CKA_SENSITIVE", true},
		{crypto11.CkaAlwaysSensitive, "CKA_ALWAYS_SENSITIVE", true},
		{crypto11.CkaExtractable, "CKA_EXTRACTABLE", false},
		{crypto11.CkaNeverExtractable, "CKA_NEVER_EXTRACTABLE", true},
	} {
		a := attrs[w.attr]
		if a == nil || len(a.Value) != 1 || (a.Value[0] != 0) != w.want {
			return nil, fmt.Errorf("%w: %s: %s is not %t", ErrKeyRefused, ref, w.name, w.want)
		}
	}
	return &Key{keys: k, id: id, label: ref, signer: s, pub: s.Public()}, nil
}

// idOf returns the CKA_ID that NewKey gave the key it labelled ref: the label is the
// prefix followed by the ID in hex.
func (k *Keys) idOf(ref string) ([]byte, error) {
	rest, ok := strings.CutPrefix(ref, k.prefix)
	if !ok {
		return nil, errors.New("not a label of this key store")
	}
	id, err := hex.DecodeString(rest)
	if err != nil || len(id) != keyIDLen {
		return nil, errors.New("not a label NewKey makes")
	}
	return id, nil
}
