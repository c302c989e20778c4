package hsm

import (
	"bytes"
	"context"
	"fmt"
	"net/url"
	"strconv"
	"strings"
	"unicode"

	"github.com/ThalesGroup/crypto11"
	"go.step.sm/crypto/kms/apiv1"
	"go.step.sm/crypto/kms/pkcs11" // registers the "pkcs11" KMS type; needs cgo
	kmsuri "go.step.sm/crypto/kms/uri"
)

// defaultModule is the module the KMS loads when the URI names none (p11-kit's proxy,
// which dispatches to the modules p11-kit is configured with).
const defaultModule = "p11-kit-proxy.so"

// OpenKMS opens the PKCS#11 token named by uri as a go.step.sm/crypto key manager (for
// step-ca's authority.WithKeyManager). Neither step-ca's authority nor its ca package
// imports the pkcs11 KMS, so without this package's import (and cgo) the KMS type would
// be unknown and fail only at run time. A malformed URI fails without echoing it: it
// may carry a pin-value.
//
// Opening and closing are serialised with this package's other object and module
// calls (see tokenMu); calls through the returned KMS are not. Its key creation
// (CreateKey) should therefore not race Keys on the same SoftHSM token: give the CA's
// keys and workload keys different tokens, as SoftHSM's labels make cheap.
func OpenKMS(ctx context.Context, uri string) (*pkcs11.PKCS11, error) {
	if _, err := parseURI(uri); err != nil {
		return nil, err
	}
	tokenMu.Lock()
	defer tokenMu.Unlock()
	km, err := pkcs11.New(ctx, apiv1.Options{Type: apiv1.PKCS11, URI: uri})
	if err != nil {
		return nil, fmt.Errorf("%w: open token %s: %w", ErrToken, RedactURI(uri), err)
	}
	return km, nil
}

// RedactURI drops a pin-value from a PKCS#11 URI so it can appear in errors and logs.
// Everything else, a pin-source (a file name) included, is kept as written.
func RedactURI(uri string) string {
	u, err := url.Parse(uri)
	if err != nil {
		return "<unparsable pkcs11 uri>"
	}
	u.Opaque = redactPIN(u.Opaque, ";")
	u.RawQuery = redactPIN(u.RawQuery, "&")
	return u.String()
}

// redactPIN replaces the value of every pin-value attribute in a sep-separated list.
func redactPIN(attrs, sep string) string {
	if attrs == "" {
		return attrs
	}
	kvs := strings.Split(attrs, sep)
	for i, kv := range kvs {
		// Compared unescaped, as the KMS reads it: "pin%2Dvalue" is a pin-value too.
		k, _, _ := strings.Cut(kv, "=")
		if uk, err := url.QueryUnescape(k); err == nil {
			k = uk
		}
		if strings.EqualFold(k, "pin-value") {
			kvs[i] = "pin-value=REDACTED"
		}
	}
	return strings.Join(kvs, sep)
}

// parseURI parses a PKCS#11 URI. Its errors never wrap the parser's, whose text
// contains the whole URI.
func parseURI(uri string) (*kmsuri.URI, error) {
	u, err := kmsuri.ParseWithScheme("pkcs11", uri)
	if err != nil {
		return nil, fmt.Errorf("%w: malformed pkcs11 uri %s", ErrToken, RedactURI(uri))
	}
	return u, nil
}

// crypto11Config reads a PKCS#11 URI the way go.step.sm/crypto/kms/pkcs11 does
// (module-path, token, serial, slot-id, max-sessions, pin-value, pin-source), so that
// OpenKeys and OpenKMS accept the same URIs. Unlike the KMS it reports an unreadable
// pin-source instead of logging in with an empty PIN.
func crypto11Config(uri string) (*crypto11.Config, error) {
	u, err := parseURI(uri)
	if err != nil {
		return nil, err
	}
	cfg := &crypto11.Config{
		Path:        u.Get("module-path"),
		TokenLabel:  u.Get("token"),
		TokenSerial: u.Get("serial"),
	}
	if cfg.Path == "" {
		cfg.Path = defaultModule
	}
	if v := u.Get("slot-id"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil {
			return nil, fmt.Errorf("%w: slot-id %q is not a number", ErrToken, v)
		}
		cfg.SlotNumber = &n
	}
	if v := u.Get("max-sessions"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil {
			return nil, fmt.Errorf("%w: max-sessions %q is not a number", ErrToken, v)
		}
		cfg.MaxSessions = n
	}
	switch {
	case u.Get("pin-source") != "":
		b, err := u.Read("pin-source")
		if err != nil {
			return nil, fmt.Errorf("%w: read pin-source: %w", ErrToken, err)
		}
		cfg.Pin = string(bytes.TrimRightFunc(b, unicode.IsSpace))
	case u.Has("pin-value"):
		cfg.Pin = u.Get("pin-value")
	default:
		// As the KMS: without a PIN the token is assumed not to support login.
		cfg.LoginNotSupported = true
	}
	return cfg, nil
}
