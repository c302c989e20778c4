package ca

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

	"github.com/miekg/pkcs11"
)

// softHSMEnv tracks the SoftHSM2 configuration this process has handed to the module.
//
// It is package-level state on purpose: it mirrors state that is process-global in the
// C library. SoftHSM reads SOFTHSM2_CONF from the environment once, in C_Initialize, and
// the module stays initialised while any PKCS#11 context in the process uses it
// (crypto11 reference-counts contexts per module path). A second Server with another
// state directory would silently see the first one's tokens, so New refuses it with
// ErrSoftHSMInUse instead.
var softHSMEnv struct {
	mu    sync.Mutex
	conf  string
	users int
}

// acquireSoftHSM points SOFTHSM2_CONF at conf for the PKCS#11 module, which must happen
// before the module's C_Initialize (the first KMS open in this process). The returned
// release is idempotent.
func acquireSoftHSM(conf string) (release func(), err error) {
	softHSMEnv.mu.Lock()
	defer softHSMEnv.mu.Unlock()
	if softHSMEnv.users > 0 && softHSMEnv.conf != conf {
		return nil, fmt.Errorf("%w: %s is active, %s requested", ErrSoftHSMInUse, softHSMEnv.conf, conf)
	}
	if err := os.Setenv("SOFTHSM2_CONF", conf); err != nil {
		return nil, fmt.Errorf("set SOFTHSM2_CONF: %w", err)
	}
	softHSMEnv.conf = conf
	softHSMEnv.users++
	var once sync.Once
	return func() {
		once.Do(func() {
			softHSMEnv.mu.Lock()
			softHSMEnv.users--
			softHSMEnv.mu.Unlock()
		})
	}, nil
}

// softHSMConf is the configuration SoftHSM reads through SOFTHSM2_CONF. The file backend
// keeps each object in its own file under tokendir, inside the state directory, so no
// system directory (root or the softhsm group) is needed.
func softHSMConf(tokenDir string) []byte {
	return fmt.Appendf(nil, `# Written by agentmesh ca. SoftHSM2 reads it through SOFTHSM2_CONF when the
# PKCS#11 module initialises.
directories.tokendir = %s
objectstore.backend = file
log.level = ERROR
slots.removable = false
`, tokenDir)
}

// softHSMKMSURI is the PKCS#11 URI of the embedded token. The PIN is read from pinFile
// by the KMS (pin-source), so it never appears in a URI, a command line or a log.
func softHSMKMSURI(pinFile string) string {
	return "pkcs11:module-path=" + uriValueEscaper.Replace(softHSMModule) +
		";token=" + tokenLabel + "?pin-source=" + uriValueEscaper.Replace("file://"+pinFile)
}

// uriValueEscaper escapes what would end or corrupt a value in a PKCS#11 URI as the KMS
// parses it (url.ParseQuery, which also reads '+' as a space), leaving '/' and ':'
// readable.
var uriValueEscaper = strings.NewReplacer(
	"%", "%25", ";", "%3B", "?", "%3F", "&", "%26", "#", "%23", "=", "%3D", "+", "%2B", " ", "%20")

// prepareSoftHSM creates, when missing, the SoftHSM configuration, the token directory,
// the PIN file and the token itself, and reports whether the token was created now. The
// caller holds the state lock and has acquired the configuration with acquireSoftHSM.
func prepareSoftHSM(stateDir string) (created bool, err error) {
	tokenDir := filepath.Join(stateDir, dirTokens)
	if err := os.MkdirAll(tokenDir, 0o700); err != nil {
		return false, fmt.Errorf("create token directory: %w", err)
	}
	// Rewritten when it differs, e.g. after the state directory was moved: tokendir is
	// an absolute path.
	confPath := filepath.Join(stateDir, fileSoftHSMConf)
	want := softHSMConf(tokenDir)
	if got, err := os.ReadFile(confPath); err != nil || !bytes.Equal(got, want) {
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			return false, fmt.Errorf("read %s: %w", confPath, err)
		}
		if err := writeFileAtomic(confPath, want, 0o600); err != nil {
			return false, err
		}
	}

	// The PIN file is written before the token exists: if we crash in between, the next
	// start initialises the token with the same PIN.
	pinPath := filepath.Join(stateDir, filePIN)
	pin, err := os.ReadFile(pinPath)
	if errors.Is(err, fs.ErrNotExist) {
		pin = []byte(randomPIN())
		if err := writeFileAtomic(pinPath, pin, 0o600); err != nil {
			return false, err
		}
	} else if err != nil {
		return false, fmt.Errorf("read %s: %w", pinPath, err)
	}
	return ensureSoftHSMToken(softHSMModule, tokenLabel, string(pin))
}

// ensureSoftHSMToken initialises a token labelled label in a free slot unless one
// exists. It talks PKCS#11 directly rather than running softhsm2-util, because
// softhsm2-util takes the PINs as arguments, readable by every local user in
// /proc/PID/cmdline while it runs. The SO PIN is random and discarded: nothing in
// agentmesh needs the security officer, and a lost user PIN means a new CA anyway.
func ensureSoftHSMToken(module, label, pin string) (created bool, err error) {
	if _, err := os.Stat(module); err != nil {
		return false, fmt.Errorf("%w: softhsm2 module: %w", ErrHSM, err)
	}
	p := pkcs11.New(module)
	if p == nil {
		return false, fmt.Errorf("%w: cannot load %s", ErrHSM, module)
	}
	defer p.Destroy()
	if err := p.Initialize(); err != nil {
		var perr pkcs11.Error
		if errors.As(err, &perr) && perr == pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED {
			// Someone else in this process initialised the module, possibly with another
			// SOFTHSM2_CONF; finalising it would break them, and creating the token now
			// could put it in the wrong directory.
			return false, fmt.Errorf("%w: module initialised outside agentmesh ca", ErrSoftHSMInUse)
		}
		return false, fmt.Errorf("%w: initialise softhsm2: %w", ErrHSM, err)
	}
	defer func() { _ = p.Finalize() }()

	slot, found, err := findTokenSlot(p, label)
	if err != nil || found {
		return false, err
	}
	free, err := freeSlot(p)
	if err != nil {
		return false, err
	}
	soPIN := randomPIN()
	if err := p.InitToken(free, soPIN, label); err != nil {
		return false, fmt.Errorf("%w: init token: %w", ErrHSM, err)
	}
	// SoftHSM moves an initialised token to a new slot ID.
	slot, found, err = findTokenSlot(p, label)
	if err != nil {
		return false, err
	}
	if !found {
		return false, fmt.Errorf("%w: token %q not found after initialisation", ErrHSM, label)
	}
	s, err := p.OpenSession(slot, pkcs11.CKF_SERIAL_SESSION|pkcs11.CKF_RW_SESSION)
	if err != nil {
		return false, fmt.Errorf("%w: open session: %w", ErrHSM, err)
	}
	defer func() { _ = p.CloseSession(s) }()
	if err := p.Login(s, pkcs11.CKU_SO, soPIN); err != nil {
		return false, fmt.Errorf("%w: security officer login: %w", ErrHSM, err)
	}
	defer func() { _ = p.Logout(s) }()
	if err := p.InitPIN(s, pin); err != nil {
		return false, fmt.Errorf("%w: set user pin: %w", ErrHSM, err)
	}
	return true, nil
}

func findTokenSlot(p *pkcs11.Ctx, label string) (uint, bool, error) {
	slots, err := p.GetSlotList(true)
	if err != nil {
		return 0, false, fmt.Errorf("%w: list slots: %w", ErrHSM, err)
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
		return 0, fmt.Errorf("%w: list slots: %w", ErrHSM, err)
	}
	for _, s := range slots {
		ti, err := p.GetTokenInfo(s)
		if err == nil && ti.Flags&pkcs11.CKF_TOKEN_INITIALIZED == 0 {
			return s, nil
		}
	}
	return 0, fmt.Errorf("%w: no free softhsm2 slot", ErrHSM)
}

// randomPIN returns 128 random bits, hex encoded (SoftHSM accepts 4 to 255 bytes).
func randomPIN() string {
	b := make([]byte, 16)
	_, _ = rand.Read(b) // crypto/rand.Read never fails (Go 1.24+)
	return hex.EncodeToString(b)
}
