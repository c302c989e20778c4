#!/usr/bin/env bash
# Enforces the dependency direction of docs/architecture.md: each package imports only
# the packages of ours its row allows (transitively, so a detour through another package
# counts), plus the shared helpers under internal/. ca, rotator and proxy never import each
# other; node never imports ca; ca never imports node, proxy, rotator or meshclient.
# A package that does not exist (yet) is skipped, so the rules can name the whole layout.
set -euo pipefail
cd "$(dirname "$0")/.."
mod=$(go list -m)
fail=0

# deps prints the packages of this module that the non-test code of pkg (and of the
# packages under it) imports, directly or not, without pkg's own tree and internal/.
deps() {
  local pkg=$1
  go list -deps "./$pkg/..." | sed -n "s|^$mod/||p" |
    grep -v -e "^$pkg\$" -e "^$pkg/" -e '^internal/' || true
}

present() {
  if [ -d "$1" ] && [ -n "$(go list "./$1/..." 2>/dev/null)" ]; then
    return 0
  fi
  echo "depcheck: $1 not present, skipped"
  return 1
}

# only PKG ALLOWED...: PKG imports nothing of ours outside ALLOWED.
only() {
  local pkg=$1; shift
  present "$pkg" || return 0
  local dep
  for dep in $(deps "$pkg"); do
    if ! printf '%s\n' "$@" | grep -qx "$dep"; then
      echo "depcheck: $pkg must not import $dep (allowed: ${*:-nothing of ours})"; fail=1
    fi
  done
}

# never PKG FORBIDDEN...: PKG imports none of FORBIDDEN; says so by name even where an
# only rule already covers it, so the rules of the architecture read here one by one.
never() {
  local pkg=$1; shift
  present "$pkg" >/dev/null || return 0
  local all bad
  all=$(deps "$pkg")
  for bad in "$@"; do
    if grep -qx -e "$bad" -e "$bad/.*" <<<"$all"; then
      echo "depcheck: $pkg must never import $bad"; fail=1
    fi
  done
}

only policy
only audit
only hsm
only redirect
only meshapi policy audit
only meshclient meshapi policy audit
only ca meshapi policy audit audit/siem hsm
only ca/authority meshapi policy audit hsm
only rotator policy audit
only proxy policy audit
only node proxy rotator meshclient meshapi policy audit audit/siem hsm
only internal policy audit hsm

never ca node proxy rotator meshclient
never rotator ca proxy node
never proxy ca rotator node
never node ca
never meshapi ca node meshclient proxy rotator
never meshclient ca node proxy rotator

[ $fail -eq 0 ] && echo "depcheck: ok"
exit $fail
