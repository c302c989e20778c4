package authority

import (
	"errors"
	"log/slog"
	"net/url"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.step.sm/crypto/jose"
)

// A second Open of a state directory reuses its hierarchy and the keys in the token;
// one for another trust domain is refused.
func TestReopen(t *testing.T) {
	first, dir := openTest(t)
	_, uri := token.Token(t)
	cfg := Config{TrustDomain: testTD, StateDir: dir, KMS: uri, SVIDLifetime: time.Hour,
		Backdate: time.Minute, TokenLifetime: time.Minute, Logger: slog.New(slog.DiscardHandler)}
	again, err := Open(t.Context(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = again.Close(nil) }()
	if again.Created() || !again.Root().Equal(first.Root()) || !again.Intermediate().Equal(first.Intermediate()) {
		t.Fatalf("reopened: created %v, same root %v", again.Created(), again.Root().Equal(first.Root()))
	}
	cfg.TrustDomain = spiffeid.RequireTrustDomainFromString("other.test")
	if a, err := Open(t.Context(), cfg); !errors.Is(err, ErrTrustDomainMismatch) {
		if a != nil {
			_ = a.Close(nil)
		}
		t.Fatalf("Open for another trust domain: %v, want ErrTrustDomainMismatch", err)
	}
}

// A bootstrap token names exactly the identity, for the audience of the endpoint
// Listen named, signed by the provisioner key; an ID outside the trust domain gets none.
func TestToken(t *testing.T) {
	a, _ := openTest(t)
	if err := a.Listen(t.Context(), "127.0.0.1:0", []string{"ca.mesh.test"}); err != nil {
		t.Fatal(err)
	}
	if u, err := url.Parse(a.URL()); err != nil || u.Hostname() != "127.0.0.1" || u.Port() == "" {
		t.Fatalf("URL %q: %v", a.URL(), err)
	}
	id := spiffeid.RequireFromPath(testTD, "/agent/a")
	before := time.Now().Truncate(time.Second)
	tok, exp, err := a.Token(id)
	if err != nil {
		t.Fatal(err)
	}
	jwt, err := jose.ParseSigned(tok)
	if err != nil {
		t.Fatal(err)
	}
	var c tokenClaims
	if err := jwt.Claims(a.provKey.Public(), &c); err != nil {
		t.Fatalf("not signed by the provisioner key: %v", err)
	}
	port := a.Addr().String()[len("127.0.0.1:"):]
	switch {
	case c.Subject != id.String() || len(c.SANs) != 1 || c.SANs[0] != id.String():
		t.Errorf("subject %q, SANs %v", c.Subject, c.SANs)
	case len(c.Audience) != 1 || c.Audience[0] != "https://ca.mesh.test:"+port+"/1.0/sign":
		t.Errorf("audience %v", c.Audience)
	case c.Issuer != provisionerName || c.ID == "" || TokenRecordID(tok) == "":
		t.Errorf("issuer %q, id %q", c.Issuer, c.ID)
	case exp.Before(before.Add(time.Minute)) || exp.After(time.Now().Add(time.Minute)):
		t.Errorf("expires %v, want a minute from now", exp)
	}
	if _, _, err := a.Token(spiffeid.RequireFromPath(spiffeid.RequireTrustDomainFromString("evil.test"), "/a")); !errors.Is(err, ErrInvalidID) {
		t.Errorf("token outside the trust domain: %v", err)
	}
}
