#!/usr/bin/env bash
# Enforces the dependency direction of ARCHITECTURE.md: ca, rotator and proxy never
# import each other; policy, audit and hsm import nothing of ours; meshapi imports only
# policy and audit, and meshclient only meshapi and audit.
set -euo pipefail
mod=$(go list -m)
fail=0
deny() { # package, forbidden packages...
  local pkg=$1; shift
  local deps
  deps=$(go list -deps "./$pkg" | grep "^$mod/" || true)
  for bad in "$@"; do
    if grep -qx "$mod/$bad" <<<"$deps"; then
      echo "depcheck: $pkg must not import $bad"; fail=1
    fi
  done
}
deny policy audit ca rotator proxy hsm
deny audit policy ca rotator proxy hsm
deny hsm policy audit ca rotator proxy
deny ca rotator proxy meshclient
deny rotator ca proxy hsm
deny proxy ca rotator hsm
deny meshapi ca rotator proxy hsm meshclient
deny meshclient ca rotator proxy hsm policy
[ $fail -eq 0 ] && echo "depcheck: ok"
exit $fail
