#!/usr/bin/env bash
# Two gateway binaries side by side, for a change that is too small for bench/proxy.sh's
# run-to-run noise: both run as gateways in front of the same upstream, each with its own
# signed-in, bound session, and wrk measures them in turn, round after round, with the gateway's
# CPU time (utime + stime from /proc/PID/stat, also apart) and context switches per request. nginx, as a
# plain reverse proxy to the same upstream, is measured once at the end as the baseline.
#   bench/compare.sh A_BINARY [B_BINARY=this tree's release build] [rounds=4] [seconds=5]
# Environment: STORE_A, STORE_B: the ephemeral store of each (default memory; a redis:// URL
# uses a fresh key prefix); ENV_A, ENV_B: extra environment for each (say
# TOKIO_WORKER_THREADS=1); RATE: also that many rounds at RATE requests/s with oha
# (--latency-correction), for p50/p99 at a fixed load; SYSCALLS=1: also one wrk run each under
# `perf stat` with syscall tracepoints, for system calls per request by kind (the tracing slows
# that run down; its counts, not its speed, are the result). Needs wrk, nginx, python3 (PyJWT,
# cryptography), curl, oha for RATE, perf for SYSCALLS. Results go to bench/results/compare.md.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { sed -n '2,15p' "$0" >&2; exit 2; }
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
  gateway_config "$gw" "$UP" "${!store:-memory}" "$PREFIX-$v:" > "$work/$v.toml"
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

cpu_ticks() { # pids…: "user system" clock ticks so far
  local u=0 s=0 p
  for p in "$@"; do
    read -r pu ps < <(awk '{print $14, $15}' "/proc/$p/stat")
    u=$((u + pu)); s=$((s + ps))
  done
  echo "$u $s"
}
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
  local label=$1 port=$2 cookie=$3 out n c0 c1 u0 s0 u1 s1
  shift 3
  read -r u0 s0 < <(cpu_ticks "$@"); c0=$(switches "$@")
  out=$(wrk -t2 -c64 -d"${DUR}s" --latency -H "Cookie: $cookie" -H "User-Agent: $BENCH_UA" "http://127.0.0.1:$port/campaigns")
  read -r u1 s1 < <(cpu_ticks "$@"); c1=$(switches "$@")
  n=$(echo "$out" | awk '/requests in/{print $1}')
  if echo "$out" | grep -q "Non-2xx"; then echo "$label: answers other than 2xx" >&2; exit 1; fi
  echo "| $label | $(echo "$out" | awk '/Requests\/sec/{printf "%\047d", $2}') | $(echo "$out" | awk '$1=="99%"{print $2}') | $(per_request $((u1 - u0 + s1 - s0)) "$tick_us" "$n" 1) µs | $(per_request $((u1 - u0)) "$tick_us" "$n" 1) + $(per_request $((s1 - s0)) "$tick_us" "$n" 1) µs | $(per_request $((c1 - c0)) 1 "$n" 2) |"
}

SYSCALL_KINDS="read write readv writev recvfrom sendto recvmsg sendmsg epoll_wait epoll_pwait futex sched_yield"
syscalls() { # label, port, cookie, pids…: one wrk run under perf stat, one table row of system calls per request
  local label=$1 port=$2 cookie=$3 out n events="-e raw_syscalls:sys_enter" k targets
  shift 3
  for k in $SYSCALL_KINDS; do events="$events -e syscalls:sys_enter_$k"; done
  targets=$(IFS=,; echo "$*")
  # shellcheck disable=SC2086 # one word per event option
  perf stat -x, $events -p "$targets" -o "$work/perf.csv" -- sleep "$((DUR + 1))" &
  local perf_pid=$!
  sleep 0.5
  out=$(wrk -t2 -c64 -d"${DUR}s" -H "Cookie: $cookie" -H "User-Agent: $BENCH_UA" "http://127.0.0.1:$port/campaigns")
  wait "$perf_pid"
  n=$(echo "$out" | awk '/requests in/{print $1}')
  python3 - "$label" "$n" "$work/perf.csv" $SYSCALL_KINDS <<'PY'
import sys
label, n, path, kinds = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4:]
counts = {}
for line in open(path):
    f = line.strip().split(",")
    if len(f) > 2 and f[0].replace(".", "").isdigit():
        counts[f[2].split(":")[-1].replace("sys_enter_", "")] = float(f[0])
row = [f"{counts.get('sys_enter', 0) / n:.2f}"] + [f"{counts.get(k, 0) / n:.2f}" for k in kinds]
print(f"| {label} | " + " | ".join(row) + " |")
PY
}

{
  echo "A = $A${STORE_A:+ ($STORE_A)}${ENV_A:+ [$ENV_A]}; B = $B${STORE_B:+ ($STORE_B)}${ENV_B:+ [$ENV_B]}"
  echo
  echo "| round | requests/s | p99 | CPU per request | user + kernel | context switches per request |"
  echo "|---|---|---|---|---|---|"
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
          -H "Cookie: ${COOKIE[$v]}" -H "User-Agent: $BENCH_UA" "http://127.0.0.1:${PORT[$v]}/campaigns" > "$work/oha.json"
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
  if [ -n "${SYSCALLS:-}" ]; then
    echo
    echo "| system calls per request | all | ${SYSCALL_KINDS// / | } |"
    echo "|---|---|$(for _ in $SYSCALL_KINDS; do printf -- '---|'; done)"
    for v in A B; do
      syscalls "$v" "${PORT[$v]}" "${COOKIE[$v]}" "${PID[$v]}"
    done
    syscalls "nginx" "${NGX##*:}" "${COOKIE[A]}" $(pgrep -P "$nginx_master")
    echo
    echo "perf stat -e raw_syscalls:sys_enter -e syscalls:sys_enter_KIND, over one wrk -t2 -c64 -d${DUR}s run"
  fi
} | tee bench/results/compare.md
