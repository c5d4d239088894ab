#!/usr/bin/env bash
# TLS side by side: HTTPS requests per second with keep-alive, and TLS handshakes per
# second (a new connection per request), for wingman-edge and nginx with the same
# certificate (ECDSA P-256) in front of the same origin. Loopback only; every run is
# bounded by --duration.
#
#   benches/tls.sh [--duration 5] [--connections 64]
#
# Needs nginx, wrk and openssl (apt-get install -y nginx wrk openssl). Prints a table
# and the edge/nginx ratios; the machine is small and shared, so compare ratios from
# one run. The edge binary is built with `cargo build --release` first.
set -euo pipefail
duration=5; conns=64
while [ $# -gt 0 ]; do
  case "$1" in
    --duration) duration=$2; shift 2;;
    --connections) conns=$2; shift 2;;
    *) echo "unknown option $1" >&2; exit 2;;
  esac
done
for tool in nginx wrk openssl; do
  command -v "$tool" >/dev/null || { echo "missing $tool: apt-get install -y nginx wrk openssl" >&2; exit 1; }
done
here=$(cd "$(dirname "$0")/.." && pwd)
target=${CARGO_TARGET_DIR:-/var/tmp/wingman-target}
(cd "$here" && cargo build --release -q -p wingman-edge)
dir=$(mktemp -d /tmp/wingman-tls-bench.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; [ -f "$dir/nginx.pid" ] && kill "$(cat "$dir/nginx.pid")" 2>/dev/null; rm -rf "$dir"; }
trap cleanup EXIT

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -subj "/CN=bench.test" -addext "subjectAltName=DNS:bench.test" \
  -keyout "$dir/key.pem" -out "$dir/cert.pem" 2>/dev/null

cat >"$dir/nginx.conf" <<NGINX
worker_processes 1;
daemon on;
pid $dir/nginx.pid;
error_log $dir/nginx-error.log;
events { worker_connections 4096; }
http {
  access_log off;
  server { listen 127.0.0.1:19441; location / { return 200 "hello from the origin, about a hundred bytes of body for the tls benchmark\n"; } }
  upstream origin { server 127.0.0.1:19441; keepalive 256; }
  server {
    listen 127.0.0.1:19443 ssl;
    ssl_certificate $dir/cert.pem; ssl_certificate_key $dir/key.pem;
    ssl_protocols TLSv1.2 TLSv1.3;
    location / { proxy_pass http://origin; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
NGINX
taskset -c 0 nginx -c "$dir/nginx.conf"   # the proxy and the origin share CPU 0, as the edge does below

cat >"$dir/edge.toml" <<EDGE
[server]
threads = 1
grace_period = "0s"
pid_file = "$dir/edge.pid"
upgrade_sock = "$dir/upgrade.sock"
[[listeners]]
address = "127.0.0.1:19444"
[listeners.tls]
certificates = [{ cert = "$dir/cert.pem", key = "$dir/key.pem" }]
h2 = false
[admin]
address = "127.0.0.1:0"
[client]
keepalive_requests = 0
max_conns_per_ip = 0
[[upstreams]]
name = "origin"
servers = [{ address = "127.0.0.1:19441" }]
[[routes]]
name = "all"
upstream = "origin"
EDGE
RUST_LOG=error taskset -c 0 "$target/release/wingman-edge" run -c "$dir/edge.toml" >"$dir/edge.log" 2>&1 &
pids+=($!)
for _ in $(seq 50); do curl -sk -o /dev/null https://127.0.0.1:19444/ && break; sleep 0.1; done

run() { # name url extra-wrk-args...
  local out; out=$(taskset -c 1 wrk -t1 -c"$conns" -d"${duration}s" --latency "${@:2}" 2>/dev/null)
  local rps p99
  rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
  p99=$(awk '$1=="99%" {print $2}' <<<"$out")
  echo "$1 $rps $p99"
}
results=()
results+=("$(run edge-keepalive https://127.0.0.1:19444/)")
results+=("$(run nginx-keepalive https://127.0.0.1:19443/)")
results+=("$(run edge-handshake https://127.0.0.1:19444/ -H 'Connection: close')")
results+=("$(run nginx-handshake https://127.0.0.1:19443/ -H 'Connection: close')")
echo "| run | req/s | p99 |"
echo "|---|---|---|"
for r in "${results[@]}"; do set -- $r; echo "| $1 | $2 | $3 |"; done
ka_e=$(awk '{print $2}' <<<"${results[0]}"); ka_n=$(awk '{print $2}' <<<"${results[1]}")
hs_e=$(awk '{print $2}' <<<"${results[2]}"); hs_n=$(awk '{print $2}' <<<"${results[3]}")
python3 -c "print(f'edge/nginx: HTTPS keep-alive req/s {float($ka_e)/float($ka_n):.2f}, handshakes/s {float($hs_e)/float($hs_n):.2f}')"
