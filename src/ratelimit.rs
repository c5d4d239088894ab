//! Per-client limits: request rate ([`RateLimiter`], like nginx `limit_req` and
//! HAProxy stick tables), concurrent connections ([`ConnLimiter`], like nginx
//! `limit_conn`), and finding the client behind trusted proxies ([`client_ip`],
//! like nginx `real_ip_header X-Forwarded-For` with `real_ip_recursive on`), and
//! the allocation-free key of a client address ([`IpKey`]).
//!
//! This module owns the limiter state and its memory bound; the caller owns the
//! policy: it extracts the key (client IP, a header or cookie value), picks the
//! limiter of the route, and answers 429 / 503 with the [`Decision`].
//!
//! # Rate limiting
//!
//! Each key has a token bucket of `1 + burst` tokens refilled at `rate` tokens per
//! second, which is exactly nginx `limit_req rate=R burst=B nodelay`: up to
//! `1 + burst` requests back to back, then one every `1 / rate` seconds. It is
//! stored as one timestamp per key (GCRA, the "virtual scheduling" form of the
//! token bucket), so a check is a hash, a short lock and a comparison.
//!
//! Memory is bounded: the table is split into shards by a keyed hash of the key
//! (so concurrent requests rarely contend), and each shard is an LRU of fixed size,
//! so at most `max_keys` keys are tracked however many clients an attacker brings.
//! A key is stored as a fixed-size digest, never as the bytes the client sent (a
//! header or cookie value can be tens of KiB): 128 bits from two SipHash-1-3
//! hashers with independent random per-process keys (std's `RandomState`). Two keys
//! share a bucket only if both digests collide, which nobody can aim for without the
//! process's secret keys, and which happens by chance with a probability around
//! `max_keys² / 2¹²⁹`.
//! A key that is evicted, or never seen, starts with a full bucket: eviction can
//! only ever let a client through, never deny one. The price is that an attacker
//! who cycles through more than `max_keys` keys between two requests of an abusive
//! key resets that key's bucket; size `max_keys` well above the number of clients
//! active within `burst / rate` seconds.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lru::LruCache;
use parking_lot::Mutex;

/// A network of trusted proxies, as returned by [`parse_trusted`].
pub use ipnet::IpNet;

/// Most shards a table is split into; more would not reduce contention on the
/// machines the edge runs on, and would cost memory for tiny tables.
const MAX_SHARDS: usize = 64;

/// Most keys a limiter may be asked to remember (`routes[].rate_limit.max_keys`):
/// about 100 bytes per key when full.
pub const MAX_KEYS: usize = 10_000_000;

/// A limiter was given settings it cannot work with.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LimitConfigError {
    #[error("rate must be a finite number of requests per second above 0, got {0}")]
    Rate(f64),
    #[error("max_keys must be 1 to {}", MAX_KEYS)]
    MaxKeys,
    #[error("the connection limit per client must be at least 1")]
    MaxConns,
}

/// The answer of [`RateLimiter::check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Serve the request; it used one token.
    Allow,
    /// Answer 429: the bucket is empty. Nothing was used.
    Deny {
        /// Time until one token is available again.
        retry_after: Duration,
    },
}

impl Decision {
    /// True for [`Decision::Allow`].
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allow)
    }

    /// The `Retry-After` header value for a denial: `retry_after` rounded up to whole
    /// seconds, at least 1. `None` for [`Decision::Allow`].
    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            Decision::Allow => None,
            Decision::Deny { retry_after } => {
                let whole = retry_after.as_secs();
                let up = if retry_after.subsec_nanos() > 0 {
                    whole.saturating_add(1)
                } else {
                    whole
                };
                Some(up.max(1))
            }
        }
    }
}

/// One LRU shard: key digest -> theoretical arrival time (ns since the limiter's
/// epoch).
type Shard = LruCache<u128, u64, RandomState>;

/// Token buckets keyed by arbitrary bytes, with a fixed bound on the number of keys.
///
/// Shared by all request threads (`&self` everywhere); wrap it in an `Arc`.
pub struct RateLimiter {
    shards: Box<[Mutex<Shard>]>,
    /// The two halves of a key's digest; the first also picks the shard. Seeded
    /// independently of the shards' own hashers, so the keys of one shard are not
    /// clustered inside its table.
    digest: (RandomState, RandomState),
    /// Time one token takes to refill (1 / rate), in ns, at least 1.
    interval_ns: u64,
    /// How far ahead of now a key's next arrival time may be: `burst * interval`.
    tolerance_ns: u64,
    epoch: Instant,
    /// Keys one shard holds at most.
    per_shard: usize,
    capacity: usize,
    rate: f64,
    burst: u32,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("rate", &self.rate)
            .field("burst", &self.burst)
            .field("capacity", &self.capacity)
            .field("shards", &self.shards.len())
            .finish()
    }
}

impl RateLimiter {
    /// A limiter allowing `rate` requests per second per key with `burst` extra
    /// requests back to back, tracking at most `max_keys` keys.
    ///
    /// The bound is split evenly over the shards (rounded down), so
    /// [`capacity`](Self::capacity) may be slightly below `max_keys`, never above.
    pub fn new(rate: f64, burst: u32, max_keys: usize) -> Result<Self, LimitConfigError> {
        if !(rate.is_finite() && rate > 0.0) {
            return Err(LimitConfigError::Rate(rate));
        }
        if max_keys == 0 || max_keys > MAX_KEYS {
            return Err(LimitConfigError::MaxKeys);
        }
        // Power-of-two shard count, no more shards than keys.
        let shard_count = if max_keys >= MAX_SHARDS {
            MAX_SHARDS
        } else {
            1 << (usize::BITS - 1 - max_keys.leading_zeros())
        };
        let per_shard = max_keys / shard_count;
        if per_shard == 0 {
            return Err(LimitConfigError::MaxKeys);
        }
        // Unbounded tables held to `per_shard` by `check`: a table grows with the keys
        // actually seen instead of being allocated for `max_keys` up front.
        let shards = (0..shard_count)
            .map(|_| Mutex::new(LruCache::unbounded_with_hasher(RandomState::new())))
            .collect();
        // Float to integer casts saturate, so extreme rates stay well defined.
        let interval_ns = ((1e9 / rate).round() as u64).max(1);
        let tolerance_ns = interval_ns.saturating_mul(u64::from(burst));
        Ok(RateLimiter {
            shards,
            digest: (RandomState::new(), RandomState::new()),
            interval_ns,
            tolerance_ns,
            epoch: Instant::now(),
            per_shard,
            capacity: per_shard * shard_count,
            rate,
            burst,
        })
    }

    /// Takes one token from `key`'s bucket at time `now`, or says how long until
    /// one is available. A denied request takes nothing.
    ///
    /// `now` is a parameter so that callers can pass the time they already read for
    /// the request, and tests can simulate time. Times before the limiter was created
    /// count as its creation time.
    pub fn check(&self, key: &[u8], now: Instant) -> Decision {
        let now_ns =
            u64::try_from(now.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX);
        let (shard, digest) = self.locate(key);
        let mut table = self.shards[shard].lock();
        match table.get_mut(&digest) {
            Some(tat) => {
                let next = (*tat).max(now_ns);
                let ahead = next - now_ns;
                if ahead > self.tolerance_ns {
                    Decision::Deny {
                        retry_after: Duration::from_nanos(ahead - self.tolerance_ns),
                    }
                } else {
                    *tat = next.saturating_add(self.interval_ns);
                    Decision::Allow
                }
            }
            None => {
                // A new key has a full bucket; this request takes its first token.
                // A full shard forgets its least recently used key first.
                if table.len() >= self.per_shard {
                    table.pop_lru();
                }
                table.push(digest, now_ns.saturating_add(self.interval_ns));
                Decision::Allow
            }
        }
    }

    /// Keys tracked now (takes every shard's lock: for tests and status pages).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }

    /// True when no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The most keys this limiter tracks at once (at most the `max_keys` it was
    /// created with).
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Requests per second per key.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// Requests allowed back to back beyond the first.
    pub fn burst(&self) -> u32 {
        self.burst
    }

    /// The shard of `key` and the digest it is stored under.
    fn locate(&self, key: &[u8]) -> (usize, u128) {
        let hi = self.digest.0.hash_one(key);
        let lo = self.digest.1.hash_one(key);
        // The shard count is a power of two.
        let shard = (hi as usize) & (self.shards.len() - 1);
        (shard, (u128::from(hi) << 64) | u128::from(lo))
    }
}

/// Counts open connections per client IP and refuses the ones above a cap.
///
/// Cheap to clone (shared state). Only IPs with at least one open connection are
/// stored, so memory is proportional to open connections, which the listener's own
/// connection limit and the process's file descriptor limit already bound.
#[derive(Clone)]
pub struct ConnLimiter {
    inner: Arc<ConnInner>,
}

struct ConnInner {
    max: u32,
    shards: Box<[Mutex<HashMap<IpAddr, u32>>]>,
    shard_hasher: RandomState,
}

impl ConnInner {
    fn shard(&self, ip: &IpAddr) -> &Mutex<HashMap<IpAddr, u32>> {
        &self.shards[(self.shard_hasher.hash_one(ip) as usize) & (self.shards.len() - 1)]
    }
}

impl std::fmt::Debug for ConnLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnLimiter")
            .field("max", &self.inner.max)
            .finish()
    }
}

impl ConnLimiter {
    /// A limiter allowing at most `max` open connections per client IP.
    pub fn new(max: u32) -> Result<Self, LimitConfigError> {
        if max == 0 {
            return Err(LimitConfigError::MaxConns);
        }
        Ok(ConnLimiter {
            inner: Arc::new(ConnInner {
                max,
                shards: (0..MAX_SHARDS)
                    .map(|_| Mutex::new(HashMap::new()))
                    .collect(),
                shard_hasher: RandomState::new(),
            }),
        })
    }

    /// Counts one more open connection of `ip`, or `None` when `ip` already has the
    /// maximum open. The connection counts until the guard is dropped.
    ///
    /// IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`, as seen on a dual-stack
    /// listener) count as their IPv4 address.
    pub fn acquire(&self, ip: IpAddr) -> Option<ConnGuard> {
        let ip = ip.to_canonical();
        let mut table = self.inner.shard(&ip).lock();
        let open = table.entry(ip).or_insert(0);
        if *open >= self.inner.max {
            return None;
        }
        *open += 1;
        Some(ConnGuard {
            inner: Arc::clone(&self.inner),
            ip,
        })
    }

    /// Connections of `ip` open now.
    pub fn open(&self, ip: IpAddr) -> u32 {
        let ip = ip.to_canonical();
        self.inner.shard(&ip).lock().get(&ip).copied().unwrap_or(0)
    }

    /// IPs with at least one open connection (takes every shard's lock).
    pub fn tracked_ips(&self) -> usize {
        self.inner.shards.iter().map(|s| s.lock().len()).sum()
    }

    /// The cap per IP.
    pub fn max(&self) -> u32 {
        self.inner.max
    }
}

/// One open connection counted by a [`ConnLimiter`]; dropping it releases the slot.
pub struct ConnGuard {
    inner: Arc<ConnInner>,
    ip: IpAddr,
}

impl ConnGuard {
    /// The (canonical) client IP this guard counts for.
    pub fn ip(&self) -> IpAddr {
        self.ip
    }
}

impl std::fmt::Debug for ConnGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnGuard").field("ip", &self.ip).finish()
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let mut table = self.inner.shard(&self.ip).lock();
        if let Some(open) = table.get_mut(&self.ip) {
            *open = open.saturating_sub(1);
            if *open == 0 {
                table.remove(&self.ip);
            }
        }
    }
}

/// The rate limit key of a client IP, without allocating: the 4 bytes of an IPv4
/// address, or the 16 bytes of an IPv6 address with the bits after `ipv6_prefix`
/// cleared.
///
/// A single IPv6 host usually controls a whole /64 (or more), so keying on the full
/// address would give it 2^64 buckets; `ipv6_prefix = 64` counts a /64 as one
/// client (use 128 for exact addresses). IPv4-mapped IPv6 addresses key as IPv4.
/// IPv4 and IPv6 keys differ in length, so they never collide.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpKey {
    bytes: [u8; 16],
    len: u8,
}

impl IpKey {
    /// The key of `ip`; `ipv6_prefix` above 128 counts as 128.
    pub fn new(ip: IpAddr, ipv6_prefix: u8) -> Self {
        let mut bytes = [0u8; 16];
        match ip.to_canonical() {
            IpAddr::V4(v4) => {
                bytes[..4].copy_from_slice(&v4.octets());
                IpKey { bytes, len: 4 }
            }
            IpAddr::V6(v6) => {
                let prefix = u32::from(ipv6_prefix.min(128));
                let mask = u128::MAX.checked_shl(128 - prefix).unwrap_or(0);
                bytes = (u128::from(v6) & mask).to_be_bytes();
                IpKey { bytes, len: 16 }
            }
        }
    }

    /// The bytes to pass to [`RateLimiter::check`].
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

/// A trusted proxy network could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid trusted proxy network {input:?}: expected an IP address or a CIDR block \
     such as 10.0.0.0/8 or 2001:db8::/32"
)]
pub struct CidrError {
    /// The text as given.
    pub input: String,
}

/// Parses one trusted proxy network: a CIDR block (`10.0.0.0/8`, `2001:db8::/32`) or a
/// single address (`127.0.0.1`, taken as `/32` or `/128`), like nginx
/// `set_real_ip_from`. Host bits below the prefix are ignored (`10.1.2.3/8` is
/// `10.0.0.0/8`).
pub fn parse_trusted(input: &str) -> Result<IpNet, CidrError> {
    let s = input.trim();
    let err = || CidrError {
        input: input.to_owned(),
    };
    if s.contains('/') {
        IpNet::from_str(s).map(|n| n.trunc()).map_err(|_| err())
    } else {
        IpAddr::from_str(s).map(IpNet::from).map_err(|_| err())
    }
}

/// Parses a list of trusted proxy networks with [`parse_trusted`]; the error names
/// the first entry that is not one.
pub fn parse_trusted_list<S: AsRef<str>>(inputs: &[S]) -> Result<Vec<IpNet>, CidrError> {
    inputs.iter().map(|s| parse_trusted(s.as_ref())).collect()
}

fn is_trusted(ip: IpAddr, trusted: &[IpNet]) -> bool {
    trusted.iter().any(|net| net.contains(&ip))
}

/// One X-Forwarded-For element: an address, optionally with a port (`1.2.3.4:80`,
/// `[2001:db8::1]:80`) or in brackets (`[2001:db8::1]`).
fn parse_forwarded_addr(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = IpAddr::from_str(s) {
        return Some(ip);
    }
    if let Ok(sa) = SocketAddr::from_str(s) {
        return Some(sa.ip());
    }
    s.strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .and_then(|r| IpAddr::from_str(r).ok())
}

/// The address of the client behind trusted proxies.
///
/// If `peer` (the TCP peer) is not in `trusted`, it is the client and `xff` is
/// ignored: anyone can send an X-Forwarded-For header. If it is trusted, the
/// X-Forwarded-For elements are walked from the right (each was appended by the
/// proxy to its right), skipping trusted addresses, and the first untrusted one is
/// the client. If all are trusted, the leftmost is. An element that is not an
/// address (`unknown`, an obfuscated identifier, garbage) stops the walk: the
/// nearest address known so far is returned, since nothing to its left can be
/// attributed to a trusted proxy.
///
/// Several X-Forwarded-For header lines must be joined with `,` first, in order.
/// IPv4-mapped IPv6 addresses are returned (and matched) as IPv4.
pub fn client_ip(peer: IpAddr, xff: Option<&str>, trusted: &[IpNet]) -> IpAddr {
    let peer = peer.to_canonical();
    if !is_trusted(peer, trusted) {
        return peer;
    }
    let Some(xff) = xff else {
        return peer;
    };
    let mut nearest = peer;
    for element in xff.rsplit(',') {
        let Some(ip) = parse_forwarded_addr(element.trim()) else {
            return nearest;
        };
        let ip = ip.to_canonical();
        if !is_trusted(ip, trusted) {
            return ip;
        }
        nearest = ip;
    }
    nearest
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn burst_beyond_one_plus_burst_is_denied_while_other_keys_are_unaffected() {
        let rl = RateLimiter::new(10.0, 5, 1000).expect("valid");
        let t0 = Instant::now();
        for i in 0..6 {
            assert_eq!(rl.check(b"1.2.3.4", t0), Decision::Allow, "request {i}");
        }
        match rl.check(b"1.2.3.4", t0) {
            Decision::Deny { retry_after } => {
                // one token refills in 1 / 10 s
                assert_eq!(retry_after, Duration::from_millis(100));
            }
            Decision::Allow => panic!("7th request at the same instant must be denied"),
        }
        assert_eq!(rl.check(b"5.6.7.8", t0), Decision::Allow);
        assert_eq!(rl.check(b"", t0), Decision::Allow);
    }

    #[test]
    fn retry_after_header_rounds_up_to_whole_seconds_at_least_one() {
        let d = |ms| Decision::Deny {
            retry_after: Duration::from_millis(ms),
        };
        assert_eq!(d(1).retry_after_secs(), Some(1));
        assert_eq!(d(0).retry_after_secs(), Some(1));
        assert_eq!(d(1000).retry_after_secs(), Some(1));
        assert_eq!(d(1001).retry_after_secs(), Some(2));
        assert_eq!(d(59_500).retry_after_secs(), Some(60));
        assert_eq!(Decision::Allow.retry_after_secs(), None);
    }

    #[test]
    fn slow_rate_denial_reports_seconds_until_next_token() {
        // 30 per minute, no burst
        let rl = RateLimiter::new(0.5, 0, 100).expect("valid");
        let t0 = Instant::now();
        assert!(rl.check(b"k", t0).is_allowed());
        let d = rl.check(b"k", t0 + Duration::from_millis(500));
        assert_eq!(
            d,
            Decision::Deny {
                retry_after: Duration::from_millis(1500)
            }
        );
        assert_eq!(d.retry_after_secs(), Some(2));
    }

    #[test]
    fn tokens_refill_over_simulated_time() {
        let rl = RateLimiter::new(2.0, 1, 100).expect("valid");
        let t0 = Instant::now();
        assert!(rl.check(b"k", t0).is_allowed());
        assert!(rl.check(b"k", t0).is_allowed());
        assert!(!rl.check(b"k", t0).is_allowed());
        // one token after 500 ms, not before
        assert!(!rl.check(b"k", t0 + Duration::from_millis(499)).is_allowed());
        assert!(rl.check(b"k", t0 + Duration::from_millis(500)).is_allowed());
        assert!(!rl.check(b"k", t0 + Duration::from_millis(500)).is_allowed());
        // a long pause refills to the full 1 + burst, no more
        let later = t0 + Duration::from_secs(60);
        assert!(rl.check(b"k", later).is_allowed());
        assert!(rl.check(b"k", later).is_allowed());
        assert!(!rl.check(b"k", later).is_allowed());
    }

    #[test]
    fn denied_requests_take_no_tokens() {
        let rl = RateLimiter::new(1.0, 0, 100).expect("valid");
        let t0 = Instant::now();
        assert!(rl.check(b"k", t0).is_allowed());
        for ms in (0..1000).step_by(100) {
            assert!(!rl.check(b"k", t0 + Duration::from_millis(ms)).is_allowed());
        }
        // hammering while denied did not push the next token further away
        assert!(rl.check(b"k", t0 + Duration::from_secs(1)).is_allowed());
    }

    #[test]
    fn steady_rate_is_sustained_for_a_compliant_client() {
        let rl = RateLimiter::new(100.0, 0, 100).expect("valid");
        let t0 = Instant::now();
        for i in 0..1000u64 {
            let now = t0 + Duration::from_millis(10 * i);
            assert!(rl.check(b"k", now).is_allowed(), "request {i}");
        }
    }

    #[test]
    fn memory_stays_bounded_under_a_million_distinct_keys() {
        let max_keys = 10_000;
        let rl = RateLimiter::new(1.0, 10, max_keys).expect("valid");
        assert!(rl.capacity() <= max_keys && rl.capacity() > max_keys * 9 / 10);
        let t0 = Instant::now();
        for i in 0u32..1_000_000 {
            assert!(rl.check(&i.to_le_bytes(), t0).is_allowed());
            if i % 100_000 == 0 {
                assert!(rl.len() <= max_keys);
            }
        }
        assert!(rl.len() <= max_keys, "{} keys tracked", rl.len());
        assert!(rl.len() >= rl.capacity() * 9 / 10, "the table is used");
    }

    #[test]
    fn evicted_client_returns_with_a_full_bucket() {
        let rl = RateLimiter::new(1.0, 2, 64).expect("valid");
        let t0 = Instant::now();
        assert!(rl.check(b"returning", t0).is_allowed());
        // a flood of other keys pushes it out of every shard
        for i in 0u32..10_000 {
            rl.check(&i.to_le_bytes(), t0);
        }
        assert!(rl.len() <= 64);
        // back at the same instant: a full bucket (1 + burst), not a denial
        for i in 0..3 {
            assert!(rl.check(b"returning", t0).is_allowed(), "request {i}");
        }
        assert!(!rl.check(b"returning", t0).is_allowed());
    }

    #[test]
    fn active_client_is_kept_while_idle_keys_are_evicted() {
        // an LRU per shard keeps a key that keeps coming back
        let rl = RateLimiter::new(1.0, 0, 1).expect("valid"); // one shard of one key
        let t0 = Instant::now();
        assert!(rl.check(b"a", t0).is_allowed());
        assert!(!rl.check(b"a", t0).is_allowed());
        assert!(rl.check(b"b", t0).is_allowed()); // evicts a
        assert_eq!(rl.len(), 1);
        assert!(rl.check(b"a", t0).is_allowed(), "evicted key starts full");
    }

    #[test]
    fn concurrent_checks_on_one_key_never_exceed_the_burst() {
        let rl = Arc::new(RateLimiter::new(1.0, 99, 1000).expect("valid"));
        let t0 = Instant::now();
        let allowed: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    let rl = Arc::clone(&rl);
                    s.spawn(move || {
                        (0..100)
                            .filter(|_| rl.check(b"hot", t0).is_allowed())
                            .count()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("thread")).sum()
        });
        assert_eq!(allowed, 100);
    }

    #[test]
    fn invalid_limiter_settings_are_rejected() {
        assert_eq!(
            RateLimiter::new(0.0, 1, 10).err(),
            Some(LimitConfigError::Rate(0.0))
        );
        assert!(RateLimiter::new(f64::NAN, 1, 10).is_err());
        assert!(RateLimiter::new(-1.0, 1, 10).is_err());
        assert!(RateLimiter::new(f64::INFINITY, 1, 10).is_err());
        assert_eq!(
            RateLimiter::new(1.0, 1, 0).err(),
            Some(LimitConfigError::MaxKeys)
        );
        assert_eq!(ConnLimiter::new(0).err(), Some(LimitConfigError::MaxConns));
    }

    #[test]
    fn extreme_rates_and_bursts_do_not_overflow() {
        let t0 = Instant::now();
        let fast = RateLimiter::new(1e12, u32::MAX, 10).expect("valid");
        for _ in 0..1000 {
            assert!(fast.check(b"k", t0).is_allowed());
        }
        let slow = RateLimiter::new(1e-9, u32::MAX, 10).expect("valid");
        assert!(slow.check(b"k", t0).is_allowed());
        let slow0 = RateLimiter::new(1e-9, 0, 10).expect("valid");
        assert!(slow0.check(b"k", t0).is_allowed());
        assert!(!slow0
            .check(b"k", t0 + Duration::from_secs(3600))
            .is_allowed());
    }

    #[test]
    fn conn_limiter_caps_open_connections_and_releases_on_drop() {
        let cl = ConnLimiter::new(2).expect("valid");
        let a = ip("192.0.2.1");
        let g1 = cl.acquire(a).expect("first");
        let g2 = cl.acquire(a).expect("second");
        assert!(cl.acquire(a).is_none(), "third is over the cap");
        assert!(
            cl.acquire(ip("192.0.2.2")).is_some(),
            "other IPs unaffected"
        );
        assert_eq!(cl.open(a), 2);
        drop(g1);
        assert_eq!(cl.open(a), 1);
        let g3 = cl.acquire(a).expect("slot released");
        drop(g2);
        drop(g3);
        assert_eq!(cl.open(a), 0);
        assert_eq!(cl.tracked_ips(), 0, "IPs with nothing open are forgotten");
    }

    #[test]
    fn conn_limiter_counts_ipv4_mapped_ipv6_as_ipv4() {
        let cl = ConnLimiter::new(1).expect("valid");
        let _g = cl.acquire(ip("::ffff:192.0.2.7")).expect("first");
        assert!(cl.acquire(ip("192.0.2.7")).is_none());
    }

    #[test]
    fn conn_limiter_memory_is_bounded_by_open_connections() {
        let cl = ConnLimiter::new(1).expect("valid");
        for i in 0u32..100_000 {
            let g = cl.acquire(IpAddr::from(i.to_be_bytes()));
            assert!(g.is_some());
        }
        assert_eq!(cl.tracked_ips(), 0);
        let held: Vec<_> = (0u32..100)
            .filter_map(|i| cl.acquire(IpAddr::from(i.to_be_bytes())))
            .collect();
        assert_eq!(cl.tracked_ips(), 100);
        drop(held);
        assert_eq!(cl.tracked_ips(), 0);
    }

    #[test]
    fn client_ip_resolves_forwarded_chains() {
        let trusted =
            parse_trusted_list(&["10.0.0.0/8", "192.168.1.1", "2001:db8::/32"]).expect("valid");
        let lb = ip("10.1.2.3");
        // (peer, X-Forwarded-For, expected client)
        let cases: &[(&str, Option<&str>, &str)] = &[
            // untrusted peer: XFF is whatever the client wants, ignored
            ("203.0.113.9", Some("1.1.1.1"), "203.0.113.9"),
            ("203.0.113.9", None, "203.0.113.9"),
            // trusted peer without XFF: the peer
            ("10.1.2.3", None, "10.1.2.3"),
            // one hop
            ("10.1.2.3", Some("198.51.100.4"), "198.51.100.4"),
            // trusted hops skipped from the right; client-supplied junk on the left ignored
            (
                "10.1.2.3",
                Some("6.6.6.6, 198.51.100.4, 192.168.1.1, 10.9.9.9"),
                "198.51.100.4",
            ),
            // spacing and ports
            (
                "10.1.2.3",
                Some("198.51.100.4:5555 ,10.0.0.2"),
                "198.51.100.4",
            ),
            ("10.1.2.3", Some("[2001:db9::1]:443"), "2001:db9::1"),
            ("10.1.2.3", Some("[2001:db9::2]"), "2001:db9::2"),
            // all trusted: the leftmost
            ("10.1.2.3", Some("10.0.0.7, 10.0.0.8"), "10.0.0.7"),
            // garbage stops the walk at the nearest known address
            ("10.1.2.3", Some("unknown"), "10.1.2.3"),
            (
                "10.1.2.3",
                Some("198.51.100.4, unknown, 10.0.0.8"),
                "10.0.0.8",
            ),
            ("10.1.2.3", Some(""), "10.1.2.3"),
            ("10.1.2.3", Some("198.51.100.4,"), "10.1.2.3"),
            ("10.1.2.3", Some("1.2.3.4.5"), "10.1.2.3"),
            ("10.1.2.3", Some("<script>, 198.51.100.4"), "198.51.100.4"),
            // IPv6 peer in a trusted net; mapped addresses are canonical IPv4
            ("2001:db8::5", Some("::ffff:198.51.100.4"), "198.51.100.4"),
            ("::ffff:10.1.2.3", Some("198.51.100.4"), "198.51.100.4"),
            ("::ffff:203.0.113.9", Some("1.1.1.1"), "203.0.113.9"),
        ];
        for (peer, xff, want) in cases {
            assert_eq!(
                client_ip(ip(peer), *xff, &trusted),
                ip(want),
                "peer {peer}, XFF {xff:?}"
            );
        }
        assert_eq!(
            client_ip(lb, Some("198.51.100.4"), &[]),
            lb,
            "nothing trusted"
        );
    }

    #[test]
    fn ip_keys_group_an_ipv6_prefix_and_keep_ipv4_exact() {
        let k = |s: &str, p| IpKey::new(ip(s), p);
        assert_eq!(k("192.0.2.1", 64).as_bytes(), &[192, 0, 2, 1]);
        assert_ne!(k("192.0.2.1", 64), k("192.0.2.2", 64));
        assert_eq!(k("::ffff:192.0.2.1", 64), k("192.0.2.1", 64));
        assert_eq!(k("2001:db8:1:2::1", 64), k("2001:db8:1:2:ffff::9", 64));
        assert_ne!(k("2001:db8:1:2::1", 64), k("2001:db8:1:3::1", 64));
        assert_ne!(k("2001:db8:1:2::1", 128), k("2001:db8:1:2::2", 128));
        assert_eq!(k("2001:db8::1", 0), k("2001:db9::1", 0));
        assert_eq!(k("2001:db8::1", 200), k("2001:db8::1", 128));
        assert_eq!(k("2001:db8::1", 64).as_bytes().len(), 16);
        // one IPv6 /64 shares one bucket
        let rl = RateLimiter::new(1.0, 0, 100).expect("valid");
        let t0 = Instant::now();
        assert!(rl
            .check(k("2001:db8:0:1::a", 64).as_bytes(), t0)
            .is_allowed());
        assert!(!rl
            .check(k("2001:db8:0:1::b", 64).as_bytes(), t0)
            .is_allowed());
    }

    #[test]
    fn trusted_networks_parse_addresses_and_cidrs_with_clear_errors() {
        assert_eq!(
            parse_trusted("10.1.2.3/8").expect("cidr").to_string(),
            "10.0.0.0/8"
        );
        assert_eq!(
            parse_trusted(" 127.0.0.1 ").expect("addr").to_string(),
            "127.0.0.1/32"
        );
        assert_eq!(parse_trusted("::1").expect("v6").to_string(), "::1/128");
        for bad in ["10.0.0.0/33", "10.0.0/8", "example.com", "", "10.0.0.0/"] {
            let e = parse_trusted(bad).expect_err(bad);
            assert_eq!(e.input, bad);
            assert!(e.to_string().contains("CIDR"), "{e}");
        }
        let e = parse_trusted_list(&["10.0.0.0/8", "nope"]).expect_err("second is bad");
        assert_eq!(e.input, "nope");
    }
}
