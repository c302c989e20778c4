#!/usr/bin/env bash
# Runs every fuzz target for a short time each (default 20s): FUZZTIME=1m make fuzz.
# A failing input is saved under the package's testdata/fuzz/ by go test itself.
set -uo pipefail
t=${1:-20s}
failed=()
for pkg in $(go list ./...); do
  for target in $(go test -list '^Fuzz' "$pkg" 2>/dev/null | grep '^Fuzz' || true); do
    echo "fuzz: $pkg $target ($t)"
    go test -run='^$' -fuzz="^${target}\$" -fuzztime="$t" "$pkg" || failed+=("$pkg $target")
  done
done
if [ ${#failed[@]} -gt 0 ]; then
  printf 'fuzz: failed: %s\n' "${failed[@]}"
  exit 1
fi
echo "fuzz: all targets passed"
