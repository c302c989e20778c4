#!/usr/bin/env bash
# Installs what agentmesh's build, tests and demo need and the machine lacks; a no-op
# when everything is present.
set -euo pipefail

need=()
have() { command -v "$1" >/dev/null 2>&1; }
have softhsm2-util || need+=(softhsm2)
[ -e /usr/lib/softhsm/libsofthsm2.so ] || need+=(softhsm2)
have pkcs11-tool || need+=(opensc)
have iptables || need+=(iptables)
have curl || need+=(curl)
have ip || need+=(iproute2)
have gcc || need+=(gcc)
have make || need+=(make)
have tcpdump || need+=(tcpdump)
have python3 || need+=(python3-minimal)   # the half-close test's client
have setpriv || need+=(util-linux)
have systemd-analyze || need+=(systemd)   # verifies deploy/systemd in the tests
# The SIEM test's receiver: rsyslogd with its TLS stream driver (lmnsd_gtls).
have rsyslogd || need+=(rsyslog)
ls /usr/lib/*/rsyslog/lmnsd_gtls.so >/dev/null 2>&1 || need+=(rsyslog-gnutls)
have chromium || need+=(chromium)   # the status page's browser test (chromedp)

if [ ${#need[@]} -eq 0 ]; then
  echo "deps: all present"
else
  mapfile -t need < <(printf '%s\n' "${need[@]}" | sort -u)
  echo "deps: installing ${need[*]}"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
go mod download

# The step CLI, for the e2e test of `step ca revoke` against agentmesh ca. Pinned;
# CGO_ENABLED=0 leaves out its YubiKey and PKCS#11 support, which needs
# libpcsclite and is of no use here.
STEP_VERSION=v0.29.0
if ! have step && [ ! -x "$(go env GOPATH)/bin/step" ]; then
  echo "deps: installing step $STEP_VERSION"
  CGO_ENABLED=0 go install "github.com/smallstep/cli/cmd/step@$STEP_VERSION"
fi

# golangci-lint, for make check-static. Pinned: a newer release adds checks and would
# fail the build on code that did not change. Built from source with the Go on the
# machine, so it understands that Go's version; CGO_ENABLED=0 because the linter needs
# no C (the code it loads still builds with cgo: see the Makefile).
GOLANGCI_LINT_VERSION=2.15.0
lint="$(go env GOPATH)/bin/golangci-lint"
if [ "$("$lint" version --short 2>/dev/null || true)" != "$GOLANGCI_LINT_VERSION" ]; then
  echo "deps: installing golangci-lint v$GOLANGCI_LINT_VERSION"
  CGO_ENABLED=0 go install "github.com/golangci/golangci-lint/v2/cmd/golangci-lint@v$GOLANGCI_LINT_VERSION"
fi
