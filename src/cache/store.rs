//! The process-wide cache store the proxy enables per request: storage and cache
//! lock (pingora wants both as `&'static`), plus purges and statistics for the admin
//! listener and metrics. Created once at start; reloads keep it, so cached responses
//! survive a reload.

use std::time::Duration;

use pingora::cache::eviction::EvictionManager;
use pingora::cache::lock::{CacheKeyLockImpl, CacheLock};
use pingora::cache::predictor::{CacheablePredictor, Predictor};
use pingora::cache::Storage;

use super::storage::{CacheStorageConfig, DiskConfig, EdgeStorage};

/// Global cache settings.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub memory_bytes: usize,
    pub max_object_bytes: usize,
    /// (directory, size limit) of the disk tier.
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
    /// Always `None`: the storage evicts by itself, under one byte budget.
    pub eviction: Option<&'static (dyn EvictionManager + Sync)>,
    pub lock: &'static CacheKeyLockImpl,
    /// Remembers keys found uncacheable (or too large) so later requests skip lookups.
    pub predictor: &'static (dyn CacheablePredictor + Sync),
    pub max_object_bytes: usize,
    edge: &'static EdgeStorage,
}

/// How long a cache lock is held at most before readers stop waiting for it.
const LOCK_AGE_TIMEOUT: Duration = Duration::from_secs(30);

impl CacheStore {
    pub async fn open(cfg: &StoreConfig) -> std::io::Result<&'static CacheStore> {
        let storage_cfg = CacheStorageConfig {
            memory_bytes: cfg.memory_bytes,
            max_object_bytes: cfg.max_object_bytes,
            disk: cfg
                .disk
                .clone()
                .map(|(dir, max_bytes)| DiskConfig { dir, max_bytes }),
        };
        storage_cfg
            .validate()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
        let edge = EdgeStorage::open(storage_cfg).await?;
        let lock: &'static CacheKeyLockImpl = Box::leak(CacheLock::new_boxed(LOCK_AGE_TIMEOUT));
        let predictor: &'static Predictor<16> = Box::leak(Box::new(Predictor::new(4096, None)));
        Ok(Box::leak(Box::new(CacheStore {
            storage: edge,
            eviction: edge.eviction(),
            lock,
            predictor,
            max_object_bytes: edge.max_object_bytes(),
            edge,
        })))
    }

    /// Removes every stored response of one resource (see `policy::resource_key`):
    /// each Vary variant, and each variant by the route's key headers and cookies,
    /// whose primary keys are the resource key followed by `\n` and those parts (a
    /// path never holds a newline, so no other resource matches).
    pub async fn invalidate_resource(&'static self, resource: &str) -> usize {
        self.edge.purge_primary(resource) + self.edge.purge_prefix(&format!("{resource}\n"))
    }

    /// Removes every stored response whose primary key starts with `prefix`.
    pub async fn purge_prefix(&'static self, prefix: &str) -> usize {
        self.edge.purge_prefix(prefix)
    }

    /// Whether some variant of `primary` is stored.
    pub fn has_primary(&self, primary: &str) -> bool {
        self.edge.has_primary(primary)
    }

    pub fn stats(&self) -> StoreStats {
        let s = self.edge.stats();
        StoreStats {
            bytes: s.bytes_memory + s.bytes_disk,
            objects: s.objects_memory + s.objects_disk,
            evictions: s.evictions,
        }
    }
}
