#!/usr/bin/env bash
# The agentmesh quick start: an embedded CA with its keys in SoftHSM, two proxies with
# one-minute SVIDs, a plain HTTP service behind proxy B and a plain curl loop on host A.
# As root, two agents on host A (planner and scraper, by uid) get identities of their
# own, and B's policy lets only the planner through.
#
# As root (with ip and iptables), hosts A and B are two network namespaces joined by a
# veth pair and capture is transparent: curl asks for http://B:8080/ with no proxy
# setting, iptables hands the connection to proxy A, and it crosses as mutual TLS.
# Otherwise (or with DEMO_MODE=explicit) both hosts share this machine's loopback and
# curl uses proxy A's explicit port (http_proxy), as an unprivileged agent would.
#
# Rotations are printed as they happen. DEMO_DURATION=90s stops it by itself; without
# it, Ctrl-C stops it. Every process, namespace, rule and file it makes is removed.
# It waits for every identity on both hosts through /readyz, never on log text or a
# fixed delay, and exits non-zero when a request that should succeed fails or one that
# should be refused succeeds.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=$(realpath "${BIN:-bin/agentmesh}")
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
MARK=1337

mode=${DEMO_MODE:-}
if [ -z "$mode" ]; then
  mode=explicit
  if [ "$(id -u)" -eq 0 ] && command -v ip >/dev/null && command -v iptables >/dev/null; then
    mode=transparent
  fi
fi

work=$(mktemp -d /tmp/agentmesh-demo.XXXXXX)
suffix=$(basename "$work" | cut -d. -f2 | tr 'A-Z' 'a-z')
pids=()
namespaces=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  for ns in "${namespaces[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
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

if [ "$mode" = transparent ]; then
  A_IP=198.18.250.1 B_IP=198.18.250.2
  NS_A=amdemo-a-$suffix NS_B=amdemo-b-$suffix
  on_a=(ip netns exec "$NS_A") on_b=(ip netns exec "$NS_B")
  CA_ADDR=$A_IP:9443
  B_TUNNEL=0.0.0.0:15008
  A_ADMIN=127.0.0.1:15020 B_ADMIN=127.0.0.1:15020
  SERVICE_LISTEN=0.0.0.0:8080 SERVICE_PORT=8080
  URL=http://$B_IP:8080/
  curl_a=("${on_a[@]}" curl)
  say "hosts: network namespaces $NS_A ($A_IP) and $NS_B ($B_IP), joined by a veth pair"
  ip netns add "$NS_A"; namespaces+=("$NS_A")
  ip netns add "$NS_B"; namespaces+=("$NS_B")
  ip link add eth0 netns "$NS_A" type veth peer name eth0 netns "$NS_B"
  ip -n "$NS_A" addr add "$A_IP/24" dev eth0
  ip -n "$NS_B" addr add "$B_IP/24" dev eth0
  for ns in "$NS_A" "$NS_B"; do ip -n "$ns" link set eth0 up; ip -n "$ns" link set lo up; done
else
  A_IP=127.0.0.1 B_IP=127.0.0.2
  on_a=() on_b=()
  CA_ADDR=127.0.0.1:${DEMO_CA_PORT:-19443}
  B_TUNNEL=127.0.0.2:${DEMO_TUNNEL_PORT:-15108}
  A_ADMIN=127.0.0.1:${DEMO_ADMIN_A_PORT:-15120} B_ADMIN=127.0.0.1:${DEMO_ADMIN_B_PORT:-15220}
  SERVICE_PORT=${DEMO_SERVICE_PORT:-18081}
  SERVICE_LISTEN=127.0.0.1:$SERVICE_PORT
  EXPLICIT=127.0.0.1:${DEMO_EXPLICIT_PORT:-15180}
  # Host B's address is 127.0.0.2: nothing listens there, so only the mesh reaches the service.
  URL=http://127.0.0.2:$SERVICE_PORT/
  curl_a=(env "http_proxy=http://$EXPLICIT" curl)
fi

go build -o "$work/demoservice" ./internal/demoservice

say "CA: embedded step-ca, root/intermediate/provisioner keys generated inside a SoftHSM2 token"
"${on_a[@]}" "$BIN" ca --state "$work/ca" --trust-domain "$TD" --listen "$CA_ADDR" --dns-name "${CA_ADDR%:*}" \
  --svid-lifetime 1m 2>"$work/ca.log" &
pids+=($!)
wait_for "the CA" test -S "$work/ca/admin.sock"
wait_for "the CA's API" "${on_a[@]}" curl -sf --cacert "$work/ca/root.crt" "https://$CA_ADDR/health"
echo "    private keys in the token (sensitive, never extractable; none on disk):"
SOFTHSM2_CONF="$work/ca/softhsm2.conf" pkcs11-tool --module /usr/lib/softhsm/libsofthsm2.so \
  --login --pin "$(cat "$work/ca.pin")" --list-objects --type privkey 2>/dev/null |
  awk '/label:/ {l=$2} /Access:/ {sub(/^ *Access: */, ""); print "      " l ": " $0}' || true

proxy_config() { # name, admin, yaml
  mkdir -p "$work/$1"
  "$BIN" token --state "$work/ca" "spiffe://$TD/host/$1" >"$work/$1/token"
  cat >"$work/$1/proxy.yaml" <<YAML
id: spiffe://$TD/host/$1
state: $work/$1
admin: $2
ca:
  url: https://$CA_ADDR
  root: $work/ca/root.crt
  token_file: token
$3
YAML
}

say "service-b: a plain HTTP server on $SERVICE_LISTEN of host B (knows nothing of the mesh)"
"${on_b[@]}" "$work/demoservice" -listen "$SERVICE_LISTEN" 2>"$work/service.log" &
pids+=($!)

say "proxy b: accepts mTLS on $B_TUNNEL; only spiffe://$TD/host/a may reach port $SERVICE_PORT"
strict=""
if [ "$mode" = transparent ]; then
  strict="strict: 0.0.0.0:15006
policy: $work/b/policy.yaml"
  say "agents: planner (uid 1001) and scraper (uid 1002) on host A, search (port 8080) on host B; B's policy lets only the planner reach search"
  "$BIN" register "spiffe://$TD/agent/planner" --host "spiffe://$TD/host/a" --uid 1001 --state "$work/ca" | sed 's/^/    /'
  "$BIN" register "spiffe://$TD/agent/scraper" --host "spiffe://$TD/host/a" --uid 1002 --state "$work/ca" | sed 's/^/    /'
  "$BIN" register "spiffe://$TD/agent/search" --host "spiffe://$TD/host/b" --uid 0 --port 8080 --state "$work/ca" | sed 's/^/    /'
  mkdir -p "$work/b"
  cat >"$work/b/policy.yaml" <<YAML
inbound:
  - name: planner-to-search
    from: [spiffe://$TD/agent/planner]
    to: {ports: [8080], id: spiffe://$TD/agent/search}
YAML
  "$BIN" policy check "$work/b/policy.yaml" | sed 's/^/    /'
fi
proxy_config b "$B_ADMIN" "tunnel: $B_TUNNEL
mark: $MARK
$strict
directory:
  advertise: [$B_IP]
  heartbeat: 2s
services:
  - port: $SERVICE_PORT
    allow: [spiffe://$TD/host/a]"
"${on_b[@]}" "$BIN" proxy --config "$work/b/proxy.yaml" 2>"$work/b.log" &
pids+=($!)

if [ "$mode" = transparent ]; then
  say "proxy a: iptables REDIRECTs host A's outbound TCP to 127.0.0.1:15001; the directory says who lives at $B_IP"
  capture="outbound: 127.0.0.1:15001"
else
  say "proxy a: explicit port $EXPLICIT (http_proxy); the directory says who lives at $B_IP"
  capture="explicit: $EXPLICIT"
fi
# The demo's client loop runs as root, which is no registered agent: it travels with
# the host identity (the default, unattested: deny, would refuse it).
proxy_config a "$A_ADMIN" "tunnel: $A_IP:15008
mark: $MARK
unattested: host
$capture
directory:
  advertise: [$A_IP]
  heartbeat: 2s"
"${on_a[@]}" "$BIN" proxy --config "$work/a/proxy.yaml" 2>"$work/a.log" &
pids+=($!)
# /readyz answers 200 only once the proxy holds a valid SVID for its host and for every
# agent the directory registers to it: past this point no request races an enrolment.
wait_for "proxy a and its agents' identities" "${on_a[@]}" curl -sf "http://$A_ADMIN/readyz"
wait_for "proxy b and its agents' identities" "${on_b[@]}" curl -sf "http://$B_ADMIN/readyz"
"${on_a[@]}" "$BIN" status --admin "$A_ADMIN"
"${on_b[@]}" "$BIN" status --admin "$B_ADMIN"

if [ "$mode" = transparent ]; then
  say "iptables on both hosts: agentmesh redirect install (strict mode for port 8080 on B)"
  "${on_a[@]}" "$BIN" redirect install --exclude-mark "$MARK"
  "${on_b[@]}" "$BIN" redirect install --exclude-mark "$MARK" --strict-port 8080
  "${on_a[@]}" iptables -t nat -S AGENTMESH_OUTPUT | sed 's/^/    /'
fi

# The first request waits for proxy A's directory watch to learn where proxy B lives.
wait_for "the mesh path" "${curl_a[@]}" -sf --max-time 2 "$URL"

if [ "$mode" = transparent ]; then
  as_uid() { "${on_a[@]}" setpriv --reuid="$1" --regid="$1" --clear-groups curl -sSf --max-time 5 "$URL" 2>&1; }
  if ! out=$(as_uid 1001); then
    echo "demo: curl as the planner (uid 1001) failed: $out" >&2
    "${on_a[@]}" "$BIN" status --admin "$A_ADMIN" >&2 || true
    "${on_b[@]}" "$BIN" status --admin "$B_ADMIN" >&2 || true
    exit 1
  fi
  echo "    curl as the planner (uid 1001): $out"
  if out=$(as_uid 1002); then
    echo "demo: the scraper reached search: $out" >&2
    exit 1
  fi
  echo "    curl as the scraper (uid 1002): refused ($out)"
  "${on_b[@]}" "$BIN" policy explain --policy "$work/b/policy.yaml" --port 8080 \
    "spiffe://$TD/agent/scraper" "spiffe://$TD/agent/search" | sed 's/^/    /' || true
fi

say "rotations as they happen (one-minute SVIDs renew when about a third is left):"
field() { [[ $1 =~ (^| )$2=([^ ]*) ]] && printf '%s' "${BASH_REMATCH[2]}"; }
( tail -n0 -F --pid=$$ "$work/a.log" "$work/b.log" 2>/dev/null | grep --line-buffered 'msg=rotated' |
  while IFS= read -r line; do
    t=$(field "$line" time)
    echo "    ${t:11:8} rotated $(field "$line" spiffe_id) (trigger $(field "$line" trigger)): serial $(field "$line" old_serial) -> $(field "$line" serial)"
  done ) &
pids+=($!)

# The CA's intermediate rotates under the traffic: every phase waits for both proxies'
# acknowledgements (docs/ca-rotation.md); activate lasts an SVID lifetime, so that no
# certificate of the old key is left when the bundle drops it.
say "ca rotation: agentmesh ca rotate intermediate, phases as the CA reports them:"
( "$BIN" ca rotate intermediate --state "$work/ca" --reason demo >/dev/null
  last=
  while st=$("$BIN" ca rotation status --json --state "$work/ca" 2>/dev/null); do
    phase=$(grep -o '"phase": *"[a-z-]*"' <<<"$st" | head -1 | cut -d'"' -f4)
    if [ "$phase" != "$last" ]; then echo "    $(date +%T) ca rotation: $phase"; last=$phase; fi
    case $phase in done | aborted) break ;; esac
    sleep 1
  done ) &
pids+=($!)

say "client on host A: ${curl_a[*]} $URL in a loop${duration:+ for $duration}"
requests=0 failed=0
start=$(date +%s)
while :; do
  now=$(date +%s)
  if [ "$secs" -gt 0 ] && [ $((now - start)) -ge "$secs" ]; then break; fi
  requests=$((requests + 1))
  if out=$("${curl_a[@]}" -sSf --max-time 5 "$URL" 2>&1); then
    if [ $((requests % 50)) -eq 1 ]; then echo "    $(date +%T) request $requests: $out"; fi
  else
    failed=$((failed + 1))
    echo "    $(date +%T) request $requests FAILED: $out"
  fi
  sleep 0.1
done

rotations=$(cat "$work/a.log" "$work/b.log" | grep 'msg=rotated' | grep -vc 'trigger=enroll' || true)
# Stopping the proxies flushes their audit logs before they are verified.
kill -TERM "${pids[2]}" "${pids[3]}" 2>/dev/null || true
wait "${pids[2]}" "${pids[3]}" 2>/dev/null || true
audit_ok=true
for p in a b; do
  if out=$("$BIN" audit verify "$work/$p/audit.log" 2>&1); then
    echo "    audit log of proxy $p: $out"
  else
    echo "demo: audit log of proxy $p does not verify: $out" >&2
    audit_ok=false
  fi
done
# Tunnel setup time (TLS 1.3 handshake and header exchange) as proxy A audited it.
grep '"type":"handshake"' "$work/a/audit.log" | grep '"direction":"outbound"' | grep '"result":"ok"' |
  grep -o '"duration_ns":[0-9]*' | cut -d: -f2 | sort -n |
  awk '{d[NR] = $1} END {if (NR) {i = int(NR * 0.99); if (i < 1) i = 1; printf "    tunnel handshakes: %d, p50 %.2f ms, p99 %.2f ms\n", NR, d[int((NR + 1) / 2)] / 1e6, d[i] / 1e6}}'
if [ "$mode" = transparent ]; then
  "${on_a[@]}" "$BIN" redirect remove
  "${on_b[@]}" "$BIN" redirect remove
fi
echo "requests=$requests failed=$failed rotations=$rotations"
# Any failed request (or an audit log that does not verify) fails the demo.
[ "$failed" -eq 0 ] && $audit_ok
