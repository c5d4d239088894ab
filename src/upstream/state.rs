//! Runtime state of upstream servers and pools: what survives a reload.
//!
//! A [`Registry`] hands out one [`ServerState`] per (pool name, socket address) and
//! one [`PoolState`] per pool name. A snapshot built on reload asks the registry
//! again, so a server that stays keeps its health, streaks, ejection timer and
//! in-flight count; a server that leaves is forgotten once the last snapshot and
//! request holding it are gone (the registry keeps only weak references).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::Notify;

/// Milliseconds on a process-wide monotonic clock.
pub fn now_ms() -> u64 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    // +1 so that 0 can mean "never"
    epoch.elapsed().as_millis() as u64 + 1
}

/// What an operator set for a server through the admin actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum AdminState {
    /// Takes requests (`enable`).
    Active = 0,
    /// No new requests; those in flight finish; still health-checked (`drain`).
    Draining = 1,
    /// No new requests and no health checks (`disable`, for maintenance).
    Disabled = 2,
}

impl AdminState {
    /// The state an admin action (`enable`, `drain`, `disable`) sets.
    pub fn from_action(action: &str) -> Option<AdminState> {
        match action {
            "enable" => Some(AdminState::Active),
            "drain" => Some(AdminState::Draining),
            "disable" => Some(AdminState::Disabled),
            _ => None,
        }
    }
}

/// Live state of one server of one pool.
#[derive(Debug)]
pub struct ServerState {
    pub pool: String,
    pub addr: SocketAddr,
    /// Verdict of active health checks (true until a check says otherwise).
    healthy: AtomicBool,
    ok_streak: AtomicU32,
    fail_streak: AtomicU32,
    /// Consecutive passive failures (connect errors, 5xx).
    passive_failures: AtomicU32,
    /// `now_ms()` until which the server is ejected; 0 when not ejected.
    ejected_until: AtomicU64,
    /// When the next active check is due, in `now_ms()`.
    pub next_check_at: AtomicU64,
    pub check_running: AtomicBool,
    in_flight: AtomicU32,
    /// The operator's say ([`AdminState`] as a `u8`), set by the admin actions.
    admin: AtomicU8,
    /// Requests answered by this server (final attempts).
    pub requests: AtomicU64,
    /// Of those, 5xx answers and failed exchanges.
    pub errors: AtomicU64,
    /// Response time histogram, buckets of [`LATENCY_BOUNDS_MS`] plus +Inf.
    latency: [AtomicU64; LATENCY_BUCKETS],
}

/// Upper bounds (ms) of the per-server latency buckets shown on the status page.
pub const LATENCY_BOUNDS_MS: [u64; 13] =
    [1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000];
const LATENCY_BUCKETS: usize = LATENCY_BOUNDS_MS.len() + 1;

impl ServerState {
    fn new(pool: &str, addr: SocketAddr) -> Self {
        ServerState {
            pool: pool.to_owned(),
            addr,
            healthy: AtomicBool::new(true),
            ok_streak: AtomicU32::new(0),
            fail_streak: AtomicU32::new(0),
            passive_failures: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            next_check_at: AtomicU64::new(0),
            check_running: AtomicBool::new(false),
            in_flight: AtomicU32::new(0),
            admin: AtomicU8::new(AdminState::Active as u8),
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            latency: Default::default(),
        }
    }

    /// Records one finished request.
    pub fn record_request(&self, ok: bool, took: Duration) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if !ok {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        let ms = took.as_millis() as u64;
        let i = LATENCY_BOUNDS_MS
            .iter()
            .position(|&b| ms <= b)
            .unwrap_or(LATENCY_BOUNDS_MS.len());
        self.latency[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Cumulative count per latency bucket.
    pub fn latency_counts(&self) -> Vec<u64> {
        self.latency
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect()
    }

    /// What the operator set.
    pub fn admin(&self) -> AdminState {
        match self.admin.load(Ordering::Relaxed) {
            x if x == AdminState::Draining as u8 => AdminState::Draining,
            x if x == AdminState::Disabled as u8 => AdminState::Disabled,
            _ => AdminState::Active,
        }
    }

    pub fn set_admin(&self, state: AdminState) {
        self.admin.store(state as u8, Ordering::Relaxed);
    }

    /// Whether the operator lets the server take new requests.
    pub fn in_service(&self) -> bool {
        self.admin() == AdminState::Active
    }

    /// Whether active health checks probe the server (not while disabled).
    pub fn probed(&self) -> bool {
        self.admin() != AdminState::Disabled
    }

    /// For the status page: `enabled`, `draining`, `drained` (draining with nothing
    /// in flight) or `disabled`.
    pub fn admin_state(&self) -> &'static str {
        match self.admin() {
            AdminState::Active => "enabled",
            AdminState::Draining if self.in_flight() == 0 => "drained",
            AdminState::Draining => "draining",
            AdminState::Disabled => "disabled",
        }
    }

    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub fn ejected(&self) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        until != 0 && now_ms() < until
    }

    /// Healthy, not ejected and in service.
    pub fn available(&self) -> bool {
        self.healthy() && !self.ejected() && self.in_service()
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Records an active check's result; returns `Some(new_health)` when it changed.
    pub fn record_check(&self, passed: bool, rise: u32, fall: u32) -> Option<bool> {
        if passed {
            self.fail_streak.store(0, Ordering::Relaxed);
            let ok = self
                .ok_streak
                .fetch_add(1, Ordering::Relaxed)
                .saturating_add(1);
            if !self.healthy() && ok >= rise {
                self.healthy.store(true, Ordering::Relaxed);
                // a server that passes its checks again is no longer ejected either
                self.ejected_until.store(0, Ordering::Relaxed);
                return Some(true);
            }
        } else {
            self.ok_streak.store(0, Ordering::Relaxed);
            let fails = self
                .fail_streak
                .fetch_add(1, Ordering::Relaxed)
                .saturating_add(1);
            if self.healthy() && fails >= fall {
                self.healthy.store(false, Ordering::Relaxed);
                return Some(false);
            }
        }
        None
    }

    /// Counts a passive failure; true when the streak reached `threshold` (and
    /// starts over): the caller decides whether to eject ([`super::Pool::record_failure`]).
    pub(crate) fn count_failure(&self, threshold: u32) -> bool {
        if threshold == 0 {
            return false;
        }
        let n = self
            .passive_failures
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        if n >= threshold {
            self.passive_failures.store(0, Ordering::Relaxed);
            return true;
        }
        false
    }

    /// Ejects the server for `ejection`.
    pub(crate) fn eject(&self, ejection: Duration) {
        self.ejected_until
            .store(now_ms() + ejection.as_millis() as u64, Ordering::Relaxed);
    }

    /// Records a successful exchange: the passive failure streak starts over.
    pub fn record_success(&self) {
        if self.passive_failures.load(Ordering::Relaxed) != 0 {
            self.passive_failures.store(0, Ordering::Relaxed);
        }
    }
}

/// Live state of one pool: its wait queue.
#[derive(Debug, Default)]
pub struct PoolState {
    queued: AtomicUsize,
    /// Held while deciding an ejection, so two servers failing at once cannot both
    /// be ejected as "not the last one".
    pub(crate) ejecting: Mutex<()>,
    /// Woken whenever a lease of this pool ends while requests are queued.
    pub(crate) slot_freed: Notify,
}

impl PoolState {
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// Takes a place in the queue if fewer than `limit` requests wait.
    pub(crate) fn try_enqueue(self: &Arc<Self>, limit: usize) -> Option<QueueTicket> {
        let mut cur = self.queued.load(Ordering::Relaxed);
        loop {
            if cur >= limit {
                return None;
            }
            match self.queued.compare_exchange_weak(
                cur,
                cur + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(QueueTicket(self.clone())),
                Err(now) => cur = now,
            }
        }
    }
}

/// A place in a pool's queue, given back on drop.
pub(crate) struct QueueTicket(Arc<PoolState>);

impl Drop for QueueTicket {
    fn drop(&mut self) {
        self.0.queued.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One request's claim on a server: counts toward its in-flight number until dropped.
#[derive(Debug)]
pub struct Lease {
    pub server: Arc<ServerState>,
    /// Index of the server in its pool's snapshot.
    pub index: usize,
    /// Chosen in panic mode (among every server, available or not).
    pub panic: bool,
    pool: Arc<PoolState>,
}

impl Lease {
    /// Claims a slot if the server has fewer than `max_conns` in flight (0: no limit).
    pub(crate) fn try_acquire(
        server: &Arc<ServerState>,
        index: usize,
        pool: &Arc<PoolState>,
        max_conns: u32,
    ) -> Option<Lease> {
        let mut cur = server.in_flight.load(Ordering::Relaxed);
        loop {
            if max_conns != 0 && cur >= max_conns {
                return None;
            }
            match server.in_flight.compare_exchange_weak(
                cur,
                cur + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    return Some(Lease {
                        server: server.clone(),
                        index,
                        panic: false,
                        pool: pool.clone(),
                    })
                }
                Err(now) => cur = now,
            }
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.server.in_flight.fetch_sub(1, Ordering::AcqRel);
        if self.pool.queued() > 0 {
            self.pool.slot_freed.notify_waiters();
        }
    }
}

/// Hands out long-lived state by stable key.
/// (route, rate bits, burst, max keys).
type LimiterKey = (String, u64, u32, usize);

#[derive(Default)]
pub struct Registry {
    servers: Mutex<HashMap<(String, SocketAddr), Weak<ServerState>>>,
    pools: Mutex<HashMap<String, Weak<PoolState>>>,
    /// Rate limiters by (route, settings): a reload that keeps a route's limit keeps
    /// its buckets.
    limiters: Mutex<HashMap<LimiterKey, Weak<crate::ratelimit::RateLimiter>>>,
    /// What buffered bodies hold now, against the budgets of each snapshot.
    pub buffers: Arc<crate::buffer::BudgetUse>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

impl Registry {
    pub fn new() -> Arc<Self> {
        Arc::new(Registry::default())
    }

    /// The state of `addr` in `pool`: the existing one if any snapshot or request still
    /// holds it, a fresh (healthy, not ejected) one otherwise.
    pub fn server(&self, pool: &str, addr: SocketAddr) -> Arc<ServerState> {
        let mut map = self.servers.lock();
        let key = (pool.to_owned(), addr);
        if let Some(s) = map.get(&key).and_then(Weak::upgrade) {
            return s;
        }
        let s = Arc::new(ServerState::new(pool, addr));
        map.insert(key, Arc::downgrade(&s));
        map.retain(|_, w| w.strong_count() > 0);
        s
    }

    pub fn pool(&self, name: &str) -> Arc<PoolState> {
        let mut map = self.pools.lock();
        if let Some(p) = map.get(name).and_then(Weak::upgrade) {
            return p;
        }
        let p = Arc::new(PoolState::default());
        map.insert(name.to_owned(), Arc::downgrade(&p));
        map.retain(|_, w| w.strong_count() > 0);
        p
    }

    /// The rate limiter of a route with these settings: the existing one while any
    /// snapshot holds it, a new (empty) one otherwise.
    pub fn limiter(
        &self,
        route: &str,
        rate: f64,
        burst: u32,
        max_keys: usize,
    ) -> Result<Arc<crate::ratelimit::RateLimiter>, crate::ratelimit::LimitConfigError> {
        let mut map = self.limiters.lock();
        let key = (route.to_owned(), rate.to_bits(), burst, max_keys);
        if let Some(l) = map.get(&key).and_then(Weak::upgrade) {
            return Ok(l);
        }
        let l = Arc::new(crate::ratelimit::RateLimiter::new(rate, burst, max_keys)?);
        map.insert(key, Arc::downgrade(&l));
        map.retain(|_, w| w.strong_count() > 0);
        Ok(l)
    }

    /// Number of servers whose state is still alive (for tests and /status).
    pub fn live_servers(&self) -> usize {
        self.servers
            .lock()
            .values()
            .filter(|w| w.strong_count() > 0)
            .count()
    }
}
