# Shared by the HTTP benchmarks (sourced, from the repository root): checks for wrk, builds the
# release binary and the upstream, and sets BIN, TGT, a work directory and `pids`, the processes
# stopped on exit (then `bench_cleanup`, if the script defines it); and the helpers that write a
# gateway's config (`gateway_config`), sign a benchmark user in (`totp_secret`, `totp_code`,
# `bound_session`) and run the baseline nginx (`nginx_config`, `NGINX`).
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install wrk" >&2; exit 1; }
cargo build --release --bin portcullis --example bench-upstream --example bench-flood --example bench-core >&2
TGT=${CARGO_TARGET_DIR:-target}
BIN=$TGT/release/portcullis
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  if declare -F bench_cleanup >/dev/null; then bench_cleanup; fi
  rm -rf "$work"
}
trap cleanup EXIT
mkdir -p bench/results

# Every benchmark client (the binding script, curl, wrk, oha) sends this User-Agent: a bound
# cookie counts only for the network and browser it was issued to.
export BENCH_UA=portcullis-bench

totp_secret() { # the secret of an otpauth:// URI
  python3 -c 'import sys,urllib.parse as u; print(u.parse_qs(u.urlparse(sys.argv[1]).query)["secret"][0])' "$1"
}
totp_code() { # secret, offset: the TOTP code of the current 30 s step plus offset steps (a code is accepted once)
  python3 - "$1" "$2" <<'PY'
import base64, hmac, struct, sys, time
s = sys.argv[1]; key = base64.b32decode(s + "=" * (-len(s) % 8))
mac = hmac.new(key, struct.pack(">Q", int(time.time()) // 30 + int(sys.argv[2])), "sha1").digest()
o = mac[-1] & 15
print("%06d" % ((struct.unpack(">I", mac[o:o + 4])[0] & 0x7fffffff) % 1000000))
PY
}
bound_session() { # gateway, email, password, TOTP secret, TOTP step offset: prints the Cookie header of a complete, bound session
  local gw=$1 jar="$work/jar-$1" t cookie status
  csrf() { curl -fs -A "$BENCH_UA" -c "$jar" -b "$jar" "http://$gw$1" | sed -n 's/.*name="csrf" value="\([^"]*\)".*/\1/p' | head -1; }
  t=$(csrf /_portcullis/login)
  curl -fs -A "$BENCH_UA" -o /dev/null -c "$jar" -b "$jar" --data-urlencode "username=$2" --data-urlencode "password=$3" --data-urlencode "csrf=$t" --data-urlencode "next=" "http://$gw/_portcullis/login"
  t=$(csrf /_portcullis/mfa)
  curl -fs -A "$BENCH_UA" -o /dev/null -c "$jar" -b "$jar" --data-urlencode "code=$(totp_code "$4" "$5")" --data-urlencode "csrf=$t" "http://$gw/_portcullis/mfa"
  cookie=$(awk '$6=="portcullis-session"{print "portcullis-session="$7}' "$jar")
  # Device binding is on by default: prove a device key once, as a browser does, and send the
  # bound cookie with the session cookie (it outlives the run), so the measured path includes the
  # bound-cookie check.
  cookie=$(python3 bench/bind.py "$gw" "$cookie")
  status=$(curl -s -o /dev/null -w '%{http_code}' -H "Cookie: $cookie" -H "User-Agent: $BENCH_UA" "http://$gw/campaigns")
  [ "$status" = 200 ] || { echo "sign-in for the benchmark failed on $gw (status $status)" >&2; exit 1; }
  echo "$cookie"
}
gateway_config() { # listen address, upstream, ephemeral store[, Redis key prefix[, log level]]: a gateway's config, with its own SQLite file under $work and a fresh master key
  cat <<TOML
[server]
listen = "$1"
public_url = "http://$1/"
[upstream]
url = "http://$2/"
[storage]
durable = "sqlite://$work/db-${1//[.:]/-}.sqlite"
ephemeral = "$3"
redis_prefix = "${4:-bench:}"
[secrets]
master_key = "$(head -c 32 /dev/urandom | base64)"
[log]
level = "${5:-warn}"
TOML
}
nginx_config() { # upstream, listen address[, more of the http block]: an nginx.conf (under $work/nginx) that proxies to the upstream as an ESP's plain reverse proxy does
  mkdir -p "$work/nginx"
  cat <<NGINX
daemon off;
worker_processes ${NGINX_WORKERS:-auto};
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
  upstream console { server $1; keepalive 128; }
  server {
    listen $2;
    location / {
      proxy_pass http://console;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host \$host;
      proxy_set_header X-Forwarded-For \$remote_addr;
    }
  }
${3:-}
}
NGINX
}
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

# With PIN=1 the proxies under test get a core of their own: commands prefixed with
# "${PROXY_CORE[@]}" run on core 1, those with "${CLIENT_CORE[@]}" (the load generator, the
# upstream) on core 0 (taskset, util-linux, which execs the command: `$!` is its pid). Without
# it the prefixes are empty and everything runs on any core, as on a shared machine.
PROXY_CORE=()
CLIENT_CORE=()
if [ "${PIN:-0}" = 1 ]; then
  [ "$(nproc)" -ge 2 ] || { echo "PIN=1 needs two cores" >&2; exit 1; }
  PROXY_CORE=(taskset -c 1)
  CLIENT_CORE=(taskset -c 0)
  export NGINX_WORKERS=1
fi
cpu_snapshot() { # the busy and total jiffies of cores 0 and 1, from /proc/stat
  awk '$1=="cpu0"||$1=="cpu1"{b=$2+$3+$4+$7+$8; t=b+$5+$6; printf "%s %s ", b, t}' /proc/stat
}
cpu_busy() { # two snapshots: "core0% core1%", each core's busy share between them
  python3 - "$1" "$2" <<'PY'
import sys
a, b = (list(map(int, s.split())) for s in sys.argv[1:3])
print(" ".join(f"{100 * (b[i] - a[i]) / max(1, b[i + 1] - a[i + 1]):.0f}" for i in (0, 2)))
PY
}
