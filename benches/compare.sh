#!/usr/bin/env bash
# wingman-edge against nginx and HAProxy, side by side, on the same origins, the same
# worker count and the same CPU pinning, using the project's harness (shared/bench/run.sh).
# Prints req/s and p99 per proxy and scenario and the ratios edge/nginx and edge/haproxy.
#
# Usage: benches/compare.sh [options] [-- extra run.sh options]
#   --quick            short sanity run: 1 round, 3 s per scenario, 3 scenarios,
#                      short quiet gate and no repeats of contaminated runs
#   --workers N        nginx worker_processes / HAProxy nbthread / edge threads (default 1)
#   --duration S       seconds per measured wrk run (run.sh default 10)
#   --warmup S         seconds of unmeasured wrk before each measured run (run.sh default 2)
#   --runs N           rounds; tables show the median over rounds (run.sh default 3)
#   --scenarios LIST   comma list (default: small-c64,small-c256,small-c1000,
#                      json50k-c64,slow-c256,json50k-gzip-c64,cacheable-c64)
#   --proxies LIST     default direct,nginx,nginx-gzip,nginx-cache,haproxy,custom (custom = wingman-edge)
#   --no-pin | --pin   run.sh pinning mode (default pinned: proxy on CPU 0, load on CPU 1)
#   --port N           port for the edge (default 6188)
#   --out DIR          results directory (default ${BENCH_OUT:-/tmp/wingman-bench}/<time>-w<N>-<mode>)
#   --no-build         do not run `cargo build --release` first
#   -h | --help        this text
#
# Environment: WINGMAN_BENCH_DIR (the harness; default <repo>/../shared/bench),
# CARGO_TARGET_DIR (default /var/tmp/wingman-target), BENCH_OUT (parent of results).
# The harness's own summary (CPU per request, RSS, contamination check) is written to
# <out>/summary.md; this script's comparison to <out>/compare.md.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
bench_dir=${WINGMAN_BENCH_DIR:-$(dirname "$0")/../../shared/bench}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/wingman-target}

die() { echo "compare.sh: $*" >&2; exit 2; }
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

workers=1; quick=0; build=1; port=6188; out=""; pin=""
duration=""; warmup=""; runs=""; scenarios=""; proxies="direct,nginx,nginx-gzip,nginx-cache,haproxy,custom"
extra=()
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) quick=1; shift;;
        --workers) workers=${2:?}; shift 2;;
        --duration) duration=${2:?}; shift 2;;
        --warmup) warmup=${2:?}; shift 2;;
        --runs) runs=${2:?}; shift 2;;
        --scenarios) scenarios=${2:?}; shift 2;;
        --proxies) proxies=${2:?}; shift 2;;
        --pin|--no-pin) pin=$1; shift;;
        --port) port=${2:?}; shift 2;;
        --out) out=${2:?}; shift 2;;
        --no-build) build=0; shift;;
        -h|--help) usage; exit 0;;
        --) shift; extra=("$@"); break;;
        *) die "unknown option $1 (see --help)";;
    esac
done
[[ $workers =~ ^[1-9][0-9]*$ ]] || die "--workers needs a positive number"

[ -x "$bench_dir/run.sh" ] || die "harness not found at $bench_dir (set WINGMAN_BENCH_DIR)"
bench_dir=$(cd "$bench_dir" && pwd)

# ------------------------------------------------------------ what the harness needs
missing=()
for c in nginx haproxy wrk curl python3; do command -v "$c" >/dev/null || missing+=("$c"); done
[ -f /usr/lib/nginx/modules/ngx_http_echo_module.so ] || missing+=(libnginx-mod-http-echo)
for c in taskset setsid; do command -v "$c" >/dev/null || missing+=(util-linux); done
command -v timeout >/dev/null || missing+=(coreutils)
if [ ${#missing[@]} -gt 0 ]; then
    echo "compare.sh: the harness needs packages that are not installed: ${missing[*]}" >&2
    echo "install them (Debian 12) with:" >&2
    echo "  apt-get install -y $(printf '%s\n' "${missing[@]}" | sort -u | paste -sd' ')" >&2
    echo "(see $bench_dir/README.md, section Setup)" >&2
    exit 1
fi

# ------------------------------------------------------------ scenarios and options
if [ -z "$scenarios" ]; then
    if [ "$quick" = 1 ]; then
        scenarios="small-c64,json50k-c64,slow-c256"
    else
        scenarios="small-c64,small-c256,small-c1000,json50k-c64,slow-c256,json50k-gzip-c64,cacheable-c64"
    fi
fi
args=(--proxies "$proxies" --scenarios "$scenarios" --workers "$workers")
if [ "$quick" = 1 ]; then
    args+=(--runs "${runs:-1}" --duration "${duration:-3}" --warmup "${warmup:-1}"
           --quiet-wait 5 --max-attempts 1)
else
    [ -n "$runs" ] && args+=(--runs "$runs")
    [ -n "$duration" ] && args+=(--duration "$duration")
    [ -n "$warmup" ] && args+=(--warmup "$warmup")
fi
[ -n "$pin" ] && args+=("$pin")
mode="w${workers}-$([ "$pin" = --no-pin ] && echo nopin || echo pin)$([ "$quick" = 1 ] && echo -quick || true)"
[ -n "$out" ] || out="${BENCH_OUT:-/tmp/wingman-bench}/$(date +%Y%m%d-%H%M%S)-$mode"
mkdir -p "$out/conf" || die "cannot create $out"
out=$(cd "$out" && pwd)
case "$out/" in "$repo"/*) die "--out $out is inside the repository; use /tmp or \$BENCH_OUT";; esac

# ------------------------------------------------------------ build
if [ "$build" = 1 ]; then
    echo "compare.sh: cargo build --release (CARGO_TARGET_DIR=$CARGO_TARGET_DIR)" >&2
    (cd "$repo" && cargo build --release) || die "release build failed"
fi
[ -x "$CARGO_TARGET_DIR/release/wingman-edge" ] || die "no binary at $CARGO_TARGET_DIR/release/wingman-edge"

# ------------------------------------------------------------ run the harness
# The proxy command is expanded by the harness's `bash -c "exec CMD"`; quote the path.
proxy_cmd=$(printf '%q' "$here/edge-under-bench.sh")
export WINGMAN_BENCH_CONF_DIR="$out/conf"   # edge-under-bench.sh saves its config there
echo "compare.sh: results -> $out" >&2
rc=0
"$bench_dir/run.sh" "${args[@]}" --proxy-cmd "$proxy_cmd" --proxy-port "$port" \
    --proxy-name wingman-edge --out "$out" "${extra[@]}" >"$out/harness-stdout.md" || rc=$?
[ -s "$out/results.csv" ] && [ "$(wc -l <"$out/results.csv")" -gt 1 ] ||
    die "the harness produced no results (exit $rc); see $out/run.log and $out/raw/"
[ "$rc" = 0 ] || echo "compare.sh: WARNING: run.sh exited $rc; the tables below may be incomplete" >&2

# ------------------------------------------------------------ comparison tables
python3 - "$out" >"$out/compare.md" <<'EOF'
import csv, os, statistics, sys

d = sys.argv[1]
EDGE, BASES = "wingman-edge", ("nginx", "haproxy")


def read(name):
    p = os.path.join(d, name)
    if not os.path.exists(p):
        return []
    with open(p, newline="") as f:
        return list(csv.DictReader(f))


def fl(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


rows, checks = read("results.csv"), read("checks.csv")
scen, prox, g = [], [], {}
for r in rows:
    if r["scenario"] not in scen:
        scen.append(r["scenario"])
    if r["proxy"] not in prox:
        prox.append(r["proxy"])
    g.setdefault((r["proxy"], r["scenario"]), []).append(r)


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


stats = {}
for k, rs in g.items():
    us = [fl(r["proxy_cpu_pct"]) / 100.0 / fl(r["rps"]) * 1e6 for r in rs
          if fl(r["proxy_cpu_pct"]) is not None and fl(r["rps"])]
    errs = sum(int(r[c] or 0) for r in rs for c in ("non2xx", "err_connect", "err_read", "err_write", "err_timeout"))
    stats[k] = dict(rps=med([fl(r["rps"]) for r in rs]), p99=med([fl(r["p99_ms"]) for r in rs]),
                    us=med(us), errs=errs, n=len(rs), flagged=any(r["attempts"].endswith("+") for r in rs))


def f_rps(x):
    return "n/a" if x is None else f"{x:,.0f}"


def f_ms(x):
    return "n/a" if x is None else (f"{x:.2f}" if x < 10 else f"{x:.1f}")


def f_us(x):
    return "n/a" if x is None else f"{x:.1f}"


def ratio(a, b):
    return "n/a" if a is None or b is None or b == 0 else f"{a / b:.2f}"


mode = rows[0]["mode"] if rows else "?"
nround = max((s["n"] for s in stats.values()), default=0)
print(f"## wingman-edge vs nginx vs HAProxy ({mode}, median of {nround} round(s))\n")
print("| scenario | proxy | req/s | p99 ms | proxy CPU µs/req | errors |")
print("|---|---|---|---|---|---|")
for sc in scen:
    for px in prox:
        s = stats.get((px, sc))
        if s is None:
            print(f"| {sc} | {px} | skipped (pre-check not 200, see checks.csv) | | | |")
            continue
        flag = " (contaminated)" if s["flagged"] else ""
        us = "–" if px == "direct" else f_us(s["us"])
        print(f"| {sc} | {px} | {f_rps(s['rps'])}{flag} | {f_ms(s['p99'])} | {us} | {s['errs']} |")

bases = [b for b in BASES if b in prox]
if EDGE in prox and bases:
    print("\nRatios edge/baseline (req/s: above 1 is better for the edge; p99 and CPU µs/req: below 1 is better):\n")
    head = ["scenario"]
    for what in ("req/s", "p99", "CPU µs/req"):
        head += [f"{what} edge/{b}" for b in bases]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for sc in scen:
        e = stats.get((EDGE, sc))
        cells = [sc]
        for key in ("rps", "p99", "us"):
            for b in bases:
                bs = stats.get((b, sc))
                cell = ratio(e and e[key], bs and bs[key])
                if (e and e["flagged"]) or (bs and bs["flagged"]):
                    cell += " *"
                cells.append(cell)
        print("| " + " | ".join(cells) + " |")
    if any(s["flagged"] for s in stats.values()):
        print("\n\\* one side of the ratio was measured while other processes used the CPU (contaminated).")

notes = []
for (px, sc), s in sorted(stats.items()):
    if s["errs"]:
        notes.append(f"{px} {sc}: {s['errs']} errors (non-2xx or socket errors); its numbers are not comparable.")
seen = sorted({c["origins_seen"] for c in checks if c["proxy"] == EDGE})
if seen:
    notes.append(f"Origins that answered the edge's pre-check requests (X-Origin): {', '.join(seen)}.")
if notes:
    print("\n" + "\n".join("- " + n for n in notes))
EOF
cat "$out/compare.md"
echo
echo "Full harness tables (CPU, RSS, contamination check): $out/summary.md"
echo "Raw wrk output and proxy logs: $out/raw/   edge config: $out/conf/wingman-edge.toml"
exit "$rc"
