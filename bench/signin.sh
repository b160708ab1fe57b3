#!/usr/bin/env bash
# Sign-in cost and sign-in under attack, on loopback, in one run:
#  1. sign-in throughput: CLIENTS clients post correct passwords (the argon2id step, default
#     parameters) for SECONDS; sign-ins/s and the gateway's CPU seconds per sign-in;
#  2. under attack: a credential-stuffing flood (wrong passwords for made-up and real accounts,
#     from many loopback source addresses 127.10.n.h, bench/flood.rs) while a signed-in user
#     browses an authenticated GET, first as fast as wrk can (closed loop), then at a steady
#     BROWSE_RATE (default 1000/s, oha); browsing p50/p99 quiet vs under the flood, the flood's
#     answers by status, and whether the real user still signs in from their remembered device
#     during the flood.
#   bench/signin.sh [seconds=15] [flood_rate=2500]   (FLOOD_CLIENTS=512 connections)
# Needs wrk, oha (cargo install oha --locked), python3 (PyJWT, cryptography) and curl. Results go to bench/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-15} RATE=${2:-2500}
GW=127.0.0.1:18090 UP=127.0.0.1:18091 # gateway, upstream
. bench/common.sh
command -v oha >/dev/null || { echo "oha is missing: cargo install oha --locked" >&2; exit 1; }

# Default sign-in settings: argon2id parameters, hashing slots and queue, throttling budgets.
gateway_config "$GW" "$UP" memory bench: error > "$work/portcullis.toml"
export PORTCULLIS_CONFIG="$work/portcullis.toml"
"$TGT/release/examples/bench-upstream" "$UP" & pids+=($!)
PW='tall violet lantern orbit 42'
for u in alice@example.com bench@example.com; do
  printf '%s\n' "$PW" | $BIN user add "$u" --account bench >/dev/null
done
uri=$($BIN user totp generate alice@example.com 2>/dev/null)
secret=$(totp_secret "$uri")
$BIN serve 2> bench/results/signin-gateway.log & gw_pid=$!; pids+=($gw_pid)
for _ in $(seq 1 50); do curl -fs "http://$GW/.well-known/jwks.json" >/dev/null && break; sleep 0.2; done
R=bench/results
nproc > $R/signin-machine.txt; grep -m1 'model name' /proc/cpuinfo >> $R/signin-machine.txt

echo "== sign-in throughput (correct password, 4 clients, ${SECS}s)" >&2
"$TGT/release/examples/bench-flood" "$GW" --seconds "$SECS" --clients 4 --user bench@example.com \
  --password "$PW" --pid "$gw_pid" | tee $R/signin-throughput.json

# The real user: signs in once with password + TOTP, ticks "remember this browser", binds the
# session to a device key. That session is also the one that browses during the flood.
python3 bench/known_device.py enrol "$GW" alice@example.com "$PW" "$secret" "$work/alice.json"
cookie=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["browse"])' "$work/alice.json")
status=$(curl -s -o /dev/null -w '%{http_code}' -H "Cookie: $cookie" -H "User-Agent: $BENCH_UA" "http://$GW/campaigns")
[ "$status" = 200 ] || { echo "sign-in for the benchmark failed (status $status)" >&2; exit 1; }

browse() { wrk -t1 -c8 -d"${SECS}s" --latency -H "Cookie: $cookie" -H "User-Agent: $BENCH_UA" "http://$GW/campaigns"; }
# Browsing at a steady rate, as signed-in users do, latency counted from when each request was
# due (so time queued behind a busy gateway counts).
BROWSE_RATE=${BROWSE_RATE:-1000}
browse_steady() {
  oha --no-tui --output-format json -z "${SECS}s" -c 8 -q "$BROWSE_RATE" --latency-correction \
    -H "Cookie: $cookie" -H "User-Agent: $BENCH_UA" "http://$GW/campaigns"
}
echo "== browsing, quiet" >&2
browse > $R/browse-quiet.txt
browse_steady > $R/browse-steady-quiet.json
echo "== known-device sign-in, quiet" >&2
python3 bench/known_device.py sign-in "$GW" alice@example.com "$PW" "$work/alice.json" | tee $R/known-device-quiet.json || true

echo "== flood at ${RATE}/s for $((SECS + 10))s, browsing and a known-device sign-in during it" >&2
# 200 /24 networks × 50 hosts = 10,000 source addresses; 5,000 made-up accounts plus the real
# user's, who gets 1 % of the guesses (a leaked list that contains them).
# The attacker's machine is not the gateway's: on this one the flood generator shares the cores,
# so it runs at the lowest priority (FLOOD_NICE, default 19) and takes what the gateway leaves.
nice -n "${FLOOD_NICE:-19}" "$TGT/release/examples/bench-flood" "$GW" --seconds $((2 * SECS + 12)) --clients "${FLOOD_CLIENTS:-512}" --rate "$RATE" \
  --sources 200 50 --target alice@example.com --target-share 0.01 --pid "$gw_pid" \
  > $R/flood.json & flood=$!
sleep 4
browse > $R/browse-flood.txt & wrk_pid=$!
sleep $((SECS / 2))
python3 bench/known_device.py sign-in "$GW" alice@example.com "$PW" "$work/alice.json" 127.0.0.1 \
  | tee $R/known-device-flood.json || true
wait $wrk_pid
browse_steady > $R/browse-steady-flood.json
wait $flood
cat $R/flood.json

python3 - $R <<'PY' | tee $R/signin-summary.md
import json, sys
r = sys.argv[1]
def wrk(name):
    text = open(f"{r}/{name}").read()
    def ms(v):
        for unit, f in (("us", 0.001), ("ms", 1.0), ("s", 1000.0)):
            if v.endswith(unit):
                return float(v[: -len(unit)]) * f
    lat = {l.split()[0]: ms(l.split()[1]) for l in text.splitlines() if l.strip().split()[:1] in (["50%"], ["99%"])}
    rps = float(next(l.split()[1] for l in text.splitlines() if l.startswith("Requests/sec")))
    return rps, lat["50%"], lat["99%"]
t = json.load(open(f"{r}/signin-throughput.json"))
print("| sign-in (password step, argon2id defaults) | value |\n|---|---|")
print(f"| sign-ins/s (4 clients) | {t['attempts_per_s']} |")
print(f"| gateway CPU seconds per sign-in | {t.get('gateway_cpu_seconds_per_accepted_attempt')} |")
print(f"| p50 / p99 ms | {t['p50_ms']} / {t['p99_ms']} |")
print(f"| answers | {t['by_status']} |\n")
q, f = wrk("browse-quiet.txt"), wrk("browse-flood.txt")
print("| browsing (wrk -t1 -c8, authenticated GET) | requests/s | p50 ms | p99 ms |\n|---|---|---|---|")
print(f"| quiet | {q[0]:,.0f} | {q[1]:.3f} | {q[2]:.3f} |")
print(f"| under flood | {f[0]:,.0f} | {f[1]:.3f} | {f[2]:.3f} |")
print(f"| flood / quiet | {f[0]/q[0]:.2f}× | {f[1]/q[1]:.2f}× | **{f[2]/q[2]:.2f}×** |\n")
def steady(name):
    j = json.load(open(f"{r}/{name}"))
    lat = j["latencyPercentiles"]
    codes = j.get("statusCodeDistribution", {})
    return j["summary"]["requestsPerSec"], lat["p50"] * 1000, lat["p99"] * 1000, codes
q, f = steady("browse-steady-quiet.json"), steady("browse-steady-flood.json")
print("| browsing at a steady rate (oha -c8, --latency-correction) | requests/s | p50 ms | p99 ms | answers |\n|---|---|---|---|---|")
print(f"| quiet | {q[0]:,.0f} | {q[1]:.3f} | {q[2]:.3f} | {q[3]} |")
print(f"| under flood | {f[0]:,.0f} | {f[1]:.3f} | {f[2]:.3f} | {f[3]} |")
print(f"| flood / quiet | | {f[1]/q[1]:.2f}× | **{f[2]/q[2]:.2f}×** | |\n")
fl = json.load(open(f"{r}/flood.json"))
print(f"flood: {fl['attempts']} attempts in {fl['seconds']} s = {fl['attempts_per_s']}/s from {fl['sources']} source addresses; "
      f"answers {fl['by_status']}; connection errors {fl['connection_errors']}; flood p50/p99 {fl['p50_ms']}/{fl['p99_ms']} ms; "
      f"gateway CPU {fl.get('gateway_cpu_seconds')} s\n")
for name in ("known-device-quiet", "known-device-flood"):
    try:
        print(f"{name}: {open(f'{r}/{name}.json').read().strip()}")
    except OSError:
        print(f"{name}: no result")
PY
