#!/usr/bin/env bash
# Two gateway binaries side by side, for a change that is too small for bench/proxy.sh's
# run-to-run noise: both run as gateways in front of the same upstream, each with its own
# signed-in, bound session, and wrk measures them in turn, round after round, with the gateway's
# CPU time (utime + stime from /proc/PID/stat) and context switches per request. nginx, as a
# plain reverse proxy to the same upstream, is measured once at the end as the baseline.
#   bench/compare.sh A_BINARY [B_BINARY=this tree's release build] [rounds=4] [seconds=5]
# Environment: STORE_A, STORE_B: the ephemeral store of each (default memory; a redis:// URL
# uses a fresh key prefix); ENV_A, ENV_B: extra environment for each (say
# TOKIO_WORKER_THREADS=1); RATE: also that many rounds at RATE requests/s with oha
# (--latency-correction), for p50/p99 at a fixed load. Needs wrk, nginx, python3 (PyJWT,
# cryptography), curl, and oha for RATE. Results go to bench/results/compare.md.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { sed -n '2,13p' "$0" >&2; exit 2; }
. bench/common.sh
[ -x "$NGINX" ] || { echo "nginx is missing: apt-get install nginx" >&2; exit 1; }
A=$1
B=${2:-$BIN}
ROUNDS=${3:-4}
DUR=${4:-5}
for bin in "$A" "$B"; do [ -x "$bin" ] || { echo "not an executable: $bin" >&2; exit 2; }; done
UP=127.0.0.1:18081
NGX=127.0.0.1:18082
declare -A PORT=([A]=18090 [B]=18091) PID COOKIE
PW="tall violet lantern orbit 42"
key="$(head -c 32 /dev/urandom | base64)"
PREFIX="compare-$(head -c 6 /dev/urandom | od -An -tx1 | tr -d ' \n')"
bench_cleanup() {
  for v in A B; do
    local store=STORE_$v
    case "${!store:-memory}" in
      redis://*) redis-cli -u "${!store}" --scan --pattern "$PREFIX-$v:*" | xargs -r -n 500 redis-cli -u "${!store}" del >/dev/null || true ;;
    esac
  done
}

"$TGT/release/examples/bench-upstream" "$UP" & pids+=($!)
for v in A B; do
  gw=127.0.0.1:${PORT[$v]}
  store=STORE_$v
  extra=ENV_$v
  bin=${!v}
  cat > "$work/$v.toml" <<TOML
[server]
listen = "$gw"
public_url = "http://$gw/"
[upstream]
url = "http://$UP/"
[storage]
durable = "sqlite://$work/$v.sqlite"
ephemeral = "${!store:-memory}"
redis_prefix = "$PREFIX-$v:"
[secrets]
master_key = "$key"
[log]
level = "warn"
TOML
  export PORTCULLIS_CONFIG="$work/$v.toml"
  printf '%s\n' "$PW" | "$bin" user add bench@example.com --account bench >/dev/null
  secret=$(totp_secret "$("$bin" user totp generate bench@example.com 2>/dev/null)")
  # shellcheck disable=SC2086 # ENV_A / ENV_B are lists of NAME=value words
  env ${!extra:-} "$bin" serve & pids+=($!)
  PID[$v]=$!
  for _ in $(seq 1 50); do curl -fs "http://$gw/.well-known/jwks.json" >/dev/null && break; sleep 0.2; done
  COOKIE[$v]=$(bound_session "$gw" bench@example.com "$PW" "$secret" 0)
done
unset PORTCULLIS_CONFIG

nginx_config "$UP" "$NGX" > "$work/nginx.conf"
"$NGINX" -p "$work/nginx" -c "$work/nginx.conf" & pids+=($!)
nginx_master=$!

cpu_ticks() { local t=0 p; for p in "$@"; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done; echo "$t"; }
switches() {
  local t=0 p f
  for p in "$@"; do
    for f in /proc/"$p"/task/*/status; do
      t=$((t + $(awk '/ctxt_switches/{s += $2} END{print s}' "$f")))
    done
  done
  echo "$t"
}
per_request() { python3 -c 'import sys; print(f"{float(sys.argv[1]) * float(sys.argv[2]) / float(sys.argv[3]):.{sys.argv[4]}f}")' "$@"; }
tick_us=$((1000000 / $(getconf CLK_TCK)))
measure() { # label, port, cookie, pids…: one wrk run, one table row
  local label=$1 port=$2 cookie=$3 out n c0 c1 t0 t1
  shift 3
  t0=$(cpu_ticks "$@"); c0=$(switches "$@")
  out=$(wrk -t2 -c64 -d"${DUR}s" --latency -H "Cookie: $cookie" "http://127.0.0.1:$port/campaigns")
  t1=$(cpu_ticks "$@"); c1=$(switches "$@")
  n=$(echo "$out" | awk '/requests in/{print $1}')
  if echo "$out" | grep -q "Non-2xx"; then echo "$label: answers other than 2xx" >&2; exit 1; fi
  echo "| $label | $(echo "$out" | awk '/Requests\/sec/{printf "%\047d", $2}') | $(echo "$out" | awk '$1=="99%"{print $2}') | $(per_request $((t1 - t0)) "$tick_us" "$n" 1) µs | $(per_request $((c1 - c0)) 1 "$n" 2) |"
}

{
  echo "A = $A${STORE_A:+ ($STORE_A)}${ENV_A:+ [$ENV_A]}; B = $B${STORE_B:+ ($STORE_B)}${ENV_B:+ [$ENV_B]}"
  echo
  echo "| round | requests/s | p99 | CPU per request | context switches per request |"
  echo "|---|---|---|---|---|"
  for r in $(seq 1 "$ROUNDS"); do
    for v in A B; do
      measure "$r $v" "${PORT[$v]}" "${COOKIE[$v]}" "${PID[$v]}"
    done
  done
  measure "nginx" "${NGX##*:}" "${COOKIE[A]}" $(pgrep -P "$nginx_master")
  echo
  echo "wrk -t2 -c64 -d${DUR}s --latency, authenticated GET /campaigns"
  if [ -n "${RATE:-}" ]; then
    echo
    echo "| round, at $RATE requests/s | p50 ms | p99 ms | answers |"
    echo "|---|---|---|---|"
    for r in $(seq 1 "$ROUNDS"); do
      for v in A B; do
        oha --no-tui --output-format json -z "${DUR}s" -c 64 -q "$RATE" --latency-correction \
          -H "Cookie: ${COOKIE[$v]}" "http://127.0.0.1:${PORT[$v]}/campaigns" > "$work/oha.json"
        python3 - "$r $v" "$work/oha.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[2]))
lat = r["latencyPercentiles"]
print(f"| {sys.argv[1]} | {lat['p50'] * 1000:.3f} | {lat['p99'] * 1000:.3f} | {r.get('statusCodeDistribution', {})} |")
PY
      done
    done
    echo
    echo "oha -z ${DUR}s -c 64 -q $RATE --latency-correction"
  fi
} | tee bench/results/compare.md
