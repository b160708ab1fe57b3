#!/usr/bin/env bash
# Authenticated proxied GET: the same small upstream measured directly, through nginx as a plain
# reverse proxy (the baseline an ESP already runs), and through Portcullis, in one run, on
# loopback. Prints throughput and p50/p99 for each and the ratios.
#   bench/proxy.sh [duration_seconds=15] [connections=64]
# Needs wrk and nginx (apt-get install wrk nginx), python3 and curl. Results go to bench/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
DUR=${1:-15}
CONN=${2:-64}
GW=127.0.0.1:18080
UP=127.0.0.1:18081
NGX=127.0.0.1:18082
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install wrk" >&2; exit 1; }
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
[ -x "$NGINX" ] || { echo "nginx is missing: apt-get install nginx" >&2; exit 1; }

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
mkdir -p "$work/nginx"
cat > "$work/nginx.conf" <<NGINX
daemon off;
worker_processes auto;
pid $work/nginx/nginx.pid;
error_log $work/nginx/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $work/nginx/body;
  proxy_temp_path $work/nginx/proxy;
  fastcgi_temp_path $work/nginx/fastcgi;
  uwsgi_temp_path $work/nginx/uwsgi;
  scgi_temp_path $work/nginx/scgi;
  upstream console { server $UP; keepalive 128; }
  server {
    listen $NGX;
    location / {
      proxy_pass http://console;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host \$host;
      proxy_set_header X-Forwarded-For \$remote_addr;
    }
  }
}
NGINX
"$NGINX" -p "$work/nginx" -c "$work/nginx.conf" & pids+=($!)
printf 'tall violet lantern orbit 42\n' | $BIN user add bench@example.com --account bench >/dev/null
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
curl -fs -o /dev/null -c "$jar" -b "$jar" --data-urlencode "username=bench@example.com" --data-urlencode "password=tall violet lantern orbit 42" --data-urlencode "csrf=$t" --data-urlencode "next=" "http://$GW/_portcullis/login"
t=$(csrf /_portcullis/mfa)
curl -fs -o /dev/null -c "$jar" -b "$jar" --data-urlencode "code=$(code)" --data-urlencode "csrf=$t" "http://$GW/_portcullis/mfa"
cookie=$(awk '$6=="portcullis-session"{print "portcullis-session="$7}' "$jar")
# Device binding is on by default: prove a device key once, as a browser does, and send the
# bound cookie with the session cookie (it outlives the run), so the measured path includes the
# bound-cookie check.
cookie=$(python3 bench/bind.py "$GW" "$cookie")
status=$(curl -s -o /dev/null -w '%{http_code}' -H "Cookie: $cookie" "http://$GW/campaigns")
[ "$status" = 200 ] || { echo "sign-in for the benchmark failed (status $status)" >&2; exit 1; }

mkdir -p bench/results
run() { wrk -t2 -c"$CONN" -d"${DUR}s" --latency "$@"; }
echo "== direct upstream" >&2
run "http://$UP/campaigns" > bench/results/direct.txt
echo "== through nginx" >&2
run -H "Cookie: $cookie" "http://$NGX/campaigns" > bench/results/nginx.txt
echo "== through portcullis" >&2
run -H "Cookie: $cookie" "http://$GW/campaigns" > bench/results/portcullis.txt

rps() { awk '/Requests\/sec/{print $2}' "$1"; }
pct() { awk -v p="$2" '$1==p{print $2}' "$1"; }
summary() { # requests/s, p50 ms, p99 ms of one wrk report
  python3 - "$(rps "$1")" "$(pct "$1" 50%)" "$(pct "$1" 99%)" <<'PY'
import sys
def ms(v):
    for unit, f in (("us", 0.001), ("ms", 1.0), ("s", 1000.0)):
        if v.endswith(unit):
            return float(v[: -len(unit)]) * f
    raise SystemExit(f"unreadable latency {v!r}")
print(sys.argv[1], ms(sys.argv[2]), ms(sys.argv[3]))
PY
}
python3 - "$DUR" "$CONN" $(summary bench/results/direct.txt) $(summary bench/results/nginx.txt) $(summary bench/results/portcullis.txt) <<'PY'
import sys
dur, conn = sys.argv[1:3]
d, n, p = (tuple(map(float, sys.argv[i:i + 3])) for i in (3, 6, 9))
print("| path | requests/s | p50 ms | p99 ms |")
print("|---|---|---|---|")
for name, (r, p50, p99) in (("direct upstream", d), ("nginx reverse proxy", n), ("Portcullis (memory store)", p)):
    print(f"| {name} | {r:,.0f} | {p50:.3f} | {p99:.3f} |")
print(f"| Portcullis / nginx | {p[0]/n[0]:.2f}× | {p[1]/n[1]:.2f}× | {p[2]/n[2]:.2f}× |")
print(f"| Portcullis / direct | {p[0]/d[0]:.2f}× | {p[1]/d[1]:.2f}× | {p[2]/d[2]:.2f}× |")
print(f"wrk -t2 -c{conn} -d{dur}s --latency; p99 added over direct: Portcullis {p[2]-d[2]:.3f} ms, nginx {n[2]-d[2]:.3f} ms")
PY
