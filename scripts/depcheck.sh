#!/usr/bin/env bash
# Enforces the dependency direction of ARCHITECTURE.md: ca, rotator and proxy never
# import each other; policy, audit and hsm import nothing of ours.
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
deny ca rotator proxy
deny rotator ca proxy hsm
deny proxy ca rotator hsm
deny ca/authority ca rotator proxy
[ $fail -eq 0 ] && echo "depcheck: ok"
exit $fail
