#!/usr/bin/env bash
# Authenticated proxied GET: the same small upstream measured directly and through Portcullis,
# in one run, on loopback. Prints throughput and p50/p99 for both and their ratios.
#   bench/proxy.sh [duration_seconds=15] [connections=64]
# Needs wrk (apt-get install wrk), python3 and curl. Results go to bench/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
DUR=${1:-15}
CONN=${2:-64}
GW=127.0.0.1:18080
UP=127.0.0.1:18081
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install wrk" >&2; exit 1; }

cargo build --release --bin portcullis --example bench-upstream >&2
BIN=target/release/portcullis
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

cat > "$work/portcullis.toml" <<TOML
[server]
listen = "$GW"
public_url = "http://$GW/"
[upstream]
url = "http://$UP/"
[storage]
durable = "sqlite://$work/db.sqlite"
[secrets]
master_key = "$(head -c 32 /dev/urandom | base64)"
[log]
level = "warn"
TOML
export PORTCULLIS_CONFIG="$work/portcullis.toml"

target/release/examples/bench-upstream "$UP" & pids+=($!)
printf 'bench password 4 throughput\n' | $BIN user add bench@example.com --account bench >/dev/null
uri=$($BIN user totp generate bench@example.com 2>/dev/null)
secret=$(python3 -c 'import sys,urllib.parse as u; print(u.parse_qs(u.urlparse(sys.argv[1]).query)["secret"][0])' "$uri")
$BIN serve & pids+=($!)
for _ in $(seq 1 50); do curl -fs "http://$GW/.well-known/jwks.json" >/dev/null && break; sleep 0.2; done

code() { python3 - "$secret" <<'PY'
import base64, hmac, struct, sys, time
s = sys.argv[1]; key = base64.b32decode(s + "=" * (-len(s) % 8))
mac = hmac.new(key, struct.pack(">Q", int(time.time()) // 30), "sha1").digest()
o = mac[-1] & 15
print("%06d" % ((struct.unpack(">I", mac[o:o + 4])[0] & 0x7fffffff) % 1000000))
PY
}
jar="$work/jar"
csrf() { curl -fs -c "$jar" -b "$jar" "http://$GW$1" | sed -n 's/.*name="csrf" value="\([^"]*\)".*/\1/p' | head -1; }
t=$(csrf /_portcullis/login)
curl -fs -o /dev/null -c "$jar" -b "$jar" --data-urlencode "username=bench@example.com" --data-urlencode "password=bench password 4 throughput" --data-urlencode "csrf=$t" --data-urlencode "next=" "http://$GW/_portcullis/login"
t=$(csrf /_portcullis/mfa)
curl -fs -o /dev/null -c "$jar" -b "$jar" --data-urlencode "code=$(code)" --data-urlencode "csrf=$t" "http://$GW/_portcullis/mfa"
cookie=$(awk '$6=="portcullis-session"{print "portcullis-session="$7}' "$jar")
status=$(curl -s -o /dev/null -w '%{http_code}' -H "Cookie: $cookie" "http://$GW/campaigns")
[ "$status" = 200 ] || { echo "sign-in for the benchmark failed (status $status)" >&2; exit 1; }

mkdir -p bench/results
run() { wrk -t2 -c"$CONN" -d"${DUR}s" --latency "$@"; }
echo "== direct upstream" >&2
run "http://$UP/campaigns" > bench/results/direct.txt
echo "== through portcullis" >&2
run -H "Cookie: $cookie" "http://$GW/campaigns" > bench/results/portcullis.txt

rps() { awk '/Requests\/sec/{print $2}' "$1"; }
pct() { awk -v p="$2" '$1==p{print $2}' "$1"; }
to_ms() { python3 -c 'import sys; v=sys.argv[1]; u={"us":0.001,"ms":1,"s":1000}; n=v.rstrip("usm"); print(float(n)*u[v[len(n):]])' "$1"; }
d_rps=$(rps bench/results/direct.txt); p_rps=$(rps bench/results/portcullis.txt)
d50=$(to_ms "$(pct bench/results/direct.txt 50%)"); p50=$(to_ms "$(pct bench/results/portcullis.txt 50%)")
d99=$(to_ms "$(pct bench/results/direct.txt 99%)"); p99=$(to_ms "$(pct bench/results/portcullis.txt 99%)")
python3 - "$d_rps" "$p_rps" "$d50" "$p50" "$d99" "$p99" "$DUR" "$CONN" <<'PY'
import sys
d, p, d50, p50, d99, p99 = map(float, sys.argv[1:7])
print(f"| path | requests/s | p50 ms | p99 ms |")
print(f"|---|---|---|---|")
print(f"| direct upstream | {d:,.0f} | {d50:.3f} | {d99:.3f} |")
print(f"| through Portcullis | {p:,.0f} | {p50:.3f} | {p99:.3f} |")
print(f"| ratio (Portcullis / direct) | {p/d:.2f}× | {p50/d50:.2f}× | {p99/d99:.2f}× |")
print(f"wrk -t2 -c{sys.argv[8]} -d{sys.argv[7]}s --latency; added p99: {p99-d99:.3f} ms")
PY
