package redirect

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
)

// tools names the iptables programs of one address family.
type tools struct {
	family  string // "ipv4" | "ipv6", for logs and errors
	save    string
	restore string
}

var (
	toolsV4 = tools{family: "ipv4", save: "iptables-save", restore: "iptables-restore"}
	toolsV6 = tools{family: "ipv6", save: "ip6tables-save", restore: "ip6tables-restore"}
)

// Install programs the rules of Rules(cfg): for each family it reads the nat table
// (iptables-save -t nat) and applies, in one iptables-restore --noflush, the changes that
// make agentmesh's part of it exactly the plan. Other rules on the host are untouched.
//
// It is idempotent: installing twice leaves one copy of every rule, and when the table
// already matches nothing is applied. Installing a different Config replaces the old
// rules atomically per family (no moment without capture), including removing the
// AGENTMESH_INBOUND chain when strict mode is turned off and the IPv6 rules when IPv6 is
// unset. Families are applied IPv4 first; if the IPv6 step fails the IPv4 rules stay in
// place (call Remove to undo them). Install and Remove must not run concurrently for the
// same network namespace: each reads the table and then writes it.
func Install(ctx context.Context, cfg Config) error {
	cfg = cfg.withDefaults()
	plan, err := Rules(cfg)
	if err != nil {
		return err
	}
	if err := apply(ctx, cfg, toolsV4, plan.IPv4, mustRead); err != nil {
		return fmt.Errorf("redirect: install: %w", err)
	}
	// Without IPv6 the plan for it is empty: apply removes what an earlier IPv6 install
	// left, if ip6tables can be read at all (hosts without IPv6 support cannot).
	read := mustRead
	if !cfg.IPv6 {
		read = mayRead
	}
	if err := apply(ctx, cfg, toolsV6, plan.IPv6, read); err != nil {
		return fmt.Errorf("redirect: install: %w", err)
	}
	return nil
}

// Remove deletes exactly what Install added: the jumps into AGENTMESH_OUTPUT and
// AGENTMESH_INBOUND (from nat OUTPUT and PREROUTING, or wherever they are) and those chains,
// in one iptables-restore --noflush per family. When nothing of agentmesh's is installed it
// only reads the tables and changes nothing, so it is idempotent and safe to run at any
// time.
//
// It uses only cfg.Command, cfg.Logger and cfg.IPv6; the rest of cfg is ignored, so the
// zero Config removes from the current network namespace. ip6tables is cleaned too;
// failing to read it is an error only when cfg.IPv6 is set.
func Remove(ctx context.Context, cfg Config) error {
	cfg = cfg.withDefaults()
	if err := apply(ctx, cfg, toolsV4, Ruleset{}, mustRead); err != nil {
		return fmt.Errorf("redirect: remove: %w", err)
	}
	read := mustRead
	if !cfg.IPv6 {
		read = mayRead
	}
	if err := apply(ctx, cfg, toolsV6, Ruleset{}, read); err != nil {
		return fmt.Errorf("redirect: remove: %w", err)
	}
	return nil
}

// readPolicy says whether failing to read a family's table is an error.
type readPolicy bool

const (
	mustRead readPolicy = true
	mayRead  readPolicy = false
)

// apply makes agentmesh's part of one family's nat table equal to want.
func apply(ctx context.Context, cfg Config, t tools, want Ruleset, read readPolicy) error {
	log := cfg.Logger.With(slog.String(keyFamily, t.family))
	out, err := run(ctx, cfg, nil, t.save, "-t", "nat")
	if err != nil {
		if read == mayRead {
			log.DebugContext(ctx, "nat table not readable, skipping family", slog.Any(keyErr, err))
			return nil
		}
		return fmt.Errorf("read %s nat table: %w", t.family, err)
	}
	cur, err := parseSave(out)
	if err != nil {
		return fmt.Errorf("parse %s output: %w", t.save, err)
	}
	script := restoreScript(cur, want)
	if script == "" {
		log.DebugContext(ctx, "redirect rules already as planned", slog.Int(keyRules, ruleCount(want)))
		return nil
	}
	// --wait: with the legacy backend, wait for the xtables lock held by another tool
	// (kube-proxy, docker) instead of failing; the nft backend ignores it.
	if _, err := run(ctx, cfg, []byte(script), t.restore, "--noflush", "--wait"); err != nil {
		return fmt.Errorf("apply %s rules: %w", t.family, err)
	}
	if want.IsZero() {
		log.InfoContext(ctx, "redirect rules removed")
	} else {
		log.InfoContext(ctx, "redirect rules installed", slog.Int(keyRules, ruleCount(want)))
	}
	return nil
}

func ruleCount(r Ruleset) int {
	n := len(r.Jumps)
	for _, c := range r.Chains {
		n += len(c.Rules)
	}
	return n
}

// run runs one iptables tool through cfg.Command and returns its stdout; a failure carries
// the tool's stderr, which is where iptables says what is wrong.
func run(ctx context.Context, cfg Config, stdin []byte, name string, args ...string) ([]byte, error) {
	cmd := cfg.Command(ctx, name, args...)
	var stdout, stderr bytes.Buffer
	if stdin != nil {
		cmd.Stdin = bytes.NewReader(stdin)
	}
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		ce := &CommandError{
			Name:   name,
			Args:   args,
			Stderr: strings.Join(strings.Fields(strings.TrimSpace(stderr.String())), " "),
			Err:    err,
		}
		if ctxErr := ctx.Err(); ctxErr != nil && !errors.Is(err, ctxErr) {
			return nil, fmt.Errorf("%w: %w", ctxErr, ce)
		}
		return nil, ce
	}
	return stdout.Bytes(), nil
}
