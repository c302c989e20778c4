package main

import (
	"fmt"
	"os"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/agentmesh/agentmesh/ca"
	"github.com/agentmesh/agentmesh/hsm"
)

func newCACmd() *cobra.Command {
	var (
		cfg         ca.ProcessConfig
		trustDomain string
		logLevel    string
		logFormat   string
	)
	var siemFile string
	var adminIDs []string
	cmd := &cobra.Command{
		Use:   "ca",
		Short: "Run the embedded step-ca with its keys in a PKCS#11 token",
		Long: `Run the agentmesh CA: step-ca embedded in-process, its root, intermediate and
provisioner keys generated inside a PKCS#11 token (a SoftHSM2 token in the state directory
unless --kms names another), serving step-ca's API with the CRL enabled. The first start
creates the token, keys, certificates and database in --state; later starts reuse them.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			td, err := spiffeid.TrustDomainFromString(trustDomain)
			if err != nil {
				return fmt.Errorf("--trust-domain: %w", err)
			}
			level, err := parseLevel(logLevel)
			if err != nil {
				return fmt.Errorf("--log-level: %w", err)
			}
			cfg.CA.TrustDomain = td
			for _, a := range adminIDs {
				id, err := argID("--admin-id", a)
				if err != nil {
					return err
				}
				cfg.CA.AdminIDs = append(cfg.CA.AdminIDs, id)
			}
			if siemFile != "" {
				if cfg.SIEM, err = ca.LoadSIEMSettings(siemFile); err != nil {
					return fmt.Errorf("--siem: %w", err)
				}
			}
			cfg.Logger = newLogger(os.Stderr, level, logFormat)
			return ca.Run(cmd.Context(), cfg)
		},
	}
	addCAFlags(cmd.Flags(), &cfg)
	cmd.AddCommand(newCARotateCmd(), newCARotationCmd(), newCAAuditCmd())
	f := cmd.Flags()
	f.StringVar(&trustDomain, "trust-domain", "", "SPIFFE trust domain, e.g. example.org")
	f.StringVar(&logLevel, "log-level", "info", "debug, info, warn or error")
	f.StringVar(&logFormat, "log-format", "text", "text or json")
	f.StringArrayVar(&adminIDs, "admin-id", nil, "SPIFFE ID whose SVID may open the status page on the HTTPS port at /status/ (repeatable; default: nobody)")
	f.StringVar(&siemFile, "siem", "", "YAML file of the SIEM receiver the audit log is sent to, with the fields of a proxy's audit.siem (default: none)")
	_ = cmd.MarkFlagRequired("state")
	_ = cmd.MarkFlagRequired("trust-domain")
	return cmd
}

// addCAFlags binds the flags of `agentmesh ca` that map one to one onto cfg.
func addCAFlags(f *pflag.FlagSet, cfg *ca.ProcessConfig) {
	f.StringVar(&cfg.CA.StateDir, "state", "", "state directory (token, certificates, database)")
	f.StringVar(&cfg.CA.Listen, "listen", ":9443", "address of the step-ca API")
	f.StringSliceVar(&cfg.CA.DNSNames, "dns-name", nil, "names for the CA's TLS certificate (default: localhost, loopback addresses, the listen host, the hostname)")
	f.StringVar(&cfg.CA.KMS, "kms", "", "PKCS#11 URI of the token holding the keys (default: a SoftHSM2 token in --state)")
	f.DurationVar(&cfg.CA.SVIDLifetime, "svid-lifetime", time.Hour, "lifetime of issued X509-SVIDs (at least 10s)")
	f.DurationVar(&cfg.CA.TokenLifetime, "token-lifetime", 5*time.Minute, "validity of bootstrap tokens")
	f.StringVar(&cfg.CA.PINFile, "hsm-pin-file", hsm.CredentialPIN(), "PIN file of the SoftHSM2 token, outside --state (default: the systemd credential hsm.pin when passed, else STATE.pin beside the state directory)")
	f.IntVar(&cfg.CA.MaxWatches, "max-watches", ca.DefaultMaxWatches, "concurrent directory long-polls one client identity may hold; more are answered 429")
	f.DurationVar(&cfg.CA.RotationLiveWindow, "rotation-live-window", 30*time.Second, "a proxy with a heartbeat within this window is live in a rotation of the trust anchors")
	f.DurationVar(&cfg.CA.RotationRenewWindow, "rotation-renew-window", 0, "window proxies spread a rotation's early renewals over (default: a quarter of --svid-lifetime)")
	f.StringVar(&cfg.AuditPath, "audit", "", "audit log of revocations (default: audit.log in --state)")
	f.IntVar(&cfg.AuditLog.CheckpointRecords, "audit-checkpoint-records", 0, "records between two signed checkpoints of the audit log (default 1000)")
	f.DurationVar(&cfg.AuditLog.CheckpointInterval, "audit-checkpoint-interval", 0, "longest time between two signed checkpoints of a growing audit log (default 10s; at least 100ms)")
	f.Int64Var(&cfg.AuditLog.MaxFileBytes, "audit-max-file-bytes", 0, "size past which the audit log's file becomes a segment (default 64 MiB; at least 64 KiB)")
	f.DurationVar(&cfg.CA.WitnessStaleAfter, "witness-stale-after", 30*time.Second, "a witnessed audit log without a checkpoint for this long is stale (three of the proxies' checkpoint intervals)")
	f.StringVar(&cfg.CA.StatusListen, "status-listen", "", "loopback address serving the status page over plain HTTP, without authentication, e.g. 127.0.0.1:9444 (default: none)")
	f.StringVar(&cfg.MetricsAddr, "metrics", "", "address serving the CA's Prometheus metrics at /metrics (default: none)")
}

func newTokenCmd() *cobra.Command {
	var state string
	cmd := &cobra.Command{
		Use:   "token SPIFFE-ID",
		Short: "Print a short-lived, one-time bootstrap token for exactly one identity",
		Long: `Ask the agentmesh CA running on this host (through the admin socket in its state
directory) for a one-time bootstrap token for SPIFFE-ID and print it. The token is
short-lived and can enrol exactly that identity once.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			id, err := argID("SPIFFE-ID", args[0])
			if err != nil {
				return err
			}
			tok, err := ca.RequestToken(cmd.Context(), state, id)
			if err != nil {
				return err
			}
			_, err = fmt.Fprintln(cmd.OutOrStdout(), tok)
			return err
		},
	}
	addStateFlag(cmd, &state)
	return cmd
}
