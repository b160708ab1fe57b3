#!/usr/bin/env bash
# Instructions per authenticated proxied GET, counted by valgrind's callgrind. Time on a shared
# virtual machine moves by a quarter from one round to the next; an instruction count of the same
# binary and request mix does not, so this tells changes of a per cent or two apart where
# bench/compare.sh cannot. The gateway runs under callgrind in front of bench/upstream.rs with a
# signed-in, bound session; its counters are zeroed after start-up and sign-in, wrk sends the
# measured requests, and the count is divided by the requests wrk saw answered.
#   bench/callgrind.sh [seconds=30] [store=memory|redis://…|core] [binary=this tree's release build]
# With `core` for the store, the program counted is bench/core.rs instead of the gateway: the
# gateway's accept loop and upstream forwarding without its gate, the share of the HTTP core.
# Prints the total per request, the part spent in SHA-256 compression (valgrind runs the software version:
# its CPU model has no SHA instructions) and the functions with the most instructions, inclusive
# and exclusive; the full profile goes to bench/results/callgrind.out for callgrind_annotate.
# Needs valgrind, wrk, python3 (PyJWT, cryptography), curl.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/common.sh
command -v valgrind >/dev/null || { echo "valgrind is missing: apt-get install valgrind" >&2; exit 1; }
SECS=${1:-30}
STORE=${2:-memory}
GWBIN=${3:-$BIN}
[ -x "$GWBIN" ] || { echo "not an executable: $GWBIN" >&2; exit 2; }
UP=127.0.0.1:18181
GW=127.0.0.1:18190
PW="tall violet lantern orbit 42"
PREFIX="callgrind-$(head -c 6 /dev/urandom | od -An -tx1 | tr -d ' \n'):"
bench_cleanup() {
  case "$STORE" in
    redis://*) redis-cli -u "$STORE" --scan --pattern "$PREFIX*" | xargs -r -n 500 redis-cli -u "$STORE" del >/dev/null || true ;;
  esac
}

"$TGT/release/examples/bench-upstream" "$UP" & pids+=($!)
gateway_config "$GW" "$UP" "$STORE" "$PREFIX" > "$work/portcullis.toml"
export PORTCULLIS_CONFIG="$work/portcullis.toml"
if [ "$STORE" = core ]; then
  GWBIN=$TGT/release/examples/bench-core
  valgrind --tool=callgrind --callgrind-out-file="$work/cg.out" "$GWBIN" "$GW" "http://$UP/" 2>"$work/valgrind.log" & pids+=($!)
  gw_pid=$!
  for _ in $(seq 1 300); do curl -fs "http://$GW/campaigns" >/dev/null && break; sleep 0.5; done
  # The same request as the gateway is sent, cookies and all (the core strips its cookie).
  cookie="portcullis-session=$(head -c 32 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=')"
else
  printf '%s\n' "$PW" | "$GWBIN" user add bench@example.com --account bench >/dev/null
  secret=$(totp_secret "$("$GWBIN" user totp generate bench@example.com 2>/dev/null)")
  valgrind --tool=callgrind --callgrind-out-file="$work/cg.out" "$GWBIN" serve 2>"$work/valgrind.log" & pids+=($!)
  gw_pid=$!
  for _ in $(seq 1 300); do curl -fs "http://$GW/.well-known/jwks.json" >/dev/null && break; sleep 0.5; done
  cookie=$(bound_session "$GW" bench@example.com "$PW" "$secret" 0)
fi
unset PORTCULLIS_CONFIG
# Warm-up: the upstream connections are opened, the session and user caches filled.
wrk -t1 -c8 -d3s -H "Cookie: $cookie" -H "User-Agent: $BENCH_UA" "http://$GW/campaigns" >/dev/null
callgrind_control -z "$gw_pid" >/dev/null
out=$(wrk -t1 -c8 -d"${SECS}s" -H "Cookie: $cookie" -H "User-Agent: $BENCH_UA" "http://$GW/campaigns")
callgrind_control -d "$gw_pid" >/dev/null
if echo "$out" | grep -q "Non-2xx"; then echo "answers other than 2xx:" >&2; echo "$out" >&2; exit 1; fi
n=$(echo "$out" | awk '/requests in/{print $1}')
dump=$(ls -t "$work"/cg.out.* | head -1)
cp "$dump" bench/results/callgrind.out
callgrind_annotate --threshold=100 --inclusive=yes "$dump" > "$work/inclusive.txt"
callgrind_annotate --threshold=100 "$dump" > "$work/exclusive.txt"
python3 - "$n" "$work/inclusive.txt" "$work/exclusive.txt" "$GWBIN" "$STORE" <<'PY' | tee bench/results/callgrind.md
import re, sys
n = int(sys.argv[1])
def rows(path):
    total, out = 0, []
    for line in open(path):
        m = re.match(r"\s*([\d,]+)\s+(?:\(\s*[\d.]+%\)\s+)?(.*)", line)
        if not m:
            continue
        count = int(m.group(1).replace(",", ""))
        if "PROGRAM TOTALS" in m.group(2):
            total = count
        elif ":" in m.group(2):
            out.append((count, m.group(2).split(" [")[0]))
    return total, out
total, inclusive = rows(sys.argv[2])
_, exclusive = rows(sys.argv[3])
# The frames that were already running when the counters were zeroed (thread starts, the
# runtime's loop) are charged with everything below them; they are no one's own cost.
exclusive = [(c, f) for c, f in exclusive if c < total / 2]
# The sha2 crate's own functions (compression, padding), not the gateway's callers of them.
sha = sum(c for c, f in exclusive if re.search(r"(^|[^A-Za-z0-9_])sha2::", f))
print(f"binary {sys.argv[4]}, store {sys.argv[5]}: {n:,} proxied requests")
print()
print(f"| instructions per request | all | SHA-256 compression | all but that |")
print(f"|---|---|---|---|")
print(f"| | {total / n:,.0f} | {sha / n:,.0f} | {(total - sha) / n:,.0f} |")
def table(title, entries):
    print()
    print(f"| {title} | per request |")
    print("|---|---|")
    for c, f in entries[:40]:
        print(f"| `{f[:140]}` | {c / n:,.0f} |")
table("inclusive", inclusive)
table("exclusive", exclusive)
PY
