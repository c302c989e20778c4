#!/usr/bin/env bash
# The agentmesh quick start: an embedded CA with its keys in SoftHSM, two proxies with
# one-minute SVIDs, a plain HTTP service behind proxy B and a plain curl loop through
# proxy A. Rotations are printed as they happen. DEMO_DURATION=90s stops it by itself;
# without it, Ctrl-C stops it. Every process and file it makes is removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${BIN:-bin/agentmesh}
duration=${DEMO_DURATION:-}
secs=0
if [ -n "$duration" ]; then
  case "$duration" in
    *m) secs=$(( ${duration%m} * 60 )) ;;
    *s) secs=${duration%s} ;;
    *) secs=$duration ;;
  esac
fi
TD=demo.agentmesh.local
CA_ADDR=127.0.0.1:${DEMO_CA_PORT:-19443}
B_TUNNEL=127.0.0.1:${DEMO_TUNNEL_PORT:-15108}
A_ROUTE=127.0.0.1:${DEMO_ROUTE_PORT:-18080}
SERVICE_PORT=${DEMO_SERVICE_PORT:-18081}
A_ADMIN=127.0.0.1:${DEMO_ADMIN_A_PORT:-15120}
B_ADMIN=127.0.0.1:${DEMO_ADMIN_B_PORT:-15220}

work=$(mktemp -d /tmp/agentmesh-demo.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }
wait_for() { # description, command...
  local what=$1; shift
  for _ in $(seq 1 300); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  echo "demo: timed out waiting for $what" >&2
  tail -n 20 "$work"/*.log >&2 || true
  exit 1
}

go build -o "$work/demoservice" ./internal/demoservice

say "CA: embedded step-ca, root/intermediate/provisioner keys generated inside a SoftHSM2 token"
"$BIN" ca --state "$work/ca" --trust-domain "$TD" --listen "$CA_ADDR" --svid-lifetime 1m 2>"$work/ca.log" &
pids+=($!)
wait_for "the CA" test -S "$work/ca/admin.sock"
wait_for "the CA's API" curl -sf --cacert "$work/ca/root.crt" "https://$CA_ADDR/health"
echo "    private keys in the token (sensitive, never extractable; none on disk):"
SOFTHSM2_CONF="$work/ca/softhsm2.conf" pkcs11-tool --module /usr/lib/softhsm/libsofthsm2.so \
  --login --pin "$(cat "$work/ca/hsm.pin")" --list-objects --type privkey 2>/dev/null |
  awk '/^Private Key Object/ {k=$0} /label:/ {l=$2} /Access:/ {print "      " l ": " $0}' | sed 's/  *Access: */ /' || true

proxy_config() { # name, tunnel, admin, extra
  mkdir -p "$work/$1"
  "$BIN" token --state "$work/ca" "spiffe://$TD/host/$1" >"$work/$1/token"
  cat >"$work/$1/proxy.yaml" <<YAML
id: spiffe://$TD/host/$1
state: $work/$1
tunnel: $2
admin: $3
ca:
  url: https://$CA_ADDR
  root: $work/ca/root.crt
  token_file: token
$4
YAML
}

say "service-b: a plain HTTP server on 127.0.0.1:$SERVICE_PORT (knows nothing of the mesh)"
"$work/demoservice" -listen "127.0.0.1:$SERVICE_PORT" 2>"$work/service.log" &
pids+=($!)

say "proxy b: terminates mTLS on $B_TUNNEL, lets spiffe://$TD/host/a reach port $SERVICE_PORT"
proxy_config b "$B_TUNNEL" "$B_ADMIN" "services:
  - port: $SERVICE_PORT
    allow: [spiffe://$TD/host/a]"
"$BIN" proxy --config "$work/b/proxy.yaml" 2>"$work/b.log" &
pids+=($!)

say "proxy a: plain TCP on $A_ROUTE -> mTLS to proxy b, which must be spiffe://$TD/host/b"
proxy_config a "127.0.0.1:0" "$A_ADMIN" "routes:
  - listen: $A_ROUTE
    peer: $B_TUNNEL
    peer_id: spiffe://$TD/host/b
    target_port: $SERVICE_PORT"
"$BIN" proxy --config "$work/a/proxy.yaml" 2>"$work/a.log" &
pids+=($!)
wait_for "proxy a" curl -sf "http://$A_ADMIN/readyz"
wait_for "proxy b" curl -sf "http://$B_ADMIN/readyz"
"$BIN" status --admin "$A_ADMIN"
"$BIN" status --admin "$B_ADMIN"

say "rotations as they happen (one-minute SVIDs renew when about a third is left):"
( tail -n0 -F "$work/a.log" "$work/b.log" 2>/dev/null | grep --line-buffered 'msg=rotated' | awk '{
    delete kv
    for (i = 1; i <= NF; i++) { eq = index($i, "="); if (eq) kv[substr($i, 1, eq - 1)] = substr($i, eq + 1) }
    printf "    %s rotated %s (trigger %s): serial %s -> %s\n", substr(kv["time"], 12, 8), kv["spiffe_id"], kv["trigger"], kv["old_serial"], kv["serial"]
    fflush()
  }' ) &
pids+=($!)

say "client: curl http://$A_ROUTE/ in a loop${duration:+ for $duration}"
requests=0 failed=0
start=$(date +%s)
while :; do
  now=$(date +%s)
  if [ "$secs" -gt 0 ] && [ $((now - start)) -ge "$secs" ]; then break; fi
  if out=$(curl -sS --max-time 5 "http://$A_ROUTE/" 2>&1); then
    requests=$((requests + 1))
    if [ $((requests % 50)) -eq 1 ]; then echo "    $(date +%T) request $requests: $out"; fi
  else
    requests=$((requests + 1)); failed=$((failed + 1))
    echo "    $(date +%T) request $requests FAILED: $out"
  fi
  sleep 0.1
done

rotations=$(cat "$work/a.log" "$work/b.log" | grep 'msg=rotated' | grep -vc 'trigger=enroll' || true)
# Stopping the proxies flushes their audit logs before they are verified.
kill -TERM "${pids[2]}" "${pids[3]}" 2>/dev/null || true
wait "${pids[2]}" "${pids[3]}" 2>/dev/null || true
for p in a b; do
  echo "    audit log of proxy $p: $("$BIN" audit verify "$work/$p/audit.log")"
done
echo "requests=$requests failed=$failed rotations=$rotations"
[ "$failed" -eq 0 ]
