//! Micro-benchmarks of the per-request decisions: route matching
//! ([`wingman_edge::route::Router::find`]), the server selectors
//! ([`wingman_edge::upstream::select`]) and the whole [`Pool::acquire`] path
//! (selection plus the in-flight lease).
//!
//! Run: `cargo bench --bench routing` (add `-- --warm-up-time 1 --measurement-time 2`
//! for a short run, or a filter such as `-- select/` to run one group).

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use futures_util::FutureExt;

use wingman_edge::config::{Algorithm, HashOn};
use wingman_edge::route::Router;
use wingman_edge::upstream::select::{HashRing, LeastConn, SmoothWrr};
use wingman_edge::upstream::{Pool, PoolServer, Registry, Timeouts};

/// Server counts every selector is measured with.
const SIZES: [usize; 2] = [4, 32];

/// A realistic table of 50 routes: a few exact hosts with several prefixes each, two
/// wildcard levels, and host-less routes, with no catch-all `/` for any host (so that
/// a miss is possible).
fn route_table() -> Vec<(Option<&'static str>, &'static str)> {
    let mut t: Vec<(Option<&'static str>, &'static str)> = Vec::new();
    // chat.example.com: 12 routes
    for p in [
        "/",
        "/v1/",
        "/v1/chat/",
        "/v1/chat/completions",
        "/v1/conversations/",
        "/v1/conversations/search",
        "/v1/models",
        "/v1/files/",
        "/v1/users/",
        "/ws",
        "/ws/v2",
        "/static/",
    ] {
        t.push((Some("chat.example.com"), p));
    }
    // api.example.com: 10 routes
    for p in [
        "/v1/",
        "/v2/",
        "/v2/stream/",
        "/v2/batch/",
        "/internal/",
        "/oauth/",
        "/oauth/token",
        "/webhooks/",
        "/admin/",
        "/docs",
    ] {
        t.push((Some("api.example.com"), p));
    }
    // static.example.com: 4 routes
    for p in ["/img/", "/css/", "/js/", "/fonts/"] {
        t.push((Some("static.example.com"), p));
    }
    // *.example.com: 6 routes
    for p in ["/", "/v1/", "/v1/chat/", "/ws", "/assets/", "/healthz"] {
        t.push((Some("*.example.com"), p));
    }
    // *.eu.example.com: 5 routes
    for p in ["/", "/v1/", "/v1/chat/", "/ws", "/gdpr/"] {
        t.push((Some("*.eu.example.com"), p));
    }
    // *.tenants.example.net: 3 routes
    for p in ["/", "/v1/", "/ws"] {
        t.push((Some("*.tenants.example.net"), p));
    }
    // any host: 10 routes, deliberately without "/"
    for p in [
        "/api/",
        "/api/v1/",
        "/api/v1/chat/",
        "/api/v2/",
        "/healthz",
        "/metrics",
        "/.well-known/",
        "/ws",
        "/login",
        "/logout",
    ] {
        t.push((None, p));
    }
    assert_eq!(t.len(), 50);
    t
}

fn bench_router(c: &mut Criterion) {
    let table = route_table();
    let router = Router::new(table.iter().copied());
    // (name, host, path, expected route)
    let cases: [(&str, Option<&str>, &str, Option<usize>); 7] = [
        (
            "exact_host",
            Some("chat.example.com"),
            "/v1/conversations/8f14e45f/messages",
            Some(4),
        ),
        (
            "exact_host_port_mixed_case",
            Some("Chat.Example.COM:443"),
            "/v1/chat/completions",
            Some(3),
        ),
        (
            "wildcard",
            Some("acme.eu.example.com"),
            "/v1/chat/threads/42",
            Some(34),
        ),
        (
            "exact_host_falls_back_to_wildcard",
            Some("static.example.com"),
            "/v1/chat/threads/42",
            Some(28),
        ),
        (
            "fallback_any_host",
            Some("partner.example.org"),
            "/api/v1/chat/stream",
            Some(42),
        ),
        ("no_host", None, "/healthz", Some(44)),
        ("miss", Some("partner.example.org"), "/nothing/here", None),
    ];
    let mut g = c.benchmark_group("router/50_routes");
    for (name, host, path, want) in cases {
        assert_eq!(router.find(host, path), want, "route table changed: {name}");
        g.bench_function(name, |b| {
            b.iter(|| router.find(black_box(host), black_box(path)))
        });
    }
    g.finish();
}

fn labels(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("10.0.{}.{}:8000", i / 200, i % 200 + 1))
        .collect()
}

/// Weights 1..=3, so the weighted paths are exercised.
fn weights(n: usize) -> Vec<u32> {
    (0..n).map(|i| (i % 3) as u32 + 1).collect()
}

/// Client keys to hash, cycled through so one key's ring position is not all we see.
fn keys() -> Vec<Vec<u8>> {
    (0..1024)
        .map(|i| format!("198.51.{}.{}", i / 256, i % 256).into_bytes())
        .collect()
}

fn bench_select(c: &mut Criterion) {
    let mut g = c.benchmark_group("select");
    for n in SIZES {
        let w = weights(n);

        let wrr = SmoothWrr::new(n);
        g.bench_with_input(BenchmarkId::new("smooth_wrr", n), &w, |b, w| {
            b.iter(|| wrr.pick(black_box(w), |_| true))
        });
        // one server in four down: the selector has to skip them
        g.bench_with_input(
            BenchmarkId::new("smooth_wrr_quarter_down", n),
            &w,
            |b, w| b.iter(|| wrr.pick(black_box(w), |i| i % 4 != 3)),
        );

        let lc = LeastConn::default();
        let in_flight: Vec<u32> = (0..n as u32).map(|i| (i * 7) % 11).collect();
        g.bench_with_input(BenchmarkId::new("least_conn", n), &w, |b, w| {
            b.iter(|| lc.pick(black_box(w), |i| in_flight[i], |_| true))
        });

        let ring = HashRing::new(&labels(n), &w);
        let ks = keys();
        let mut k = 0usize;
        g.bench_with_input(BenchmarkId::new("hash_ring", n), &w, |b, _| {
            b.iter(|| {
                k = (k + 1) % ks.len();
                ring.pick(black_box(&ks[k]), |_| true)
            })
        });
    }
    g.finish();
}

/// A pool built the way a snapshot builds one (see the tests in src/upstream/mod.rs).
fn pool(algorithm: Algorithm, n: usize, max_conns: u32) -> Pool {
    let reg = Registry::new();
    let servers = labels(n)
        .into_iter()
        .zip(weights(n))
        .map(|(label, weight)| {
            let addr: SocketAddr = label.parse().unwrap();
            PoolServer {
                label,
                addr,
                weight,
                max_conns,
                state: reg.server("bench", addr),
            }
        })
        .collect();
    let t = Duration::from_secs(1);
    Pool::new(
        "bench".into(),
        algorithm,
        HashOn::ClientIp,
        servers,
        2,
        256,
        Duration::from_secs(2),
        Timeouts {
            connect: t,
            read: t,
            write: t,
            idle: t,
        },
        None,
        5,
        Duration::from_secs(10),
        reg.pool("bench"),
    )
}

fn bench_pool_acquire(c: &mut Criterion) {
    // acquire() completes without awaiting while a server has room, so polling it once
    // (now_or_never) measures the selection and lease, not an executor.
    let mut g = c.benchmark_group("pool_acquire");
    let ks = keys();
    for n in SIZES {
        for (name, algorithm) in [
            ("round_robin", Algorithm::RoundRobin),
            ("least_conn", Algorithm::LeastConn),
            ("hash", Algorithm::Hash),
        ] {
            let p = pool(algorithm, n, 0);
            let mut k = 0usize;
            g.bench_function(BenchmarkId::new(name, n), |b| {
                b.iter(|| {
                    k = (k + 1) % ks.len();
                    let lease = p
                        .acquire(black_box(&ks[k]), &[])
                        .now_or_never()
                        .expect("a free server never waits")
                        .expect("a server is available");
                    black_box(lease.index)
                    // the lease drops here: in-flight goes back to 0
                })
            });
        }
        // a retry: the first server tried is excluded, and max_conns is checked
        let p = pool(Algorithm::RoundRobin, n, 1000);
        g.bench_function(BenchmarkId::new("round_robin_retry_max_conns", n), |b| {
            b.iter(|| {
                let lease = p
                    .acquire(b"", black_box(&[0]))
                    .now_or_never()
                    .expect("a free server never waits")
                    .expect("a server is available");
                black_box(lease.index)
            })
        });
    }
    g.finish();

    // the same acquire driven by a tokio current-thread runtime, as in the proxy
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let p = pool(Algorithm::RoundRobin, 4, 0);
    c.bench_function("pool_acquire_block_on/round_robin/4", |b| {
        b.iter(|| {
            let lease = rt
                .block_on(p.acquire(black_box(b""), &[]))
                .expect("a server is available");
            black_box(lease.index)
        })
    });
}

criterion_group!(benches, bench_router, bench_select, bench_pool_acquire);
criterion_main!(benches);
