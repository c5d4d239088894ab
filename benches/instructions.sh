#!/usr/bin/env bash
# User-space instructions per proxied request, counted by callgrind, for nginx, bare
# pingora (examples/bare_pingora.rs) and wingman-edge on the same origins.
#
# Requests per second on this 2-core shared VM swing by ±30% between runs; an
# instruction count does not (callgrind counts instructions, not time, so the same
# binary and inputs give the same count whatever else the machine does). It leaves out
# the kernel (the proxies make the same system calls per request: 2 sends, 2 receives)
# and cache misses, so it is a floor for CPU per request, not a req/s prediction.
#
# Usage: benches/instructions.sh [--path /small] [--seconds 10] [--proxies nginx,bare,edge]
#                                [--no-build]
# Needs: valgrind, nginx with the echo module, wrk, curl (see benches/README.md).
# Every process it starts runs in its own session and is stopped by process group.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
bench_dir=${WINGMAN_BENCH_DIR:-$repo/../shared/bench}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/wingman-target}

path=/small; seconds=10; proxies=nginx,bare,edge; build=1
while [ $# -gt 0 ]; do
    case "$1" in
        --path) path=${2:?}; shift 2;;
        --seconds) seconds=${2:?}; shift 2;;
        --proxies) proxies=${2:?}; shift 2;;
        --no-build) build=0; shift;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0;;
        *) echo "instructions.sh: unknown option $1" >&2; exit 2;;
    esac
done
for c in valgrind callgrind_control callgrind_annotate nginx wrk curl python3 setsid; do
    command -v "$c" >/dev/null || { echo "instructions.sh: $c is not installed" >&2; exit 1; }
done
[ -f "$bench_dir/origin-nginx.conf.tmpl" ] || { echo "instructions.sh: harness not found at $bench_dir" >&2; exit 1; }

if [ "$build" = 1 ]; then
    (cd "$repo" && cargo build --release --bin wingman-edge --example bare_pingora)
fi
edge_bin=$CARGO_TARGET_DIR/release/wingman-edge
bare_bin=$CARGO_TARGET_DIR/release/examples/bare_pingora

run=$(mktemp -d /tmp/wingman-instr.XXXXXX)
groups=()
cleanup() {
    for g in "${groups[@]}"; do kill -TERM -- "-$g" 2>/dev/null || true; done
    sleep 1
    for g in "${groups[@]}"; do kill -KILL -- "-$g" 2>/dev/null || true; done
}
trap cleanup EXIT

# ---------------------------------------------------------------- origins (the harness's)
mkdir -p "$run/data"
python3 "$bench_dir/gen_data.py" "$run/data" >/dev/null
for port in 9101 9102; do
    mkdir -p "$run/origin-$port-tmp"
    sed -e "s#@PORT@#$port#g; s#@RUN@#$run#g; s#@DATA@#$run/data#g" \
        "$bench_dir/origin-nginx.conf.tmpl" >"$run/origin-$port.conf"
    setsid nginx -c "$run/origin-$port.conf" -g 'daemon off;' >/dev/null 2>&1 &
    groups+=($!)
done
upstreams=127.0.0.1:9101,127.0.0.1:9102

wait_for() {   # port: up to 60 s (valgrind starts slowly)
    local i
    for i in $(seq 300); do
        curl -s -o /dev/null --max-time 2 "http://127.0.0.1:$1$path" && return 0
        sleep 0.2
    done
    echo "instructions.sh: nothing answers on port $1" >&2; return 1
}
wait_for 9101; wait_for 9102

# ---------------------------------------------------------------- proxy configs
mkdir -p "$run/nginx-tmp"
sed -e "s#@LOAD_MODULES@##; s#@WORKERS@#1#; s#@RUN@#$run#g; s#@PORT@#6291#; s#@GZIP@#off#" \
    -e "s#@GZIP_LEVEL@#5#; s#@BROTLI@##; s#@CACHE_PATH@##; s#@CACHE_LOC@##" \
    -e "s#@UPSTREAM_SERVERS@#        server 127.0.0.1:9101;\n        server 127.0.0.1:9102;#" \
    "$bench_dir/nginx.conf.tmpl" >"$run/nginx.conf"
# the edge with the config the side-by-side harness gives it: edge-under-bench.sh
# writes it, then execs WINGMAN_EDGE_BIN (here /bin/true, which returns at once)
BENCH_PORT=6293 BENCH_UPSTREAMS=$upstreams BENCH_WORKERS=1 BENCH_RUN_DIR=$run \
    WINGMAN_EDGE_BIN=/bin/true "$here/edge-under-bench.sh" >/dev/null 2>&1 || true
[ -f "$run/wingman-edge.toml" ] || { echo "instructions.sh: edge-under-bench.sh wrote no config" >&2; exit 1; }

# ---------------------------------------------------------------- one proxy under callgrind
measure() {   # name port cmd...
    local name=$1 port=$2; shift 2
    setsid valgrind --tool=callgrind --callgrind-out-file="$run/cg.$name.%p" "$@" \
        >"$run/$name.log" 2>&1 &
    local group=$!
    groups+=($group)
    wait_for "$port"
    timeout $((seconds + 30)) wrk -t1 -c16 -d3s "http://127.0.0.1:$port$path" >/dev/null
    local vpid
    vpid=$(pgrep -s "$group" -f valgrind | head -1)
    callgrind_control -z "$vpid" >/dev/null 2>&1
    local n
    n=$(timeout $((seconds + 30)) wrk -t1 -c16 -d"${seconds}s" "http://127.0.0.1:$port$path" |
        awk '/requests in/ {print $1}')
    callgrind_control -d "$vpid" >/dev/null 2>&1
    sleep 1
    local f ir
    f=$(ls -t "$run"/cg."$name".*.* 2>/dev/null | head -1)
    ir=$(callgrind_annotate "$f" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",","",$1); print $1}')
    kill -TERM -- "-$group" 2>/dev/null || true
    sleep 1
    kill -KILL -- "-$group" 2>/dev/null || true
    echo "$name $n $((ir / n))"
}

results=()
for p in ${proxies//,/ }; do
    case "$p" in
        nginx) results+=("$(measure nginx 6291 nginx -c "$run/nginx.conf" -g 'daemon off; master_process off;')");;
        bare)  results+=("$(BENCH_PORT=6292 BENCH_UPSTREAMS=$upstreams BENCH_WORKERS=1 measure bare 6292 "$bare_bin")");;
        edge)  results+=("$(measure wingman-edge 6293 "$edge_bin" run -c "$run/wingman-edge.toml")");;
        *) echo "instructions.sh: unknown proxy $p" >&2; exit 2;;
    esac
done

echo
echo "GET $path, 16 connections, ${seconds} s under callgrind, 1 thread each"
echo
echo "| proxy | requests | instructions/request | vs nginx |"
echo "|---|---|---|---|"
base=""
for r in "${results[@]}"; do
    read -r name n ir <<<"$r"
    [ "$name" = nginx ] && base=$ir
done
for r in "${results[@]}"; do
    read -r name n ir <<<"$r"
    ratio="—"
    [ -n "$base" ] && ratio=$(awk -v a="$ir" -v b="$base" 'BEGIN {printf "%.2f", a / b}')
    printf '| %s | %s | %s | %s |\n' "$name" "$n" "$ir" "$ratio"
done
echo
echo "callgrind files: $run/cg.*"
