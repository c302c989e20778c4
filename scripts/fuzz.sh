#!/usr/bin/env bash
# Runs every fuzz target for a short time each (default 20s): FUZZTIME=1m make fuzz
set -euo pipefail
t=${1:-20s}
for pkg in $(go list ./...); do
  for target in $(go test -list '^Fuzz' "$pkg" 2>/dev/null | grep '^Fuzz' || true); do
    echo "fuzz: $pkg $target ($t)"
    go test -run='^$' -fuzz="^${target}\$" -fuzztime="$t" "$pkg"
  done
done
