package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"time"

	"github.com/spf13/cobra"
	"go.step.sm/crypto/pemutil"

	"github.com/agentmesh/agentmesh/audit"
	"github.com/agentmesh/agentmesh/meshapi"
)

func newAuditCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "audit", Short: "Work with audit logs"}
	cmd.AddCommand(newAuditVerifyCmd(), newAuditProveCmd(), newAuditCheckProofCmd())
	return cmd
}

type verifyFlags struct {
	checkpoint, key, witness, root, origin string
}

func newAuditVerifyCmd() *cobra.Command {
	var f verifyFlags
	cmd := &cobra.Command{
		Use:   "verify FILE...",
		Short: "Verify audit logs: hash chain, Merkle tree, checkpoint and witness; exit non-zero naming the first bad record",
		Long: `Verify checks every segment and the active file of each log: the hash chain of every
record, then the Merkle tree against the writer's checkpoint (--checkpoint, by default
FILE.checkpoint when present; its signature is checked with --key or the key the witness
bound to the log) and, with --witness, against what the CA's witness cosigned: a cut tail
or a rewritten log fails naming the first index that differs.`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if f.checkpoint != "" && len(args) > 1 {
				return errors.New("--checkpoint applies to one FILE")
			}
			if (f.witness == "") != (f.root == "") {
				return errors.New("--witness needs --root, the mesh's root bundle")
			}
			bad := false
			for _, path := range args {
				o := f.verify(cmd.Context(), path)
				if _, err := io.WriteString(cmd.OutOrStdout(), path+": "+verifyLine(o)+"\n"); err != nil {
					return err
				}
				bad = bad || o.err != nil
			}
			if bad {
				return errors.New("audit verification failed")
			}
			return nil
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&f.checkpoint, "checkpoint", "", "the writer's signed checkpoint (default FILE.checkpoint when present)")
	fl.StringVar(&f.key, "key", "", "the writer's audit verifier key, to check the checkpoint's signature")
	fl.StringVar(&f.witness, "witness", "", "the CA's HTTPS URL: check the log against the checkpoints its witness cosigned")
	fl.StringVar(&f.root, "root", "", "the mesh's root bundle, to verify the witness (with --witness)")
	fl.StringVar(&f.origin, "origin", "", "the log's origin at the witness (default: from the checkpoint)")
	return cmd
}

type verifyOutcome struct {
	rep audit.VerifyReport
	err error
}

func verifyLine(o verifyOutcome) string {
	if o.err != nil {
		return fmt.Sprintf("BAD after %d good records: %v", o.rep.Records, o.err)
	}
	s := fmt.Sprintf("OK (%d records", o.rep.Records)
	if c := o.rep.Checkpoint; c != nil {
		signed := "signature checked"
		if !o.rep.CheckpointSigned {
			signed = "signature NOT checked: give --key or --witness"
		}
		s += fmt.Sprintf("; checkpoint %d, %s", c.Size, signed)
	}
	if c := o.rep.Witnessed; c != nil {
		s += fmt.Sprintf("; witnessed %d", c.Size)
	}
	if o.rep.TornBytes > 0 {
		s += fmt.Sprintf("; %d bytes of an unfinished last line ignored", o.rep.TornBytes)
	}
	return s + ")"
}

func (f verifyFlags) verify(ctx context.Context, path string) verifyOutcome {
	var opts audit.VerifyOptions
	cp, err := readOptional(f.checkpoint, path+".checkpoint")
	if err != nil {
		return verifyOutcome{err: err}
	}
	opts.Checkpoint, opts.Key = cp, f.key
	if f.witness != "" {
		if opts.Witness, err = f.fetchWitness(ctx, path, cp); err != nil {
			return verifyOutcome{err: err}
		}
	}
	rep, err := audit.VerifyLog(path, opts)
	return verifyOutcome{rep: rep, err: err}
}

// readOptional reads the file given by a flag, or the default file when it exists.
func readOptional(given, dflt string) ([]byte, error) {
	if given != "" {
		return os.ReadFile(given)
	}
	b, err := os.ReadFile(dflt)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	return b, err
}

func (f verifyFlags) fetchWitness(ctx context.Context, path string, cp []byte) (*audit.WitnessView, error) {
	origin := f.origin
	if origin == "" {
		for _, b := range [][]byte{cp, readOrNil(path + ".cosigned")} {
			if c, err := audit.UnverifiedCheckpoint(b); err == nil {
				origin = c.Origin
				break
			}
		}
	}
	if origin == "" {
		return nil, errors.New("no checkpoint to take the log's origin from: give --origin")
	}
	client, err := rootClient(f.root)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	wl, err := meshapi.FetchWitnessedLog(ctx, client, f.witness, origin)
	if err != nil {
		return nil, err
	}
	v, err := wl.View()
	if err != nil {
		return nil, err
	}
	return &v, nil
}

func readOrNil(path string) []byte {
	b, _ := os.ReadFile(path) // optional: a missing file means none
	return b
}

// rootClient is an HTTPS client trusting only the bundle in root.
func rootClient(root string) (*http.Client, error) {
	certs, err := pemutil.ReadCertificateBundle(root)
	if err != nil {
		return nil, fmt.Errorf("--root: %w", err)
	}
	pool := x509.NewCertPool()
	for _, c := range certs {
		pool.AddCert(c)
	}
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.TLSClientConfig = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	return &http.Client{Transport: tr}, nil
}

func newAuditProveCmd() *cobra.Command {
	var (
		index      uint64
		checkpoint string
	)
	cmd := &cobra.Command{
		Use:   "prove FILE --index I",
		Short: "Print an inclusion proof of record I (seq I+1) in the log's cosigned checkpoint, as JSON",
		Long: `Prove prints one JSON document: the record's line, its index, the tree size, the
proof's hashes and the signed checkpoint (--checkpoint, by default FILE.cosigned, else
FILE.checkpoint). "agentmesh audit check-proof" checks it offline, as can any program with
tlog.CheckRecord and note.Open.`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			path := args[0]
			cp, err := readOptional(checkpoint, path+".cosigned")
			if err == nil && cp == nil {
				cp, err = readOptional("", path+".checkpoint")
			}
			if err != nil {
				return err
			}
			if cp == nil {
				return fmt.Errorf("%s has no checkpoint: give --checkpoint", path)
			}
			p, err := audit.ProveFile(path, index, cp)
			if err != nil {
				return err
			}
			enc := json.NewEncoder(cmd.OutOrStdout())
			enc.SetIndent("", "  ")
			return enc.Encode(p)
		},
	}
	cmd.Flags().Uint64Var(&index, "index", 0, "the record's index (its seq - 1)")
	cmd.Flags().StringVar(&checkpoint, "checkpoint", "", "the signed checkpoint to prove against")
	_ = cmd.MarkFlagRequired("index") // a registered flag: cannot fail
	return cmd
}

func newAuditCheckProofCmd() *cobra.Command {
	var keys []string
	cmd := &cobra.Command{
		Use:   "check-proof PROOF --key VKEY...",
		Short: "Check an inclusion proof offline: the checkpoint signed by every --key, the record in its tree",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			b, err := readArg(cmd, args[0])
			if err != nil {
				return err
			}
			p, err := audit.ParseInclusionProof(b)
			if err != nil {
				return err
			}
			vs := make([]*audit.NoteVerifier, 0, len(keys))
			for _, k := range keys {
				v, err := audit.ParseVerifierKey(k)
				if err != nil {
					return fmt.Errorf("--key: %w", err)
				}
				vs = append(vs, v)
			}
			c, err := audit.CheckInclusion(p, vs...)
			if err != nil {
				return err
			}
			_, err = fmt.Fprintf(cmd.OutOrStdout(), "OK: record %d is in %s at size %d, signed by %d keys\n", p.Index, c.Origin, c.Size, len(vs))
			return err
		},
	}
	cmd.Flags().StringArrayVar(&keys, "key", nil, "a verifier key that must have signed the checkpoint (the writer's, the witness's); repeat")
	_ = cmd.MarkFlagRequired("key") // a registered flag: cannot fail
	return cmd
}

// readArg reads the file named by arg, or standard input for "-".
func readArg(cmd *cobra.Command, arg string) ([]byte, error) {
	if arg == "-" {
		return io.ReadAll(io.LimitReader(cmd.InOrStdin(), 8<<20))
	}
	return os.ReadFile(arg)
}
