package authority

import (
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.step.sm/crypto/kms/apiv1"

	"github.com/agentmesh/agentmesh/internal/atomicfile"
)

// pkiRecord is StateDir/pki.json: which generations the authority holds and where their
// keys are. Their certificates are in gen-N-root.crt, gen-N-intermediate.crt and
// gen-N-cross.crt next to it. Without it the state directory holds generation 1 only,
// in root.crt and intermediate.crt.
type pkiRecord struct {
	Active   genRecord  `json:"active"`
	Next     *genRecord `json:"next,omitempty"`
	Previous *genRecord `json:"previous,omitempty"`
	Last     int        `json:"last"`
	Deleting []string   `json:"deleting,omitempty"`
}

type genRecord struct {
	N               int    `json:"n"`
	RootKey         string `json:"root_key"`
	IntermediateKey string `json:"intermediate_key"`
}

func recordOf(g *generation) *genRecord {
	if g == nil {
		return nil
	}
	return &genRecord{N: g.N, RootKey: g.RootKey, IntermediateKey: g.IntermediateKey}
}

// Certificate files of a generation.
const (
	genRoot         = "root"
	genIntermediate = "intermediate"
	genCross        = "cross"
)

func genFile(dir string, n int, what string) string {
	return filepath.Join(dir, fmt.Sprintf("gen-%d-%s.crt", n, what))
}

// genFileRE matches the names genFile makes, capturing the generation number.
var genFileRE = regexp.MustCompile(`^gen-([0-9]+)-(root|intermediate|cross)\.crt$`)

// savePKI persists st: the certificate files of every held generation, root.crt and
// intermediate.crt (the active generation's, for tools reading them), then pki.json,
// so that whichever pki.json a crash leaves finds its files.
func savePKI(dir string, st *pkiState) error {
	for _, g := range st.held() {
		files := map[string][]byte{
			genFile(dir, g.N, genRoot):         pemCert(g.Root),
			genFile(dir, g.N, genIntermediate): pemCert(g.Intermediate),
		}
		if len(g.Cross) > 0 {
			var b []byte
			for _, c := range g.Cross {
				b = append(b, pemCert(c)...)
			}
			files[genFile(dir, g.N, genCross)] = b
		}
		for path, b := range files {
			if err := atomicfile.Write(path, b, 0o644); err != nil {
				return err
			}
		}
	}
	rec := pkiRecord{Active: *recordOf(st.active), Next: recordOf(st.next), Previous: recordOf(st.previous),
		Last: st.last, Deleting: st.deleting}
	b, err := json.MarshalIndent(rec, "", "  ")
	if err != nil {
		return fmt.Errorf("encode %s: %w", filePKI, err)
	}
	if err := atomicfile.Write(filepath.Join(dir, filePKI), append(b, '\n'), 0o644); err != nil {
		return err
	}
	return writeActiveFiles(dir, st.active)
}

// writeActiveFiles makes root.crt and intermediate.crt hold g's certificates, unless
// they do already.
func writeActiveFiles(dir string, g *generation) error {
	for name, c := range map[string]*x509.Certificate{fileRoot: g.Root, fileIntermediate: g.Intermediate} {
		path := filepath.Join(dir, name)
		if cur, err := readCertFile(path); err == nil && cur != nil && cur.Equal(c) {
			continue
		}
		if err := atomicfile.Write(path, pemCert(c), 0o644); err != nil {
			return err
		}
	}
	return nil
}

// removeStaleFiles removes the certificate files of generations st does not hold.
func removeStaleFiles(dir string, st *pkiState) error {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("read %s: %w", dir, err)
	}
	for _, e := range entries {
		m := genFileRE.FindStringSubmatch(e.Name())
		if m == nil {
			continue
		}
		n, _ := strconv.Atoi(m[1])
		if _, held := st.byNumber(n); held {
			continue
		}
		if err := os.Remove(filepath.Join(dir, e.Name())); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("remove %s: %w", e.Name(), err)
		}
	}
	return nil
}

// loadPKI returns the generations of the state directory. Without pki.json it is
// generation 1, created on first start (loadOrCreatePKI); created reports that.
func loadPKI(km apiv1.KeyManager, dir string, td spiffeid.TrustDomain, now time.Time) (_ *pkiState, created bool, _ error) {
	b, err := os.ReadFile(filepath.Join(dir, filePKI))
	if errors.Is(err, fs.ErrNotExist) {
		certs, created, err := loadOrCreatePKI(km, dir, td, now)
		if err != nil {
			return nil, false, err
		}
		g := &generation{
			Generation: Generation{N: 1, Root: certs.root, Intermediate: certs.intermediate,
				RootKey: keyURIRoot, IntermediateKey: keyURIIntermediate},
			rootSigner: certs.rootSigner, intermediateSigner: certs.intermediateSigner,
		}
		return (&pkiState{active: g, last: 1}).with(func(*pkiState) {}), created, nil
	}
	if err != nil {
		return nil, false, fmt.Errorf("read %s: %w", filePKI, err)
	}
	var rec pkiRecord
	if err := json.Unmarshal(b, &rec); err != nil {
		return nil, false, fmt.Errorf("%s: %w", filePKI, err)
	}
	st := &pkiState{last: rec.Last, deleting: rec.Deleting}
	if st.active, err = loadGeneration(km, dir, td, &rec.Active); err != nil {
		return nil, false, err
	}
	if now.After(st.active.Intermediate.NotAfter) {
		return nil, false, fmt.Errorf("intermediate of generation %d expired at %v", st.active.N, st.active.Intermediate.NotAfter)
	}
	if st.next, err = loadGeneration(km, dir, td, rec.Next); err != nil {
		return nil, false, err
	}
	if st.previous, err = loadGeneration(km, dir, td, rec.Previous); err != nil {
		return nil, false, err
	}
	// A crash may have come between pki.json and the files of the active generation.
	if err := writeActiveFiles(dir, st.active); err != nil {
		return nil, false, err
	}
	return st.with(func(*pkiState) {}), false, nil
}

// loadGeneration reads the certificates of rec's generation and checks them against
// the trust domain and the keys in the token; a nil rec is no generation.
func loadGeneration(km apiv1.KeyManager, dir string, td spiffeid.TrustDomain, rec *genRecord) (*generation, error) {
	if rec == nil {
		return nil, nil
	}
	g := &generation{Generation: Generation{N: rec.N, RootKey: rec.RootKey, IntermediateKey: rec.IntermediateKey}}
	rootPath, interPath := genFile(dir, rec.N, genRoot), genFile(dir, rec.N, genIntermediate)
	var err error
	if g.Root, err = requireCertFile(rootPath); err != nil {
		return nil, err
	}
	if g.Intermediate, err = requireCertFile(interPath); err != nil {
		return nil, err
	}
	if g.Cross, err = readCertsFile(genFile(dir, rec.N, genCross)); err != nil {
		return nil, err
	}
	if err := checkRoot(g.Root, rootPath, td); err != nil {
		return nil, err
	}
	if err := g.Intermediate.CheckSignatureFrom(g.Root); err != nil {
		return nil, fmt.Errorf("%s is not signed by %s: %w", interPath, rootPath, err)
	}
	if g.rootSigner, err = loadMatchingKey(km, g.RootKey, g.Root, rootPath); err != nil {
		return nil, err
	}
	if g.intermediateSigner, err = loadMatchingKey(km, g.IntermediateKey, g.Intermediate, interPath); err != nil {
		return nil, err
	}
	return g, nil
}

// requireCertFile is readCertFile for a file that must exist.
func requireCertFile(path string) (*x509.Certificate, error) {
	c, err := readCertFile(path)
	if err == nil && c == nil {
		err = fmt.Errorf("%s: %w", path, fs.ErrNotExist)
	}
	return c, err
}

// readCertsFile reads a PEM bundle of certificates; a missing file is (nil, nil).
func readCertsFile(path string) ([]*x509.Certificate, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	var certs []*x509.Certificate
	for {
		var block *pem.Block
		if block, b = pem.Decode(b); block == nil {
			return certs, nil
		}
		c, err := parseCertBlock(path, block)
		if err != nil {
			return nil, err
		}
		certs = append(certs, c)
	}
}
