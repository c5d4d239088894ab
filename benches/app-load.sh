#!/usr/bin/env bash
# The app's seed workload (app/examples/loadgen.rs) against one or more wingman-app
# instances, directly or behind wingman-edge, on SQLite or PostgreSQL. A benchmark,
# not a test: it prints loadgen's report and the app processes' CPU per REST request.
#
#   benches/app-load.sh [--db sqlite|postgres] [--instances N] [--edge]
#                       [--users U] [--duration S] [--idle-sockets K] [--token-delay D]
#
# Several instances share the data (one SQLite file, or one PostgreSQL database) and fan
# events out through Redis (127.0.0.1:6379, a fresh key prefix per run). PostgreSQL runs
# use a fresh database on 127.0.0.1:5432 (trust auth), dropped at the end. Ports: apps
# 127.0.0.1:3101.., edge 127.0.0.1:8090 (admin 9991). Traffic stays on loopback and
# stops after --duration seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

DB=sqlite INSTANCES=1 EDGE=0 USERS=100 DURATION=20 IDLE=0 TOKEN_DELAY=0ms
while [ $# -gt 0 ]; do
    case "$1" in
        --db) DB=$2; shift 2 ;;
        --instances) INSTANCES=$2; shift 2 ;;
        --edge) EDGE=1; shift ;;
        --users) USERS=$2; shift 2 ;;
        --duration) DURATION=$2; shift 2 ;;
        --idle-sockets) IDLE=$2; shift 2 ;;
        --token-delay) TOKEN_DELAY=$2; shift 2 ;;
        -h|--help) sed -n 2,13p "$0"; exit 0 ;;
        *) echo "app-load.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
case "$DB" in sqlite|postgres) ;; *) echo "app-load.sh: --db is sqlite or postgres, not $DB" >&2; exit 2 ;; esac
[[ "$INSTANCES" =~ ^[1-9][0-9]?$ ]] || { echo "app-load.sh: --instances must be 1..99" >&2; exit 2; }

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/wingman-target}"
cargo build --release --quiet --bin wingman-edge -p wingman-edge
cargo build --release --quiet --bin wingman-app --example loadgen -p wingman-app
BIN="$CARGO_TARGET_DIR/release"

WORK=$(mktemp -d)
PIDS=()
PG_DB=""
cleanup() {
    for p in "${PIDS[@]}"; do kill -INT "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    if [ -n "$PG_DB" ]; then
        psql -q -h 127.0.0.1 -U postgres -d postgres -c "DROP DATABASE IF EXISTS $PG_DB WITH (FORCE)" >/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

wait_http() { # url what
    for _ in $(seq 300); do
        curl -sf -o /dev/null "$1" && return 0
        sleep 0.1
    done
    echo "app-load.sh: $2 did not become ready at $1" >&2
    exit 1
}

if [ "$DB" = sqlite ]; then
    DB_URL="sqlite://$WORK/app.db"
else
    PG_DB="wm_bench_$$"
    psql -q -h 127.0.0.1 -U postgres -d postgres -c "CREATE DATABASE $PG_DB" >/dev/null
    DB_URL="postgres://postgres@127.0.0.1:5432/$PG_DB"
fi
REDIS_URL=""
[ "$INSTANCES" -gt 1 ] && REDIS_URL="redis://127.0.0.1:6379/"

APPS=()
for i in $(seq "$INSTANCES"); do
    port=$((3100 + i))
    WINGMAN_APP_SERVER__LISTEN="127.0.0.1:$port" \
    WINGMAN_APP_SERVER__METRICS_LISTEN="127.0.0.1:$((port + 100))" \
    WINGMAN_APP_DATABASE__URL="$DB_URL" \
    WINGMAN_APP_REDIS__URL="$REDIS_URL" \
    WINGMAN_APP_REDIS__PREFIX="bench$$:" \
    WINGMAN_APP_LLM__TOKEN_DELAY="$TOKEN_DELAY" \
    RUST_LOG=warn "$BIN/wingman-app" >"$WORK/app$i.log" 2>&1 &
    PIDS+=($!)
    APPS+=("127.0.0.1:$port")
    # one at a time: the first one runs the migrations
    wait_http "http://127.0.0.1:$port/readyz" "wingman-app $i"
done
APP_PIDS=("${PIDS[@]}")

if [ "$EDGE" = 1 ]; then
    servers=$(printf '{ address = "%s" }, ' "${APPS[@]}")
    cat >"$WORK/edge.toml" <<EOF
[server]
pid_file = "$WORK/edge.pid"
upgrade_sock = "$WORK/upgrade.sock"
[[listeners]]
address = "127.0.0.1:8090"
[admin]
address = "127.0.0.1:9991"
[client]
max_conns_per_ip = 0   # every simulated user comes from 127.0.0.1
[[upstreams]]
name = "app"
algorithm = "least_conn"
servers = [${servers%, }]
[upstreams.health_check]
path = "/readyz"
interval = "1s"
[[routes]]
name = "app"
upstream = "app"
websocket_idle_timeout = "1h"
EOF
    "$BIN/wingman-edge" run --config "$WORK/edge.toml" >"$WORK/edge.log" 2>&1 &
    PIDS+=($!)
    wait_http "http://127.0.0.1:8090/healthz" "wingman-edge"
    URL="http://127.0.0.1:8090"
else
    URL=$(printf 'http://%s,' "${APPS[@]}")
    URL=${URL%,}
fi

cpu_ticks() { local t=0; for p in "${APP_PIDS[@]}"; do t=$((t + $(awk '{print $14+$15}' "/proc/$p/stat"))); done; echo "$t"; }
echo "== $INSTANCES x wingman-app on $DB$([ "$EDGE" = 1 ] && echo ' behind wingman-edge'), $USERS users, ${DURATION}s"
before=$(cpu_ticks)
"$BIN/examples/loadgen" --url "$URL" --users "$USERS" --duration "$DURATION" \
    --idle-sockets "$IDLE" --prefix "b$$" 2>/dev/null | tee "$WORK/report.txt"
after=$(cpu_ticks)
rest=$(awk '/REST requests ok/ {print $4}' "$WORK/report.txt")
hz=$(getconf CLK_TCK)
if [ -n "$rest" ] && [ "$rest" -gt 0 ]; then
    echo "app CPU: $(( (after - before) * 1000000 / hz / rest )) us per REST request (all instances, setup included)"
fi
