package hsm

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"unicode"
	"unicode/utf8"

	"github.com/miekg/pkcs11"

	"github.com/agentmesh/agentmesh/internal/atomicfile"
)

// SoftHSMModule is the SoftHSM2 PKCS#11 module (the Debian/Ubuntu path of the softhsm2
// package).
const SoftHSMModule = "/usr/lib/softhsm/libsofthsm2.so"

// Files and directories inside the directory SoftHSM prepares. The names are those the
// CA's state directory has always used, so existing tokens keep working.
const (
	fileConf  = "softhsm2.conf"
	filePIN   = "hsm.pin"       // where earlier versions kept the PIN; moved out by loadPIN
	fileLock  = "softhsm2.lock" // not "lock": the CA flocks that one for its whole life
	dirTokens = "tokens"
)

// maxTokenLabel is the size of CK_TOKEN_INFO.label; PKCS#11 pads shorter labels with
// spaces, which is why a label may not end in one.
const maxTokenLabel = 32

// softHSMEnv tracks the SoftHSM2 configuration this process has handed to the module.
//
// It is package-level state on purpose: it mirrors state that is process-global in the
// C library. SoftHSM reads SOFTHSM2_CONF from the environment in C_Initialize, and the
// module stays initialised while any PKCS#11 context in the process uses it (crypto11
// reference-counts contexts per module path). A second user with another directory
// would silently see the first one's tokens, so SoftHSM refuses it with
// ErrSoftHSMInUse instead.
var softHSMEnv struct {
	mu    sync.Mutex
	conf  string
	users int
}

// tokenMu serialises, within this process, every PKCS#11 call of this package that
// can initialise or finalise a module, or create, delete or search token objects:
// token preparation (its own C_Initialize/C_Finalize and C_InitToken), opening and
// closing the crypto11 contexts of OpenKMS and OpenKeys, and Keys.NewKey, Destroy and
// List. Two reasons:
//   - preparation could otherwise finalise the module under a context being opened, or
//     make that open fail with CKR_CRYPTOKI_ALREADY_INITIALIZED;
//   - SoftHSM 2.6's file object store is not safe for concurrent use within a process:
//     while one thread writes a new object, another that indexes the token can read
//     the half-written file, and key generation fails at random with
//     CKR_GENERAL_ERROR, CKR_TEMPLATE_INCONSISTENT or a handle that is invalid at once
//     (softhsm/SoftHSMv2#573, #688; seen here in this package's parallel tests).
//
// These calls happen once per rotation, so one lock for all tokens costs nothing.
// Signing, the hot path, does not take it.
var tokenMu sync.Mutex

// SoftHSM prepares (first use: creates) a SoftHSM2 token labelled label in dir and
// returns the PKCS#11 URI of it, for go.step.sm/crypto/kms/pkcs11 (OpenKMS) and
// OpenKeys. dir holds, all created when missing:
//
//	softhsm2.conf   the configuration SoftHSM reads (0600), rewritten when it differs
//	tokens/         SoftHSM's token directory (0700): one directory per token, one
//	                encrypted file per object
//	softhsm2.lock   held (flock) while a token is prepared, so concurrent processes
//	                never create two tokens with one label
//
// The random user PIN, shared by the tokens of dir, is read from pinFile, which must be
// outside dir ("" means DefaultPINFile(dir)); it is created (0600) when missing, and a
// dir/hsm.pin left by an earlier version is moved there (see loadPIN). The SO PIN is
// random and discarded.
//
// The URI names the PIN file (pin-source), never the PIN, so it is safe in logs and
// command lines.
//
// SoftHSM sets SOFTHSM2_CONF in the process environment: SoftHSM reads its
// configuration only from that variable, only when the module initialises, and the
// system default needs root or the softhsm group. A process therefore serves one dir at
// a time: while any release of another dir is outstanding, SoftHSM fails with
// ErrSoftHSMInUse. Several tokens (labels) in one dir, and several calls for the same
// dir, are fine. Call release, which is idempotent, after closing every KMS and Keys
// opened on the URI.
func SoftHSM(dir, label, pinFile string) (uri string, release func(), err error) {
	if err := checkLabel(label, maxTokenLabel); err != nil {
		return "", nil, fmt.Errorf("%w: token label %q: %w", ErrInvalidLabel, label, err)
	}
	if strings.HasSuffix(label, " ") {
		return "", nil, fmt.Errorf("%w: token label %q ends with a space", ErrInvalidLabel, label)
	}
	// tokendir in the configuration must not depend on the working directory.
	if dir, err = filepath.Abs(dir); err != nil {
		return "", nil, fmt.Errorf("hsm: softhsm2 directory: %w", err)
	}
	if pinFile == "" {
		pinFile = DefaultPINFile(dir)
	}
	if pinFile, err = filepath.Abs(pinFile); err != nil {
		return "", nil, fmt.Errorf("hsm: pin file: %w", err)
	}
	if err := checkPINFile(dir, pinFile); err != nil {
		return "", nil, err
	}
	release, shared, err := acquireSoftHSM(filepath.Join(dir, fileConf))
	if err != nil {
		return "", nil, err
	}
	if err := prepareSoftHSM(dir, label, pinFile, shared); err != nil {
		release()
		return "", nil, err
	}
	return softHSMURI(label, pinFile), release, nil
}

// acquireSoftHSM points SOFTHSM2_CONF at conf for the PKCS#11 module, which must happen
// before the module's C_Initialize. shared reports that another holder of the same
// configuration was already registered, so the module may legitimately be initialised
// already (by that holder's contexts). The returned release is idempotent.
func acquireSoftHSM(conf string) (release func(), shared bool, err error) {
	softHSMEnv.mu.Lock()
	defer softHSMEnv.mu.Unlock()
	if softHSMEnv.users > 0 && softHSMEnv.conf != conf {
		return nil, false, fmt.Errorf("%w: %s is active, %s requested", ErrSoftHSMInUse, softHSMEnv.conf, conf)
	}
	if err := os.Setenv("SOFTHSM2_CONF", conf); err != nil {
		return nil, false, fmt.Errorf("hsm: set SOFTHSM2_CONF: %w", err)
	}
	shared = softHSMEnv.users > 0
	softHSMEnv.conf = conf
	softHSMEnv.users++
	var once sync.Once
	return func() {
		once.Do(func() {
			softHSMEnv.mu.Lock()
			softHSMEnv.users--
			softHSMEnv.mu.Unlock()
		})
	}, shared, nil
}

// softHSMConf is the configuration SoftHSM reads through SOFTHSM2_CONF. The file backend
// keeps each object in its own file under tokenDir, so no system directory (root or the
// softhsm group) is needed.
func softHSMConf(tokenDir string) []byte {
	return fmt.Appendf(nil, `# Written by agentmesh. SoftHSM2 reads it through SOFTHSM2_CONF when the
# PKCS#11 module initialises.
directories.tokendir = %s
objectstore.backend = file
log.level = ERROR
slots.removable = false
`, tokenDir)
}

// softHSMURI is the PKCS#11 URI of the token label. The KMS and OpenKeys read the PIN
// from pinFile (pin-source), so it never appears in a URI, a command line or a log.
func softHSMURI(label, pinFile string) string {
	return "pkcs11:module-path=" + uriValueEscaper.Replace(SoftHSMModule) +
		";token=" + uriValueEscaper.Replace(label) +
		"?pin-source=" + uriValueEscaper.Replace("file://"+pinFile)
}

// uriValueEscaper escapes what would end or corrupt a value in a PKCS#11 URI as the KMS
// parses it (url.ParseQuery, which also reads '+' as a space), leaving '/' and ':'
// readable.
var uriValueEscaper = strings.NewReplacer(
	"%", "%25", ";", "%3B", "?", "%3F", "&", "%26", "#", "%23", "=", "%3D", "+", "%2B", " ", "%20")

// prepareSoftHSM creates, when missing, the configuration, the token directory, the PIN
// file and the token labelled label.
func prepareSoftHSM(dir, label, pinFile string, shared bool) error {
	tokenDir := filepath.Join(dir, dirTokens)
	if err := os.MkdirAll(tokenDir, 0o700); err != nil {
		return fmt.Errorf("hsm: create token directory: %w", err)
	}
	// The flock keeps other processes out; tokenMu keeps the rest of this one out (a
	// second flock in this process would wait too, but tokenMu must be held for the
	// PKCS#11 part anyway).
	tokenMu.Lock()
	defer tokenMu.Unlock()
	unlock, err := lockDir(filepath.Join(dir, fileLock))
	if err != nil {
		return err
	}
	defer unlock()

	// Rewritten when it differs, e.g. after the directory was moved: tokendir is an
	// absolute path.
	confPath := filepath.Join(dir, fileConf)
	want := softHSMConf(tokenDir)
	if got, err := os.ReadFile(confPath); err != nil || !bytes.Equal(got, want) {
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("hsm: read %s: %w", confPath, err)
		}
		if err := atomicfile.Write(confPath, want, 0o600); err != nil {
			return err
		}
	}

	pin, err := loadPIN(dir, pinFile)
	if err != nil {
		return err
	}
	return ensureToken(SoftHSMModule, label, string(bytes.TrimRightFunc(pin, unicode.IsSpace)), shared)
}

// ensureToken initialises a token labelled label in a free slot unless one exists. It
// talks PKCS#11 directly rather than running softhsm2-util, because softhsm2-util takes
// the PINs as arguments, readable by every local user in /proc/PID/cmdline while it
// runs. The SO PIN is random and discarded: nothing needs the security officer, and a
// lost user PIN means new keys anyway. The caller holds tokenMu.
func ensureToken(module, label, pin string, shared bool) error {
	if _, err := os.Stat(module); err != nil {
		return fmt.Errorf("%w: softhsm2 module: %w", ErrToken, err)
	}
	p := pkcs11.New(module)
	if p == nil {
		return fmt.Errorf("%w: cannot load %s", ErrToken, module)
	}
	defer p.Destroy()
	switch err := p.Initialize(); {
	case err == nil:
		defer func() { _ = p.Finalize() }()
	case errors.Is(err, pkcs11.Error(pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED)) && shared:
		// A holder of this same configuration has contexts open: use the module as it
		// is, and leave it initialised for them.
	case errors.Is(err, pkcs11.Error(pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED)):
		// Someone else in this process initialised the module, possibly with another
		// SOFTHSM2_CONF; finalising it would break them, and creating the token now
		// could put it in the wrong directory.
		return fmt.Errorf("%w: module initialised outside this package", ErrSoftHSMInUse)
	default:
		return fmt.Errorf("%w: initialise softhsm2: %w", ErrToken, err)
	}

	_, found, err := findTokenSlot(p, label)
	if err != nil || found {
		return err
	}
	free, err := freeSlot(p)
	if err != nil {
		return err
	}
	soPIN := randomPIN()
	if err := p.InitToken(free, soPIN, label); err != nil {
		return fmt.Errorf("%w: init token: %w", ErrToken, err)
	}
	// SoftHSM moves an initialised token to a new slot ID.
	slot, found, err := findTokenSlot(p, label)
	if err != nil {
		return err
	}
	if !found {
		return fmt.Errorf("%w: token %q not found after initialisation", ErrToken, label)
	}
	s, err := p.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
	if err != nil {
		return fmt.Errorf("%w: open session: %w", ErrToken, err)
	}
	defer func() { _ = p.CloseSession(s) }()
	if err := p.Login(s, pkcs11.CKU_SO, soPIN); err != nil {
		return fmt.Errorf("%w: security officer login: %w", ErrToken, err)
	}
	defer func() { _ = p.Logout(s) }()
	if err := p.InitPIN(s, pin); err != nil {
		return fmt.Errorf("%w: set user pin: %w", ErrToken, err)
	}
	return nil
}

func findTokenSlot(p *pkcs11.Ctx, label string) (uint, bool, error) {
	slots, err := p.GetSlotList(true)
	if err != nil {
		return 0, false, fmt.Errorf("%w: list slots: %w", ErrToken, err)
	}
	for _, s := range slots {
		ti, err := p.GetTokenInfo(s)
		if err != nil {
			continue
		}
		if ti.Flags&pkcs11.CKF_TOKEN_INITIALIZED != 0 && ti.Label == label {
			return s, true, nil
		}
	}
	return 0, false, nil
}

func freeSlot(p *pkcs11.Ctx) (uint, error) {
	slots, err := p.GetSlotList(true)
	if err != nil {
		return 0, fmt.Errorf("%w: list slots: %w", ErrToken, err)
	}
	for _, s := range slots {
		ti, err := p.GetTokenInfo(s)
		if err == nil && ti.Flags&pkcs11.CKF_TOKEN_INITIALIZED == 0 {
			return s, nil
		}
	}
	return 0, fmt.Errorf("%w: no free softhsm2 slot", ErrToken)
}

// randomPIN returns 128 random bits, hex encoded (SoftHSM accepts 4 to 255 bytes).
func randomPIN() string {
	b := make([]byte, 16)
	_, _ = rand.Read(b) // crypto/rand.Read never fails (Go 1.24+)
	return hex.EncodeToString(b)
}

// checkLabel accepts 1 to maxLen bytes of UTF-8 without control characters: labels end up
// in logs, audit records and pkcs11-tool listings.
func checkLabel(label string, maxLen int) error {
	switch {
	case label == "":
		return errors.New("empty")
	case len(label) > maxLen:
		return fmt.Errorf("longer than %d bytes", maxLen)
	case !utf8.ValidString(label):
		return errors.New("not UTF-8")
	case strings.IndexFunc(label, unicode.IsControl) >= 0:
		return errors.New("control character")
	}
	return nil
}
