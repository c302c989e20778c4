package meshclient

import (
	"bytes"
	"context"
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/agentmesh/agentmesh/meshapi"
)

// ClientConfig configures a Client.
type ClientConfig struct {
	// URL is the https://host:port base URL of agentmesh ca. Required.
	URL string
	// Roots are the trust anchors for the CA's TLS serving certificate (the CA's root).
	// Required unless Anchors is set.
	Roots []*x509.Certificate
	// Anchors, when set, replace Roots: the anchors held at each handshake verify the
	// CA. Default nil: Roots, fixed.
	Anchors *Anchors
	// Token returns a bootstrap token for Enroll; it is called once per Enroll. Default
	// nil: Enroll fails with ErrNoToken.
	Token func(ctx context.Context) (string, error)
	// Timeout bounds each request to the CA. Default 10s.
	Timeout time.Duration
	// Logger receives Debug lines for issued certificates. Default: discard.
	Logger *slog.Logger
	// Control, when set, is called on every socket dialed to the CA before it
	// connects; the proxy sets its SO_MARK there so capture rules skip this traffic.
	// Default nil.
	Control func(network, address string, c syscall.RawConn) error
}

// Client obtains X509-SVIDs from agentmesh ca: Enroll with a bootstrap token, Renew
// over mTLS with the current SVID. It satisfies rotator.Issuer. It does not check what
// it receives beyond parsing: the caller verifies key, ID, validity and chain. Safe for
// concurrent use.
type Client struct {
	base    string
	anchors *Anchors
	host    string
	token   func(ctx context.Context) (string, error)
	timeout time.Duration
	control func(network, address string, c syscall.RawConn) error
	log     *slog.Logger
	enroll  *http.Client
}

// caEndpoint is where the CA is and what verifies it.
type caEndpoint struct {
	base    string // the base URL
	host    string // the name (or address) its serving certificate must hold
	anchors *Anchors
}

// endpoint validates the CA address and trust anchors every client needs (anchors
// when set, else roots).
func endpoint(rawURL string, roots []*x509.Certificate, anchors *Anchors) (caEndpoint, error) {
	u, err := url.Parse(rawURL)
	switch {
	case err != nil:
		return caEndpoint{}, fmt.Errorf("%w: URL %q: %w", ErrInvalidConfig, rawURL, err)
	case u.Scheme != "https" || u.Host == "":
		return caEndpoint{}, fmt.Errorf("%w: URL %q is not https://host:port", ErrInvalidConfig, rawURL)
	case anchors == nil && len(roots) == 0:
		return caEndpoint{}, fmt.Errorf("%w: Roots are required", ErrInvalidConfig)
	}
	return caEndpoint{base: strings.TrimSuffix(u.Scheme+"://"+u.Host+u.Path, "/"), host: u.Hostname(),
		anchors: anchorsOf(anchors, roots)}, nil
}

// NewClient checks cfg and returns a Client. It does not contact the CA.
func NewClient(cfg ClientConfig) (*Client, error) {
	ep, err := endpoint(cfg.URL, cfg.Roots, cfg.Anchors)
	switch {
	case err != nil:
		return nil, err
	case cfg.Timeout < 0:
		return nil, fmt.Errorf("%w: negative Timeout", ErrInvalidConfig)
	}
	if cfg.Timeout == 0 {
		cfg.Timeout = defaultTimeout
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	c := &Client{
		base:    ep.base,
		anchors: ep.anchors,
		host:    ep.host,
		token:   cfg.Token,
		timeout: cfg.Timeout,
		control: cfg.Control,
		log:     cfg.Logger,
	}
	c.enroll = &http.Client{Transport: c.transport(nil, false)}
	return c, nil
}

// transport builds an HTTPS transport to the CA, presenting clientCert when not nil.
func (c *Client) transport(clientCert *tls.Certificate, keepAlive bool) *http.Transport {
	tc := c.anchors.tlsConfig(c.host)
	if clientCert != nil {
		tc.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			return clientCert, nil
		}
	}
	return &http.Transport{
		// Never through HTTP(S)_PROXY: on a meshed host that is the agentmesh proxy,
		// whose credentials this client is renewing.
		Proxy:               nil,
		DialContext:         (&net.Dialer{Timeout: c.timeout, Control: c.control}).DialContext,
		TLSClientConfig:     tc,
		ForceAttemptHTTP2:   true,
		TLSHandshakeTimeout: c.timeout,
		DisableKeepAlives:   !keepAlive,
		MaxIdleConnsPerHost: 2,
		IdleConnTimeout:     90 * time.Second,
	}
}

// Enroll asks for a first SVID for id and the public half of key, authenticated by a
// bootstrap token from ClientConfig.Token: a CSR with the single URI SAN id, signed by
// key, to POST /1.0/sign. It returns the chain, leaf first. A refusal (bad, expired or
// used token, wrong ID) is a *ResponseError whose Permanent() is true.
func (c *Client) Enroll(ctx context.Context, id spiffeid.ID, key crypto.Signer) ([]*x509.Certificate, error) {
	if c.token == nil {
		return nil, ErrNoToken
	}
	tok, err := c.token(ctx)
	if err != nil {
		return nil, fmt.Errorf("ca: sign: bootstrap token: %w", err)
	}
	csr, err := meshapi.NewCSR(id, key)
	if err != nil {
		return nil, fmt.Errorf("ca: sign: %w", err)
	}
	return c.post(ctx, c.enroll, "sign", "/1.0/sign", meshapi.SignRequest{CSR: csr, OTT: tok})
}

// Renew asks for an SVID for the public half of key (a new key each rotation),
// authenticated by presenting current over mTLS: POST /1.0/rekey with a CSR signed by
// key. The new certificate keeps current's ID and lifetime. It returns the chain, leaf
// first. An expired, revoked or unknown current SVID is a *ResponseError whose
// Permanent() is true: re-enrol.
func (c *Client) Renew(ctx context.Context, current *x509svid.SVID, key crypto.Signer) ([]*x509.Certificate, error) {
	if current == nil || len(current.Certificates) == 0 || current.PrivateKey == nil {
		return nil, errors.New("ca: rekey: no current SVID")
	}
	id := current.ID
	if id.IsZero() {
		var err error
		if id, err = x509svid.IDFromCert(current.Certificates[0]); err != nil {
			return nil, fmt.Errorf("ca: rekey: current SVID: %w", err)
		}
	}
	csr, err := meshapi.NewCSR(id, key)
	if err != nil {
		return nil, fmt.Errorf("ca: rekey: %w", err)
	}
	cert := &tls.Certificate{PrivateKey: current.PrivateKey, Leaf: current.Certificates[0]}
	for _, crt := range current.Certificates {
		cert.Certificate = append(cert.Certificate, crt.Raw)
	}
	// A transport per call: the client certificate changes with every rotation.
	tr := c.transport(cert, false)
	defer tr.CloseIdleConnections()
	return c.post(ctx, &http.Client{Transport: tr}, "rekey", "/1.0/rekey", meshapi.SignRequest{CSR: csr})
}

func (c *Client) post(ctx context.Context, hc *http.Client, op, path string, body meshapi.SignRequest) ([]*x509.Certificate, error) {
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()
	start := time.Now()
	answer, err := postJSON(ctx, hc, op, c.base+path, body, http.StatusCreated, http.StatusOK)
	if err != nil {
		return nil, err
	}
	chain, err := meshapi.ParseSignResponse(answer)
	if err != nil {
		return nil, fmt.Errorf("ca: %s: %w", op, err)
	}
	c.log.LogAttrs(ctx, slog.LevelDebug, "certificate issued", slog.String(keyOp, op),
		slog.String(keySerial, chain[0].SerialNumber.String()), slog.Time(keyNotAfter, chain[0].NotAfter),
		slog.Duration(keyDuration, time.Since(start)))
	return chain, nil
}

// postJSON posts body as JSON to u and returns the answer, at most meshapi.MaxResponse
// bytes, when its status is one of ok; any other status is a *meshapi.ResponseError
// with op.
func postJSON(ctx context.Context, hc *http.Client, op, u string, body any, ok ...int) ([]byte, error) {
	b, err := json.Marshal(body)
	if err != nil {
		return nil, fmt.Errorf("ca: %s: %w", op, err)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, u, bytes.NewReader(b))
	if err != nil {
		return nil, fmt.Errorf("ca: %s: %w", op, err)
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := hc.Do(req)
	if err != nil {
		return nil, fmt.Errorf("ca: %s: %w", op, err)
	}
	defer func() { _ = resp.Body.Close() }()
	answer, err := io.ReadAll(io.LimitReader(resp.Body, meshapi.MaxResponse))
	if err != nil {
		return nil, fmt.Errorf("ca: %s: read answer: %w", op, err)
	}
	if !slices.Contains(ok, resp.StatusCode) {
		return nil, &meshapi.ResponseError{Op: op, Status: resp.StatusCode, Message: meshapi.ErrorMessage(answer)}
	}
	return answer, nil
}
