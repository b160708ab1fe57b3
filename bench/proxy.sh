#!/usr/bin/env bash
# Authenticated proxied GET: the same small upstream measured directly, through nginx as a plain
# reverse proxy (the baseline an ESP already runs), through Portcullis with the memory and with the
# Redis ephemeral store, through nginx `auth_request` asking Portcullis (forward-auth), and through
# the gateway's HTTP core alone (`bench/core.rs`: its accept loop and upstream forwarding without
# the gate, the best any gate on that core can do), in one run, on loopback. Prints throughput and
# p50/p99 for each and the ratios; then the same six paths again at one fixed rate, half of
# Portcullis's peak, for the latency each adds there.
#   [PIN=1] bench/proxy.sh [duration_seconds=10] [connections=64]
# PIN=1 gives the proxy under test a core of its own (core 1; nginx with one worker, the gateways'
# runtimes with one worker thread) and puts wrk, oha and the upstream on the other, so the
# proxies are compared core for core and a tail at a fixed rate is the proxy's, not the load
# generator's. Each run also reports both cores' busy shares.
# Needs wrk and nginx (apt-get install wrk nginx), oha (cargo install oha --locked; the fixed-rate
# runs), redis-server, python3 (PyJWT, cryptography) and curl. Redis: the local server on REDIS_URL (default redis://127.0.0.1:6379) under a fresh key
# prefix, deleted at the end. Results go to bench/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
DUR=${1:-10}
CONN=${2:-64}
GW=127.0.0.1:18080
UP=127.0.0.1:18081
NGX=127.0.0.1:18082
GWR=127.0.0.1:18083
FWD=127.0.0.1:18084
CORE=127.0.0.1:18085
REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379}
PREFIX="bench-$(head -c 6 /dev/urandom | od -An -tx1 | tr -d ' \n'):"
redis-cli -u "$REDIS_URL" ping >/dev/null || { echo "Redis is not answering on $REDIS_URL (redis-server --daemonize yes)" >&2; exit 1; }
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
[ -x "$NGINX" ] || { echo "nginx is missing: apt-get install nginx" >&2; exit 1; }
command -v oha >/dev/null || { echo "oha is missing: cargo install oha --locked" >&2; exit 1; }
. bench/common.sh
bench_cleanup() {
  redis-cli -u "$REDIS_URL" --scan --pattern "$PREFIX*" | xargs -r -n 500 redis-cli -u "$REDIS_URL" del >/dev/null || true
}

# One durable store and master key, two gateways: memory and Redis ephemeral store. The memory
# one also answers forward-auth for nginx (which must be a trusted proxy for X-Original-URI).
key="$(head -c 32 /dev/urandom | base64)"
shared_gateway_config() { # listen address, ephemeral store: one durable store and key for both
  cat <<TOML
[server]
listen = "$1"
public_url = "http://$1/"
trusted_proxies = ["127.0.0.1/32"]
[upstream]
url = "http://$UP/"
[storage]
durable = "sqlite://$work/db.sqlite"
ephemeral = "$2"
redis_prefix = "$PREFIX"
[forward_auth]
enabled = true
[secrets]
master_key = "$key"
[log]
level = "warn"
TOML
}
shared_gateway_config "$GW" memory > "$work/portcullis.toml"
shared_gateway_config "$GWR" "$REDIS_URL" > "$work/portcullis-redis.toml"
export PORTCULLIS_CONFIG="$work/portcullis.toml"

"${CLIENT_CORE[@]}" "$TGT/release/examples/bench-upstream" "$UP" & pids+=($!)
"${PROXY_CORE[@]}" "$TGT/release/examples/bench-core" "$CORE" "http://$UP/" & pids+=($!)
forward_auth_server=$(cat <<NGINX
  # Forward-auth as docs/forward-auth.md configures it: nginx asks Portcullis about every request
  # and proxies to the console itself.
  upstream portcullis { server $GW; keepalive 128; }
  server {
    listen $FWD;
    location = /_portcullis/auth {
      internal;
      proxy_pass http://portcullis;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_redirect off;
      proxy_pass_request_body off;
      proxy_set_header Content-Length "";
      proxy_set_header X-Original-URI \$request_uri;
      proxy_set_header X-Forwarded-Method \$request_method;
      proxy_set_header Accept "application/json";
    }
    location /_portcullis/ { proxy_pass http://portcullis; }
    location @login { return 302 \$portcullis_login; }
    location / {
      auth_request /_portcullis/auth;
      auth_request_set \$portcullis_token \$upstream_http_x_portcullis_assertion;
      auth_request_set \$portcullis_login \$upstream_http_location;
      error_page 401 = @login;
      proxy_set_header X-Portcullis-Assertion \$portcullis_token;
      proxy_pass http://console;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
NGINX
)
nginx_config "$UP" "$NGX" "$forward_auth_server" > "$work/nginx.conf"
"${PROXY_CORE[@]}" "$NGINX" -p "$work/nginx" -c "$work/nginx.conf" & pids+=($!)
printf 'tall violet lantern orbit 42\n' | $BIN user add bench@example.com --account bench >/dev/null
uri=$($BIN user totp generate bench@example.com 2>/dev/null)
secret=$(totp_secret "$uri")
"${PROXY_CORE[@]}" $BIN serve & pids+=($!)
PORTCULLIS_CONFIG="$work/portcullis-redis.toml" "${PROXY_CORE[@]}" $BIN serve & pids+=($!)
for gw in "$GW" "$GWR"; do
  for _ in $(seq 1 50); do curl -fs "http://$gw/.well-known/jwks.json" >/dev/null && break; sleep 0.2; done
done

cookie=$(bound_session "$GW" bench@example.com "tall violet lantern orbit 42" "$secret" 0)
cookie_redis=$(bound_session "$GWR" bench@example.com "tall violet lantern orbit 42" "$secret" 1)
status=$(curl -s -o /dev/null -w '%{http_code}' -H "Cookie: $cookie" -H "User-Agent: $BENCH_UA" "http://$FWD/campaigns")
[ "$status" = 200 ] || { echo "forward-auth through nginx failed (status $status)" >&2; exit 1; }

mkdir -p bench/results
WRK_THREADS=2
[ "${PIN:-0}" = 1 ] && WRK_THREADS=1
run() { # result name, then wrk's arguments: the report, and each core's busy share in name.cpu
  local name=$1 before
  shift
  before=$(cpu_snapshot)
  "${CLIENT_CORE[@]}" wrk -t"$WRK_THREADS" -c"$CONN" -d"${DUR}s" --latency "$@" > "bench/results/$name.txt"
  cpu_busy "$before" "$(cpu_snapshot)" > "bench/results/$name.cpu"
}
echo "== direct upstream" >&2
run direct "http://$UP/campaigns"
echo "== through nginx" >&2
run nginx -H "Cookie: $cookie" -H "User-Agent: $BENCH_UA" "http://$NGX/campaigns"
echo "== through portcullis (memory store)" >&2
run portcullis -H "Cookie: $cookie" -H "User-Agent: $BENCH_UA" "http://$GW/campaigns"
echo "== through portcullis (redis store)" >&2
run portcullis-redis -H "Cookie: $cookie_redis" -H "User-Agent: $BENCH_UA" "http://$GWR/campaigns"
echo "== nginx auth_request -> portcullis forward-auth" >&2
run forward-auth -H "Cookie: $cookie" -H "User-Agent: $BENCH_UA" "http://$FWD/campaigns"
echo "== the gateway's HTTP core without the gate" >&2
run core -H "Cookie: $cookie" -H "User-Agent: $BENCH_UA" "http://$CORE/campaigns"

rps() { awk '/Requests\/sec/{print $2}' "$1"; }
pct() { awk -v p="$2" '$1==p{print $2}' "$1"; }
summary() { # requests/s, p50 ms, p99 ms of one wrk report, and the two cores' busy shares
  python3 - "$(rps "$1.txt")" "$(pct "$1.txt" 50%)" "$(pct "$1.txt" 99%)" $(cat "$1.cpu") <<'PY'
import sys
def ms(v):
    for unit, f in (("us", 0.001), ("ms", 1.0), ("s", 1000.0)):
        if v.endswith(unit):
            return float(v[: -len(unit)]) * f
    raise SystemExit(f"unreadable latency {v!r}")
print(sys.argv[1], ms(sys.argv[2]), ms(sys.argv[3]), *sys.argv[4:6])
PY
}
python3 - "$DUR" "$CONN" "$WRK_THREADS" "${PIN:-0}" $(for f in direct nginx portcullis portcullis-redis forward-auth core; do summary "bench/results/$f"; done) <<'PY' | tee bench/results/proxy-summary.md
import sys
dur, conn, threads, pin = sys.argv[1:5]
d, n, p, r, f, c = (tuple(map(float, sys.argv[i:i + 5])) for i in range(5, 35, 5))
rows = (("direct upstream", d), ("nginx reverse proxy", n), ("Portcullis (memory store)", p),
        ("Portcullis (Redis store)", r), ("nginx auth_request → Portcullis forward-auth", f),
        ("the gateway's HTTP core without the gate", c))
print("| path | requests/s | p50 ms | p99 ms | throughput / nginx | throughput / direct | p99 added over direct ms | core 0 / core 1 busy % |")
print("|---|---|---|---|---|---|---|---|")
for name, (rps, p50, p99, c0, c1) in rows:
    print(f"| {name} | {rps:,.0f} | {p50:.3f} | {p99:.3f} | {rps/n[0]:.2f}× | {rps/d[0]:.2f}× | {p99-d[2]:.3f} | {c0:.0f} / {c1:.0f} |")
where = ("the proxies on core 1 (nginx with one worker), wrk and the upstream on core 0"
         if pin == "1" else "every process on either core")
print(f"\nwrk -t{threads} -c{conn} -d{dur}s --latency, one run; {where}")
PY

# Fixed rate: every path at the same rate, half of Portcullis's (memory store) closed-loop peak
# above, with each request's latency counted from when it was due (oha --latency-correction), so
# time spent queueing behind a slow answer is not hidden.
half=$(awk '/Requests\/sec/{printf "%d", $2 / 2}' bench/results/portcullis.txt)
fixed() { # result name, then oha's arguments: the JSON report, and each core's busy share
  local name=$1 before
  shift
  before=$(cpu_snapshot)
  "${CLIENT_CORE[@]}" oha --no-tui --output-format json -z "${DUR}s" -c "$CONN" -q "$half" --latency-correction "$@" > "bench/results/fixed-$name.json"
  cpu_busy "$before" "$(cpu_snapshot)" > "bench/results/fixed-$name.cpu"
}
echo "== fixed rate: $half requests/s on every path" >&2
fixed direct "http://$UP/campaigns"
fixed nginx -H "Cookie: $cookie" -H "User-Agent: $BENCH_UA" "http://$NGX/campaigns"
fixed portcullis -H "Cookie: $cookie" -H "User-Agent: $BENCH_UA" "http://$GW/campaigns"
fixed portcullis-redis -H "Cookie: $cookie_redis" -H "User-Agent: $BENCH_UA" "http://$GWR/campaigns"
fixed forward-auth -H "Cookie: $cookie" -H "User-Agent: $BENCH_UA" "http://$FWD/campaigns"
fixed core -H "Cookie: $cookie" -H "User-Agent: $BENCH_UA" "http://$CORE/campaigns"
python3 - "$half" "$DUR" "$CONN" <<'PY' | tee -a bench/results/proxy-summary.md
import json, sys
rate, dur, conn = sys.argv[1:4]
rows = (("direct upstream", "direct"), ("nginx reverse proxy", "nginx"),
        ("Portcullis (memory store)", "portcullis"), ("Portcullis (Redis store)", "portcullis-redis"),
        ("nginx auth_request → Portcullis forward-auth", "forward-auth"),
        ("the gateway's HTTP core without the gate", "core"))
def load(name):
    r = json.load(open(f"bench/results/fixed-{name}.json"))
    codes = r.get("statusCodeDistribution", {})
    ok = codes.get("200", 0)
    # Requests still open when the run's time is up are cut off by oha, not failed.
    errors = {k: v for k, v in r.get("errorDistribution", {}).items() if k != "aborted due to deadline"}
    bad = sum(v for k, v in codes.items() if k != "200") + sum(errors.values())
    lat = r["latencyPercentiles"]
    busy = open(f"bench/results/fixed-{name}.cpu").read().split()
    return r["summary"]["requestsPerSec"], lat["p50"] * 1000, lat["p99"] * 1000, ok, bad, busy
d = load("direct")
print(f"\n| path, at {int(rate):,} requests/s | requests/s | p50 ms | p99 ms | p99 added over direct ms | answers not 200 | core 0 / core 1 busy % |")
print("|---|---|---|---|---|---|---|")
for label, name in rows:
    rps, p50, p99, ok, bad, (c0, c1) = load(name)
    print(f"| {label} | {rps:,.0f} | {p50:.3f} | {p99:.3f} | {p99 - d[2]:.3f} | {bad} | {c0} / {c1} |")
print(f"\noha -z {dur}s -c {conn} -q {rate} --latency-correction (half of Portcullis's closed-loop peak), one run")
PY
