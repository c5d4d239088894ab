//! Micro-benchmarks of the per-request rate limit check
//! ([`wingman_edge::ratelimit::RateLimiter::check`]) and the connection limiter.
//!
//! Run: `cargo bench --bench ratelimit` (add `-- --warm-up-time 1 --measurement-time 2`
//! for a short run).
//!
//! Cases, per call on one thread:
//! - `check/hot_key`: one client hammering (one key, found, bucket allowing).
//! - `check/hot_key_denied`: the same client once its bucket is empty (the 429 path).
//! - `check/10k_keys`: 10,000 clients round-robin in a table of 100,000 (all found).
//! - `check/churn_1m_keys`: a new key on every call into a full table of 100,000
//!   (insert + evict: the cost an attacker with many IPs imposes).
//! - `conn/acquire_release`: one `ConnLimiter::acquire` and drop of the guard.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};

use wingman_edge::ratelimit::{ConnLimiter, Decision, RateLimiter};

const MAX_KEYS: usize = 100_000;

fn ip_key(i: u32) -> [u8; 4] {
    // client IPs as the proxy would key them (4 bytes for IPv4)
    (0x0a00_0000 | i).to_be_bytes()
}

fn check(c: &mut Criterion) {
    let mut g = c.benchmark_group("check");

    // a rate so high the hot key is never denied, whatever the clock does
    let rl = RateLimiter::new(1e9, 1_000_000, MAX_KEYS).expect("valid limiter");
    let key = ip_key(1);
    let t0 = Instant::now();
    assert_eq!(rl.check(&key, t0), Decision::Allow);
    let mut n = 0u64;
    g.bench_function("hot_key", |b| {
        b.iter(|| {
            n += 1;
            black_box(rl.check(black_box(&key), t0 + Duration::from_nanos(n)))
        })
    });

    let strict = RateLimiter::new(1.0, 0, MAX_KEYS).expect("valid limiter");
    assert!(strict.check(&key, t0).is_allowed());
    assert!(!strict.check(&key, t0).is_allowed());
    g.bench_function("hot_key_denied", |b| {
        b.iter(|| black_box(strict.check(black_box(&key), t0)))
    });

    let many = RateLimiter::new(1e9, 1_000_000, MAX_KEYS).expect("valid limiter");
    let keys: Vec<[u8; 4]> = (0..10_000).map(ip_key).collect();
    for k in &keys {
        many.check(k, t0);
    }
    assert!(many.len() >= 9_000, "keys fit in the table");
    let mut i = 0usize;
    g.bench_function("10k_keys", |b| {
        b.iter(|| {
            i = (i + 1) % keys.len();
            black_box(many.check(black_box(&keys[i]), t0))
        })
    });

    let churn = RateLimiter::new(10.0, 20, MAX_KEYS).expect("valid limiter");
    for j in 0..MAX_KEYS as u32 {
        churn.check(&ip_key(j), t0);
    }
    let mut j = MAX_KEYS as u32;
    g.bench_function("churn_1m_keys", |b| {
        b.iter(|| {
            j = j.wrapping_add(1) % 1_000_000;
            black_box(churn.check(black_box(&ip_key(j)), t0))
        })
    });
    assert!(churn.len() <= MAX_KEYS);
    g.finish();
}

fn conn(c: &mut Criterion) {
    let cl = ConnLimiter::new(100).expect("valid limiter");
    let ip = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
    c.bench_function("conn/acquire_release", |b| {
        b.iter(|| black_box(cl.acquire(black_box(ip))))
    });
}

criterion_group!(benches, check, conn);
criterion_main!(benches);
