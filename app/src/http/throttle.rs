//! [`LoginThrottle`]: failed logins counted per user name and per client address in a
//! fixed window from the first failure, in two bounded moka caches (an entry lives for
//! the window, and each cache holds at most `auth.login_throttle_entries` keys).
//!
//! An attempt takes its name's slot before the password is checked, so guesses sent in
//! parallel for one name get no more checks than the limit; a success clears the name's
//! count, a failure keeps its slot. An address counts failures only (every client
//! behind a proxy shares one address, and its parallel logins must not be refused for
//! being in flight), so parallel guesses from one address can overshoot its limit by
//! the logins in flight at that moment.

use std::hash::Hash;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::AuthSettings;

struct Window {
    started: Instant,
    taken: AtomicU32,
}

impl Window {
    /// Takes a slot unless `limit` are taken.
    fn take(&self, limit: u32) -> bool {
        self.taken
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| (n < limit).then_some(n + 1))
            .is_ok()
    }
}

struct Counter<K> {
    windows: moka::future::Cache<K, Arc<Window>>,
    limit: u32,
    length: Duration,
}

impl<K: Hash + Eq + Send + Sync + Clone + 'static> Counter<K> {
    fn new(limit: u32, length: Duration, capacity: u64) -> Self {
        Self {
            windows: moka::future::Cache::builder()
                .max_capacity(capacity)
                .time_to_live(length)
                .build(),
            limit,
            length,
        }
    }

    async fn window(&self, key: K) -> Arc<Window> {
        self.windows
            .get_with(key, async {
                Arc::new(Window {
                    started: Instant::now(),
                    taken: AtomicU32::new(0),
                })
            })
            .await
    }

    fn wait(&self, window: &Window) -> Duration {
        self.length.saturating_sub(window.started.elapsed())
    }

    /// Takes a slot of the key's window, or says how long until the window ends.
    async fn take(&self, key: K) -> Result<(), Duration> {
        let window = self.window(key).await;
        if window.take(self.limit) {
            Ok(())
        } else {
            Err(self.wait(&window))
        }
    }

    /// How long until the key's window ends, when its slots are used up.
    async fn used_up(&self, key: &K) -> Option<Duration> {
        let window = self.windows.get(key).await?;
        (window.taken.load(Ordering::SeqCst) >= self.limit).then(|| self.wait(&window))
    }

    /// Counts one use (whether or not the limit is reached).
    async fn add(&self, key: K) {
        self.window(key).await.taken.fetch_add(1, Ordering::SeqCst);
    }
}

/// Whole seconds, rounded up, at least 1 (a `Retry-After` value).
fn retry_after(d: Duration) -> u64 {
    (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
}

/// Failed-login counters of one instance.
pub struct LoginThrottle {
    names: Counter<String>,
    addrs: Counter<IpAddr>,
}

/// One login attempt under way; see [`LoginThrottle::begin`].
pub struct Attempt {
    name: String,
    addr: IpAddr,
}

/// Longest user name kept as a key (registration allows 32 characters).
const MAX_NAME: usize = 64;

impl LoginThrottle {
    pub fn new(auth: &AuthSettings) -> Self {
        let (window, capacity) = (auth.login_failure_window, auth.login_throttle_entries);
        Self {
            names: Counter::new(auth.login_max_failures_per_user, window, capacity),
            addrs: Counter::new(auth.login_max_failures_per_addr, window, capacity),
        }
    }

    /// Lets an attempt for `name` from `addr` go ahead (taking the name's slot), or says
    /// how many seconds to wait when the name's or the address's failures are used up.
    pub async fn begin(&self, name: &str, addr: IpAddr) -> Result<Attempt, u64> {
        if let Some(wait) = self.addrs.used_up(&addr).await {
            return Err(retry_after(wait));
        }
        let mut end = name.len().min(MAX_NAME);
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        let name = name[..end].to_string();
        self.names.take(name.clone()).await.map_err(retry_after)?;
        Ok(Attempt { name, addr })
    }

    /// The attempt failed: its name keeps the slot, its address counts a failure.
    pub async fn failed(&self, attempt: Attempt) {
        self.addrs.add(attempt.addr).await;
    }

    /// The attempt succeeded: its name starts afresh.
    pub async fn succeeded(&self, attempt: Attempt) {
        self.names.windows.invalidate(&attempt.name).await;
    }
}
