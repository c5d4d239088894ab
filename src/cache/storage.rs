//! [`EdgeStorage`]: the storage behind the edge's response cache, implementing pingora's
//! [`Storage`] trait.
//!
//! It owns: the memory tier (bounded in bytes, LRU), the optional disk tier (see
//! [`super::disk`]), in-progress fills that readers can stream while they are written, the
//! index from primary key strings to entries (for purge by prefix), and the counters behind
//! [`StorageStats`]. It does not decide what is cacheable or how keys are built.
//!
//! # Memory bound and eviction
//!
//! Eviction is internal and synchronous: [`EdgeStorage::eviction`] returns `None` and callers
//! pass `None` as the eviction manager to `session.cache.enable(..)`. A pingora
//! `EvictionManager` only hears about an object when a miss finishes (and purges its victims
//! later, on a spawned task), never about objects promoted from disk or loaded at startup, and
//! not about bodies still being written, so it cannot keep a hard bound. Here every byte the
//! memory tier holds is charged against `memory_bytes` under one lock, and whatever does not
//! fit is made to fit by evicting least recently used objects first:
//!
//! * committed objects are charged body + serialized meta + primary key + a fixed per-entry
//!   overhead;
//! * fills in progress reserve the same for their meta and key when they start, plus the
//!   whole body if the response has a Content-Length; otherwise their body is reserved chunk
//!   by chunk as it arrives (plus a per-chunk overhead). A fill that cannot reserve space,
//!   even after evicting every committed object, is refused (at the start) or abandoned
//!   (mid-stream).
//!
//! So `bytes_memory + bytes_inflight <= memory_bytes` always holds. The policy is plain LRU
//! (the `lru` crate, the structure behind pingora's `simple_lru`): it needs no tuning, it
//! gives an exact bound when it is driven under the same lock as the accounting of fills and
//! the primary-key index, and a hit costs one short critical section. TinyUFO would resist
//! one-hit scans better, but it evicts inside its own structure, so fills, promotions and
//! the purge index would need a second, separately kept account.
//!
//! # Fills, streaming and abandonment
//!
//! `get_miss_handler` registers a fill; lookups of the same key return it (preferred over a
//! committed copy, as pingora expects) and readers stream its body while it is written
//! ([`Storage::support_streaming_partial_write`] is true). A fill becomes a committed object
//! only in `finish`. If its miss handler is dropped before the body is complete, or the body
//! grows past `max_object_bytes`, the fill is marked failed: it disappears from lookups and
//! readers streaming it get an error instead of a short body. A purge marks matching fills so
//! that they are never committed.
//!
//! Caveat (pingora, not this storage): once a miss is streamed to its own client from the
//! fill, pingora aborts that client's response if `write_body` fails. That happens only for
//! responses without Content-Length that grow past `max_object_bytes` (or exhaust the memory
//! budget); pingora's own `set_max_file_size_bytes` check aborts the same way, but also
//! tells the cacheable predictor, so later requests for that key bypass the cache. Responses
//! with a Content-Length over the limit are refused before anything is streamed.
//!
//! # Disk tier
//!
//! `finish` writes the object to disk first (temp file, fsync, rename; on a blocking thread)
//! and then to memory. A memory miss looks on disk, validates the file, and promotes the
//! object to memory. Purges remove from both tiers; file unlinks happen on blocking threads.

use super::disk::{self, DiskObject, DiskTier, StoreCond};
pub(crate) use super::index::{BinaryMeta, PrimaryIndex};
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use lru::LruCache;
use parking_lot::Mutex;
use pingora::cache::eviction::EvictionManager;
use pingora::cache::key::{CacheHashKey, HashBinary};
use pingora::cache::storage::streaming_write::U64WriteId;
use pingora::cache::storage::{HandleHit, HandleMiss, MissFinishType};
use pingora::cache::trace::SpanHandle;
use pingora::cache::{
    CacheEntryKey, CacheKey, CacheMeta, HitHandler, MissHandler, PurgeOutcome, PurgeTarget,
    PurgeType, Storage,
};
use std::any::Any;
use std::collections::{HashMap, HashSet};
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;
use tokio::sync::watch;

/// Default size of the memory tier: 256 MiB.
pub const DEFAULT_MEMORY_BYTES: usize = 256 * 1024 * 1024;
/// Default per-object body limit: 8 MiB.
pub const DEFAULT_MAX_OBJECT_BYTES: usize = 8 * 1024 * 1024;
/// Charged per committed object on top of its bytes (struct, LRU node, index slot).
const ENTRY_OVERHEAD: usize = 256;
/// Charged per buffered body chunk of a fill (the `Bytes` handle and its slot).
const CHUNK_OVERHEAD: usize = 64;
/// Body chunks smaller than this are appended to the previous chunk when it is small too...
const SMALL_CHUNK: usize = 1024;
/// ...as long as the result stays within this size. So at most every other chunk is under
/// `SMALL_CHUNK` bytes, and chunk overheads stay under 1/8 of the body length.
const COALESCE_LIMIT: usize = 4096;
/// Complete hits are returned in slices of at most this many bytes.
const READ_CHUNK: usize = 64 * 1024;

/// Storage configuration. Read once, at startup: a config reload must not recreate the
/// storage (pingora holds `&'static` references to it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheStorageConfig {
    /// Bytes the memory tier may hold, fills in progress included. Must be at least
    /// `max_object_bytes`.
    pub memory_bytes: usize,
    /// Largest body stored, in bytes. Also pass it to
    /// `session.cache.set_max_file_size_bytes(..)` so pingora stops a too-large fill itself.
    pub max_object_bytes: usize,
    /// Optional disk tier.
    pub disk: Option<DiskConfig>,
}

impl Default for CacheStorageConfig {
    fn default() -> Self {
        CacheStorageConfig {
            memory_bytes: DEFAULT_MEMORY_BYTES,
            max_object_bytes: DEFAULT_MAX_OBJECT_BYTES,
            disk: None,
        }
    }
}

/// The disk tier: a directory owned by one process, and its size limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    /// Cache directory (created if missing). Holds `objects/` and `tmp/`.
    pub dir: PathBuf,
    /// Bytes the files may use, each file charged its length rounded up to 4 KiB.
    pub max_bytes: u64,
}

impl CacheStorageConfig {
    /// Check the limits for consistency.
    pub fn validate(&self) -> Result<(), StorageError> {
        if self.memory_bytes == 0 {
            return Err(StorageError::Config("memory_bytes must be > 0".into()));
        }
        if self.max_object_bytes == 0 {
            return Err(StorageError::Config("max_object_bytes must be > 0".into()));
        }
        if self.max_object_bytes > self.memory_bytes {
            return Err(StorageError::Config(format!(
                "max_object_bytes ({}) must not exceed memory_bytes ({}): bodies are buffered in memory while they are written",
                self.max_object_bytes, self.memory_bytes
            )));
        }
        if let Some(d) = &self.disk {
            if d.max_bytes == 0 {
                return Err(StorageError::Config("disk max_bytes must be > 0".into()));
            }
            if d.dir.as_os_str().is_empty() {
                return Err(StorageError::Config("disk dir must not be empty".into()));
            }
        }
        Ok(())
    }
}

/// Errors of the cache storage. Handed to pingora as `InternalError`s with this text.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// Inconsistent configuration.
    #[error("invalid cache storage config: {0}")]
    Config(String),
    /// The body is (or grew) larger than `max_object_bytes`.
    #[error("response body exceeds max_object_bytes ({limit} bytes); not cached")]
    ObjectTooLarge {
        /// The configured limit.
        limit: usize,
    },
    /// The primary key is longer than the storage accepts.
    #[error("cache key of {0} bytes is too long to store")]
    KeyTooLong(usize),
    /// The serialized response header is larger than the storage accepts.
    #[error("cache metadata of {0} bytes is too large to store")]
    MetaTooLarge(usize),
    /// Fills in progress use the whole memory budget.
    #[error("cache memory budget exhausted by fills in progress; not cached")]
    MemoryExhausted,
    /// The fill was abandoned (body cut off, over the limit, or its writer went away).
    #[error("cache fill was abandoned before it completed")]
    FillAbandoned,
    /// The finished object fits in no tier.
    #[error("object fits in no cache tier; not stored")]
    NotStored,
    /// `lookup_streaming_write` was given a tag that matches no fill in progress.
    #[error("no cache fill in progress for this write tag")]
    NoSuchWrite,
    /// Disk I/O.
    #[error("cache disk I/O: {0}")]
    Io(#[from] io::Error),
    /// Meta (de)serialization.
    #[error("cache metadata: {0}")]
    Meta(String),
}

impl StorageError {
    fn into_pingora(self) -> Box<pingora::Error> {
        pingora::Error::explain(pingora::ErrorType::InternalError, self.to_string())
    }
}

/// Counters for metrics. Gauges: `bytes_*`, `objects_*`, `*_inflight`; the rest only grow.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StorageStats {
    /// Bytes charged for committed objects in memory.
    pub bytes_memory: u64,
    /// Committed objects in memory.
    pub objects_memory: u64,
    /// Bytes reserved by fills in progress (counted against `memory_bytes` too).
    pub bytes_inflight: u64,
    /// Fills in progress.
    pub fills_inflight: u64,
    /// Bytes charged for files on disk (lengths rounded up to 4 KiB).
    pub bytes_disk: u64,
    /// Objects on disk.
    pub objects_disk: u64,
    /// Evictions from either tier (`evictions_memory + evictions_disk`).
    pub evictions: u64,
    /// Objects evicted from memory to make room.
    pub evictions_memory: u64,
    /// Files evicted from disk to make room.
    pub evictions_disk: u64,
    /// Disk files found corrupt or truncated, and removed.
    pub disk_rejected: u64,
    /// Disk I/O errors.
    pub disk_errors: u64,
}

/// A committed object.
struct MemObject {
    meta: Arc<BinaryMeta>,
    body: Bytes,
    primary: Arc<str>,
}

impl MemObject {
    fn weight(&self) -> usize {
        self.body.len()
            + self.meta.0.len()
            + self.meta.1.len()
            + self.primary.len()
            + ENTRY_OVERHEAD
    }
}

struct MemEntry {
    obj: Arc<MemObject>,
    weight: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FillState {
    Writing,
    Complete,
    Failed,
}

struct FillBody {
    chunks: Vec<Bytes>,
    len: usize,
    state: FillState,
}

/// A fill in progress: the body of a miss as it is being written.
struct Fill {
    id: u64,
    hash: HashBinary,
    meta: Arc<BinaryMeta>,
    primary: Arc<str>,
    /// Set by a purge: never commit this fill, and hide it from new lookups.
    doomed: Arc<AtomicBool>,
    body: Mutex<FillBody>,
    /// Bumped on every change of `body`; readers wait on it.
    notify: watch::Sender<u64>,
}

impl Fill {
    fn is_visible(&self) -> bool {
        !self.doomed.load(Ordering::Acquire) && self.body.lock().state != FillState::Failed
    }

    fn wake(&self) {
        self.notify.send_modify(|v| *v = v.wrapping_add(1));
    }

    fn fail(&self) {
        let changed = {
            let mut b = self.body.lock();
            if b.state == FillState::Writing {
                b.state = FillState::Failed;
                true
            } else {
                false
            }
        };
        if changed {
            self.wake();
        }
    }
}

/// The memory tier and the fills in progress, under one lock.
struct MemTier {
    limit: usize,
    lru: LruCache<HashBinary, MemEntry>,
    used: usize,
    reserved: usize,
    by_primary: PrimaryIndex,
    fills: HashMap<HashBinary, Vec<Arc<Fill>>>,
    evictions: u64,
}

impl MemTier {
    /// Evict least recently used objects until `need` more bytes fit.
    fn make_room(&mut self, need: usize) -> bool {
        if need.saturating_add(self.reserved) > self.limit {
            return false; // evicting committed objects cannot help
        }
        while self.used + self.reserved + need > self.limit {
            let Some((hash, e)) = self.lru.pop_lru() else {
                return false;
            };
            self.used -= e.weight;
            self.by_primary.remove(&e.obj.primary, &hash);
            self.evictions += 1;
        }
        true
    }

    fn remove(&mut self, hash: &HashBinary) -> bool {
        match self.lru.pop(hash) {
            Some(e) => {
                self.used -= e.weight;
                self.by_primary.remove(&e.obj.primary, hash);
                true
            }
            None => false,
        }
    }

    /// Insert (replacing any object under `hash`); false if it does not fit.
    fn insert(&mut self, hash: HashBinary, obj: Arc<MemObject>) -> bool {
        self.remove(&hash);
        let weight = obj.weight();
        if !self.make_room(weight) {
            return false;
        }
        self.used += weight;
        self.by_primary.insert(&obj.primary, hash);
        self.lru.push(hash, MemEntry { obj, weight });
        true
    }

    fn reserve(&mut self, n: usize) -> bool {
        if !self.make_room(n) {
            return false;
        }
        self.reserved += n;
        true
    }

    fn release(&mut self, n: usize) {
        self.reserved = self.reserved.saturating_sub(n);
    }

    fn visible_fill(&self, hash: &HashBinary) -> Option<Arc<Fill>> {
        self.fills
            .get(hash)?
            .iter()
            .find(|f| f.is_visible())
            .cloned()
    }

    fn remove_fill(&mut self, fill: &Fill) {
        if let Some(v) = self.fills.get_mut(&fill.hash) {
            v.retain(|f| f.id != fill.id);
            if v.is_empty() {
                self.fills.remove(&fill.hash);
            }
        }
    }
}

/// The edge's cache storage. Create it once at startup with [`EdgeStorage::open`]; it lives
/// for the rest of the process.
pub struct EdgeStorage {
    mem: Mutex<MemTier>,
    disk: Option<DiskTier>,
    max_object_bytes: usize,
    memory_bytes: usize,
    next_fill_id: AtomicU64,
}

impl EdgeStorage {
    /// Validate `cfg`, open the disk tier (scanning and indexing its directory, on a blocking
    /// thread) and leak the storage so that it can be handed to pingora as `&'static`.
    ///
    /// Call once per process. Each call leaks one storage; reloads must reuse the first.
    pub async fn open(cfg: CacheStorageConfig) -> io::Result<&'static EdgeStorage> {
        Ok(Self::open_owned(cfg).await?.leak())
    }

    /// Like [`EdgeStorage::open`], without leaking. Pingora needs `&'static`: see
    /// [`EdgeStorage::leak`].
    pub async fn open_owned(cfg: CacheStorageConfig) -> io::Result<EdgeStorage> {
        cfg.validate()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let disk = match cfg.disk.clone() {
            Some(d) => {
                let max_body = cfg.max_object_bytes as u64;
                let tier = tokio::task::spawn_blocking(move || {
                    DiskTier::open(&d.dir, d.max_bytes, max_body)
                })
                .await
                .map_err(io::Error::other)??;
                Some(tier)
            }
            None => None,
        };
        Ok(Self::build(&cfg, disk))
    }

    /// [`EdgeStorage::open`] for startup code that has no async runtime yet (e.g. `main`
    /// before pingora starts): scans the disk directory on the calling thread. Do not call
    /// it from async code.
    pub fn open_blocking(cfg: CacheStorageConfig) -> io::Result<&'static EdgeStorage> {
        cfg.validate()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let disk = match &cfg.disk {
            Some(d) => Some(DiskTier::open(
                &d.dir,
                d.max_bytes,
                cfg.max_object_bytes as u64,
            )?),
            None => None,
        };
        Ok(Self::build(&cfg, disk).leak())
    }

    fn build(cfg: &CacheStorageConfig, disk: Option<DiskTier>) -> EdgeStorage {
        EdgeStorage {
            mem: Mutex::new(MemTier {
                limit: cfg.memory_bytes,
                lru: LruCache::unbounded(),
                used: 0,
                reserved: 0,
                by_primary: PrimaryIndex::default(),
                fills: HashMap::new(),
                evictions: 0,
            }),
            disk,
            max_object_bytes: cfg.max_object_bytes,
            memory_bytes: cfg.memory_bytes,
            next_fill_id: AtomicU64::new(1),
        }
    }

    /// Give the storage a `'static` lifetime (it is never freed).
    pub fn leak(self) -> &'static EdgeStorage {
        Box::leak(Box::new(self))
    }

    /// Always `None`: eviction is internal (see the module docs). Pass this (or `None`) as the
    /// eviction manager to `session.cache.enable(..)`. Passing a pingora manager as well would
    /// only make it purge objects on its own, different, schedule.
    pub fn eviction(&self) -> Option<&'static (dyn EvictionManager + Sync)> {
        None
    }

    /// The per-object body limit; also give it to `session.cache.set_max_file_size_bytes`.
    pub fn max_object_bytes(&self) -> usize {
        self.max_object_bytes
    }

    /// The memory tier's size.
    pub fn memory_bytes(&self) -> usize {
        self.memory_bytes
    }

    /// Remove every stored object whose primary key starts with `prefix`, in every tier and
    /// every Vary variant, and keep fills in progress for those keys from being stored.
    /// Returns how many stored objects (distinct cache keys) were removed; an empty prefix
    /// matches everything. File deletion happens on a blocking thread after this returns;
    /// the objects are invisible at once.
    pub fn purge_prefix(&self, prefix: &str) -> usize {
        self.purge_matching(prefix, false)
    }

    /// Like [`EdgeStorage::purge_prefix`] for one exact primary key (all its Vary variants).
    pub fn purge_primary(&self, primary: &str) -> usize {
        self.purge_matching(primary, true)
    }

    /// Whether any object (any Vary variant) is stored under `primary`, in either
    /// tier: tells a vary-miss from a uri-miss (RFC 9211).
    pub fn has_primary(&self, primary: &str) -> bool {
        let mut found = HashSet::new();
        self.mem.lock().by_primary.exact(primary, &mut found);
        if found.is_empty() {
            if let Some(d) = &self.disk {
                d.collect(primary, true, &mut found);
            }
        }
        !found.is_empty()
    }

    /// Counters for metrics.
    pub fn stats(&self) -> StorageStats {
        let mut s = {
            let mem = self.mem.lock();
            StorageStats {
                bytes_memory: mem.used as u64,
                objects_memory: mem.lru.len() as u64,
                bytes_inflight: mem.reserved as u64,
                fills_inflight: mem.fills.values().map(|v| v.len() as u64).sum(),
                evictions_memory: mem.evictions,
                ..StorageStats::default()
            }
        };
        if let Some(d) = &self.disk {
            let ds = d.stats();
            s.bytes_disk = ds.bytes;
            s.objects_disk = ds.objects;
            s.evictions_disk = ds.evictions;
            s.disk_rejected = ds.rejected;
            s.disk_errors = ds.errors;
        }
        s.evictions = s.evictions_memory + s.evictions_disk;
        s
    }

    fn purge_matching(&self, pattern: &str, exact: bool) -> usize {
        let mut hashes = HashSet::new();
        {
            let mem = self.mem.lock();
            if exact {
                mem.by_primary.exact(pattern, &mut hashes);
            } else {
                mem.by_primary.with_prefix(pattern, &mut hashes);
            }
            for (hash, fills) in &mem.fills {
                let hit = fills.iter().any(|f| {
                    if exact {
                        &*f.primary == pattern
                    } else {
                        f.primary.starts_with(pattern)
                    }
                });
                if hit {
                    hashes.insert(*hash);
                }
            }
        }
        if let Some(d) = &self.disk {
            d.collect(pattern, exact, &mut hashes);
        }
        let mut removed = 0;
        let mut unlink = Vec::new();
        for hash in hashes {
            let (r, path) = self.remove_everywhere(&hash, true);
            removed += usize::from(r);
            unlink.extend(path);
        }
        unlink_detached(unlink);
        removed
    }

    /// Remove `hash` from both tiers; if `doom_fills`, also keep fills in progress for it from
    /// being committed. Returns whether a stored object was removed and the file to unlink.
    ///
    /// Order matters: fills are doomed before the disk entry goes (a fill checks its flag under
    /// the disk index lock before renaming its file in), and memory is cleared again after the
    /// disk entry is gone (a disk hit promotes to memory only while its file is still indexed).
    fn remove_everywhere(&self, hash: &HashBinary, doom_fills: bool) -> (bool, Option<PathBuf>) {
        let mut removed = {
            let mut mem = self.mem.lock();
            if doom_fills {
                if let Some(fills) = mem.fills.get(hash) {
                    for f in fills {
                        f.doomed.store(true, Ordering::Release);
                    }
                }
            }
            mem.remove(hash)
        };
        let path = self.disk.as_ref().and_then(|d| d.remove(hash));
        removed |= path.is_some();
        removed |= self.mem.lock().remove(hash);
        (removed, path)
    }

    async fn lookup_disk(
        &'static self,
        disk: &'static DiskTier,
        hash: HashBinary,
    ) -> pingora::Result<Option<(CacheMeta, HitHandler)>> {
        let Some(gen) = disk.touch(&hash) else {
            return Ok(None);
        };
        let read =
            tokio::task::spawn_blocking(move || -> io::Result<Option<(CacheMeta, DiskObject)>> {
                let Some(obj) = disk.read(&hash, gen)? else {
                    return Ok(None);
                };
                match CacheMeta::deserialize(&obj.meta.0, &obj.meta.1) {
                    Ok(meta) => Ok(Some((meta, obj))),
                    Err(e) => {
                        disk.reject(&hash, gen, &e);
                        Ok(None)
                    }
                }
            })
            .await;
        let (meta, obj) = match read {
            Ok(Ok(Some(found))) => found,
            Ok(Ok(None)) => return Ok(None),
            Ok(Err(e)) => {
                log::warn!("cache: disk read failed, treating as a miss: {e}");
                return Ok(None);
            }
            Err(e) => {
                disk.count_error();
                log::warn!("cache: disk read task failed, treating as a miss: {e}");
                return Ok(None);
            }
        };
        let obj = Arc::new(MemObject {
            meta: Arc::new(obj.meta),
            body: obj.body,
            primary: obj.primary,
        });
        // Promote, unless the file was purged or replaced while it was being read. A newer
        // copy already in memory (a fill that just committed) is left alone.
        let current = disk.if_current(&hash, gen, || {
            let mut mem = self.mem.lock();
            if !mem.lru.contains(&hash) {
                mem.insert(hash, obj.clone());
            }
        });
        if current.is_none() {
            return Ok(None);
        }
        Ok(Some((meta, complete_hit(obj))))
    }

    /// Rewrite the stored meta of `hash` with `f`, in memory and on disk.
    async fn rewrite_meta<F>(&'static self, hash: HashBinary, f: F) -> pingora::Result<Rewrite>
    where
        F: Fn(&BinaryMeta) -> Result<BinaryMeta, StorageError> + Send + 'static,
    {
        let mut outcome = Rewrite::NotFound;
        let old = self.mem.lock().lru.peek(&hash).map(|e| e.obj.clone());
        let mut new_obj = None;
        if let Some(old) = old {
            let obj = Arc::new(MemObject {
                meta: Arc::new(f(&old.meta).map_err(StorageError::into_pingora)?),
                body: old.body.clone(),
                primary: old.primary.clone(),
            });
            let mut mem = self.mem.lock();
            if mem
                .lru
                .peek(&hash)
                .is_some_and(|e| Arc::ptr_eq(&e.obj, &old))
            {
                if mem.insert(hash, obj.clone()) {
                    outcome = Rewrite::Rewritten;
                } else {
                    outcome = Rewrite::Removed;
                }
                new_obj = Some(obj);
            }
        }
        let Some(disk) = &self.disk else {
            return Ok(outcome);
        };
        let Some(gen) = disk.peek(&hash) else {
            return Ok(outcome);
        };
        let res = tokio::task::spawn_blocking(move || -> Result<bool, StorageError> {
            let (meta, body, primary) = match new_obj {
                Some(o) => (o.meta.as_ref().clone(), o.body.clone(), o.primary.clone()),
                None => {
                    let Some(d) = disk.read(&hash, gen)? else {
                        return Ok(false);
                    };
                    (f(&d.meta)?, d.body, d.primary)
                }
            };
            Ok(disk.store(hash, &primary, &meta, &body, StoreCond::ReplaceGen(gen))?)
        })
        .await;
        match res {
            Ok(Ok(true)) => Ok(Rewrite::Rewritten),
            // raced with a purge or a newer fill, or the file was bad (and is gone)
            Ok(Ok(false)) => Ok(outcome),
            Ok(Err(e)) => {
                log::warn!("cache: rewriting meta on disk failed, dropping the file: {e}");
                self.drop_disk_gen(disk, hash, gen).await;
                Ok(if outcome == Rewrite::NotFound {
                    Rewrite::Removed
                } else {
                    outcome
                })
            }
            Err(e) => {
                disk.count_error();
                log::warn!("cache: meta rewrite task failed, dropping the file: {e}");
                self.drop_disk_gen(disk, hash, gen).await;
                Ok(if outcome == Rewrite::NotFound {
                    Rewrite::Removed
                } else {
                    outcome
                })
            }
        }
    }

    /// Remove the disk entry of `hash` if it is still generation `gen`.
    async fn drop_disk_gen(&self, disk: &'static DiskTier, hash: HashBinary, gen: u64) {
        if disk.peek(&hash) == Some(gen) {
            if let Some(p) = disk.remove(&hash) {
                unlink_now(vec![p]).await;
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rewrite {
    NotFound,
    Rewritten,
    /// Could not be rewritten and was removed instead (only on errors).
    Removed,
}

/// Unlink files on a blocking thread and wait for it.
async fn unlink_now(paths: Vec<PathBuf>) {
    if paths.is_empty() {
        return;
    }
    if let Err(e) = tokio::task::spawn_blocking(move || disk::remove_files(&paths)).await {
        log::warn!("cache: unlink task failed: {e}");
    }
}

/// Unlink files on a blocking thread without waiting (inline when there is no runtime).
/// Safe to defer: object file names are unique per write, so a newer write is never hit.
fn unlink_detached(paths: Vec<PathBuf>) {
    if paths.is_empty() {
        return;
    }
    match tokio::runtime::Handle::try_current() {
        Ok(h) => {
            h.spawn_blocking(move || disk::remove_files(&paths));
        }
        Err(_) => disk::remove_files(&paths),
    }
}

fn content_length(meta: &CacheMeta) -> Option<u64> {
    meta.headers()
        .get(http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn complete_hit(obj: Arc<MemObject>) -> HitHandler {
    let end = obj.body.len();
    Box::new(EdgeHit::Complete {
        body: obj.body.clone(),
        pos: 0,
        end,
    })
}

fn partial_hit(fill: Arc<Fill>) -> pingora::Result<(CacheMeta, HitHandler)> {
    let meta = CacheMeta::deserialize(&fill.meta.0, &fill.meta.1)?;
    let rx = fill.notify.subscribe();
    Ok((
        meta,
        Box::new(EdgeHit::Partial {
            fill,
            idx: 0,
            off: 0,
            rx,
        }),
    ))
}

/// Hit handler: a committed object, or a fill being streamed.
enum EdgeHit {
    Complete {
        body: Bytes,
        pos: usize,
        end: usize,
    },
    Partial {
        fill: Arc<Fill>,
        /// Chunk being read, and bytes of it already returned (the last chunk can grow).
        idx: usize,
        off: usize,
        rx: watch::Receiver<u64>,
    },
}

#[async_trait]
impl HandleHit for EdgeHit {
    async fn read_body(&mut self) -> pingora::Result<Option<Bytes>> {
        match self {
            EdgeHit::Complete { body, pos, end } => {
                if *pos >= *end {
                    return Ok(None);
                }
                let n = (*end - *pos).min(READ_CHUNK);
                let out = body.slice(*pos..*pos + n);
                *pos += n;
                Ok(Some(out))
            }
            EdgeHit::Partial { fill, idx, off, rx } => loop {
                rx.mark_unchanged();
                {
                    let b = fill.body.lock();
                    loop {
                        match b.chunks.get(*idx) {
                            Some(c) if *off < c.len() => {
                                let out = c.slice(*off..);
                                *off = c.len();
                                return Ok(Some(out));
                            }
                            Some(_) if *idx + 1 < b.chunks.len() => {
                                *idx += 1;
                                *off = 0;
                            }
                            _ => break,
                        }
                    }
                    match b.state {
                        FillState::Complete => return Ok(None),
                        FillState::Failed => {
                            return Err(StorageError::FillAbandoned.into_pingora());
                        }
                        FillState::Writing => {}
                    }
                }
                if rx.changed().await.is_err() {
                    return Err(StorageError::FillAbandoned.into_pingora());
                }
            },
        }
    }

    async fn finish(
        self: Box<Self>,
        _storage: &'static (dyn Storage + Sync),
        _key: &CacheKey,
        _trace: &SpanHandle,
    ) -> pingora::Result<()> {
        Ok(())
    }

    fn can_seek(&self) -> bool {
        matches!(self, EdgeHit::Complete { .. })
    }

    fn seek(&mut self, start: usize, end: Option<usize>) -> pingora::Result<()> {
        match self {
            EdgeHit::Complete { body, pos, end: e } => {
                if start >= body.len() {
                    return pingora::Error::e_explain(
                        pingora::ErrorType::InternalError,
                        format!("seek start out of range {start} >= {}", body.len()),
                    );
                }
                *pos = start;
                *e = end.map_or(body.len(), |x| x.min(body.len()));
                Ok(())
            }
            EdgeHit::Partial { .. } => pingora::Error::e_explain(
                pingora::ErrorType::InternalError,
                "seek is not supported while the object is being written",
            ),
        }
    }

    fn should_count_access(&self) -> bool {
        matches!(self, EdgeHit::Complete { .. })
    }

    fn get_eviction_weight(&self) -> usize {
        match self {
            EdgeHit::Complete { body, .. } => body.len(),
            EdgeHit::Partial { .. } => 0,
        }
    }

    fn as_any(&self) -> &(dyn Any + Send + Sync) {
        self
    }

    fn as_any_mut(&mut self) -> &mut (dyn Any + Send + Sync) {
        self
    }
}

/// Miss handler: writes one fill. Dropping it before `finish` abandons the fill.
struct EdgeMiss {
    storage: &'static EdgeStorage,
    fill: Arc<Fill>,
    tag: U64WriteId,
    /// Bytes this fill holds of the memory budget.
    reserved: usize,
    /// Bytes of `reserved` already used (meta, key, chunks); the rest was reserved up front
    /// from the Content-Length.
    consumed: usize,
    failed: bool,
}

impl EdgeMiss {
    fn abandon(&mut self) {
        self.failed = true;
        self.fill.fail();
        let mut mem = self.storage.mem.lock();
        mem.release(self.reserved);
        self.reserved = 0;
        mem.remove_fill(&self.fill);
    }
}

#[async_trait]
impl HandleMiss for EdgeMiss {
    async fn write_body(&mut self, data: Bytes, eof: bool) -> pingora::Result<()> {
        if self.failed {
            return Err(StorageError::FillAbandoned.into_pingora());
        }
        let n = data.len();
        // Only this handler changes the chunk list, so what is seen here still holds below.
        let (len, coalesce) = {
            let b = self.fill.body.lock();
            let coalesce = n < SMALL_CHUNK
                && b.chunks
                    .last()
                    .is_some_and(|l| l.len() + n <= COALESCE_LIMIT);
            (b.len, coalesce)
        };
        if n > 0 {
            if len + n > self.storage.max_object_bytes {
                self.abandon();
                return Err(StorageError::ObjectTooLarge {
                    limit: self.storage.max_object_bytes,
                }
                .into_pingora());
            }
            let cost = if coalesce { n } else { n + CHUNK_OVERHEAD };
            let spare = self.reserved - self.consumed;
            if cost > spare {
                if !self.storage.mem.lock().reserve(cost - spare) {
                    self.abandon();
                    return Err(StorageError::MemoryExhausted.into_pingora());
                }
                self.reserved += cost - spare;
            }
            self.consumed += cost;
        }
        {
            let mut b = self.fill.body.lock();
            if b.state != FillState::Writing {
                // body after end of stream
                drop(b);
                self.abandon();
                return Err(StorageError::FillAbandoned.into_pingora());
            }
            if n > 0 {
                match b.chunks.last_mut() {
                    Some(last) if coalesce => {
                        // readers track an offset into the last chunk, so growing it is safe
                        let mut joined = BytesMut::with_capacity(last.len() + n);
                        joined.extend_from_slice(last);
                        joined.extend_from_slice(&data);
                        *last = joined.freeze();
                    }
                    _ => b.chunks.push(data),
                }
                b.len += n;
            }
            if eof {
                b.state = FillState::Complete;
            }
        }
        self.fill.wake();
        Ok(())
    }

    async fn finish(self: Box<Self>) -> pingora::Result<MissFinishType> {
        let mut this = self;
        if this.failed {
            return Err(StorageError::FillAbandoned.into_pingora());
        }
        let body = {
            let mut b = this.fill.body.lock();
            if b.state == FillState::Failed {
                return Err(StorageError::FillAbandoned.into_pingora());
            }
            b.state = FillState::Complete;
            let mut body = BytesMut::with_capacity(b.len);
            for c in &b.chunks {
                body.extend_from_slice(c);
            }
            body.freeze()
        };
        this.fill.wake();
        let size = body.len();
        let storage = this.storage;
        let hash = this.fill.hash;

        // Disk first: a memory miss in between then finds the new file, not an older one.
        let mut on_disk = false;
        if let Some(disk) = &storage.disk {
            let doomed = this.fill.doomed.clone();
            let meta = this.fill.meta.clone();
            let primary = this.fill.primary.clone();
            let body = body.clone();
            let res = tokio::task::spawn_blocking(move || {
                disk.store(hash, &primary, &meta, &body, StoreCond::NotDoomed(doomed))
            })
            .await;
            match res {
                Ok(Ok(stored)) => on_disk = stored,
                Ok(Err(e)) => log::warn!("cache: writing object to disk failed: {e}"),
                Err(e) => {
                    disk.count_error();
                    log::warn!("cache: disk write task failed: {e}");
                }
            }
        }

        let obj = Arc::new(MemObject {
            meta: this.fill.meta.clone(),
            body,
            primary: this.fill.primary.clone(),
        });
        let in_memory = {
            let mut mem = storage.mem.lock();
            mem.release(this.reserved);
            this.reserved = 0;
            if this.fill.doomed.load(Ordering::Acquire) {
                // purged while it was being written: not stored (and not an error)
                return Ok(MissFinishType::Created(size));
            }
            mem.insert(hash, obj)
        };
        if in_memory || on_disk {
            Ok(MissFinishType::Created(size))
        } else {
            Err(StorageError::NotStored.into_pingora())
        }
    }

    fn streaming_write_tag(&self) -> Option<&[u8]> {
        Some(self.tag.as_bytes())
    }
}

impl Drop for EdgeMiss {
    fn drop(&mut self) {
        // Not finished (or finished already, then this is a no-op): readers must not take
        // what they have for a complete body.
        self.fill.fail();
        let mut mem = self.storage.mem.lock();
        mem.release(self.reserved);
        self.reserved = 0;
        mem.remove_fill(&self.fill);
    }
}

#[async_trait]
impl Storage for EdgeStorage {
    async fn lookup(
        &'static self,
        key: &CacheKey,
        _trace: &SpanHandle,
    ) -> pingora::Result<Option<(CacheMeta, HitHandler)>> {
        let hash = key.combined_bin();
        enum Found {
            Fill(Arc<Fill>),
            Object(Arc<MemObject>),
            Nothing,
        }
        let found = {
            let mut mem = self.mem.lock();
            // A fill in progress wins over a committed copy: otherwise a refreshed object
            // would stay invisible behind the expired one until it is complete.
            if let Some(fill) = mem.visible_fill(&hash) {
                Found::Fill(fill)
            } else if let Some(e) = mem.lru.get(&hash) {
                Found::Object(e.obj.clone())
            } else {
                Found::Nothing
            }
        };
        match found {
            Found::Fill(fill) => Ok(Some(partial_hit(fill)?)),
            Found::Object(obj) => {
                let meta = CacheMeta::deserialize(&obj.meta.0, &obj.meta.1)?;
                Ok(Some((meta, complete_hit(obj))))
            }
            Found::Nothing => match &self.disk {
                Some(disk) => self.lookup_disk(disk, hash).await,
                None => Ok(None),
            },
        }
    }

    async fn lookup_streaming_write(
        &'static self,
        key: &CacheKey,
        streaming_write_tag: Option<&[u8]>,
        trace: &SpanHandle,
    ) -> pingora::Result<Option<(CacheMeta, HitHandler)>> {
        let Some(tag) = streaming_write_tag else {
            return self.lookup(key, trace).await;
        };
        let id: u64 = U64WriteId::try_from(tag)
            .map(u64::from)
            .map_err(|_| StorageError::NoSuchWrite.into_pingora())?;
        let hash = key.combined_bin();
        let fill = self
            .mem
            .lock()
            .fills
            .get(&hash)
            .and_then(|v| v.iter().find(|f| f.id == id).cloned());
        match fill {
            Some(fill) => Ok(Some(partial_hit(fill)?)),
            None => Err(StorageError::NoSuchWrite.into_pingora()),
        }
    }

    async fn get_miss_handler(
        &'static self,
        key: &CacheKey,
        meta: &CacheMeta,
        _trace: &SpanHandle,
    ) -> pingora::Result<MissHandler> {
        let declared = content_length(meta);
        if declared.is_some_and(|l| l > self.max_object_bytes as u64) {
            return Err(StorageError::ObjectTooLarge {
                limit: self.max_object_bytes,
            }
            .into_pingora());
        }
        let primary = key.primary_key();
        if primary.len() > disk::MAX_KEY_LEN {
            return Err(StorageError::KeyTooLong(primary.len()).into_pingora());
        }
        let primary: Arc<str> = String::from_utf8_lossy(primary).into();
        let meta = meta.serialize()?;
        let meta_len = meta.0.len().max(meta.1.len());
        if meta_len > disk::MAX_META_LEN {
            return Err(StorageError::MetaTooLarge(meta_len).into_pingora());
        }
        let base = meta.0.len() + meta.1.len() + primary.len() + ENTRY_OVERHEAD;
        // With a Content-Length the body is reserved now, so that a fill that starts can only
        // fail mid-stream if the origin sends more than it declared.
        let upfront = base
            + declared.map_or(0, |l| {
                let l = l as usize;
                l + l / 8 + CHUNK_OVERHEAD
            });
        let id = self.next_fill_id.fetch_add(1, Ordering::Relaxed);
        let hash = key.combined_bin();
        let fill = Arc::new(Fill {
            id,
            hash,
            meta: Arc::new(meta),
            primary,
            doomed: Arc::new(AtomicBool::new(false)),
            body: Mutex::new(FillBody {
                chunks: Vec::new(),
                len: 0,
                state: FillState::Writing,
            }),
            notify: watch::channel(0).0,
        });
        {
            let mut mem = self.mem.lock();
            if !mem.reserve(upfront) {
                return Err(StorageError::MemoryExhausted.into_pingora());
            }
            mem.fills.entry(hash).or_default().push(fill.clone());
        }
        Ok(Box::new(EdgeMiss {
            storage: self,
            fill,
            tag: id.into(),
            reserved: upfront,
            consumed: base,
            failed: false,
        }))
    }

    async fn purge(
        &'static self,
        target: PurgeTarget<'_>,
        purge_type: PurgeType,
        _trace: &SpanHandle,
    ) -> pingora::Result<PurgeOutcome> {
        // This storage never hands out entry IDs, so an identified target is not ours.
        if matches!(target, PurgeTarget::Exact(CacheEntryKey::Identified { .. })) {
            return Ok(PurgeOutcome::NotFound);
        }
        let hash = target.key().combined_bin();
        let doom = matches!(purge_type, PurgeType::Invalidation);
        let (removed, path) = self.remove_everywhere(&hash, doom);
        unlink_now(path.into_iter().collect()).await;
        Ok(if removed {
            PurgeOutcome::Purged(None)
        } else {
            PurgeOutcome::NotFound
        })
    }

    async fn expire(
        &'static self,
        target: PurgeTarget<'_>,
        _trace: &SpanHandle,
    ) -> pingora::Result<PurgeOutcome> {
        if matches!(target, PurgeTarget::Exact(CacheEntryKey::Identified { .. })) {
            return Ok(PurgeOutcome::NotFound);
        }
        let hash = target.key().combined_bin();
        let now = SystemTime::now();
        let outcome = self
            .rewrite_meta(hash, move |m| {
                let mut meta = CacheMeta::deserialize(&m.0, &m.1)
                    .map_err(|e| StorageError::Meta(e.to_string()))?;
                meta.expire_at(now);
                meta.serialize()
                    .map_err(|e| StorageError::Meta(e.to_string()))
            })
            .await?;
        Ok(match outcome {
            Rewrite::NotFound => PurgeOutcome::NotFound,
            Rewrite::Rewritten => PurgeOutcome::Expired,
            Rewrite::Removed => PurgeOutcome::Purged(None),
        })
    }

    async fn update_meta(
        &'static self,
        key: &CacheKey,
        meta: &CacheMeta,
        _trace: &SpanHandle,
    ) -> pingora::Result<bool> {
        let new = meta.serialize()?;
        let outcome = self
            .rewrite_meta(key.combined_bin(), move |_| Ok(new.clone()))
            .await?;
        Ok(outcome == Rewrite::Rewritten)
    }

    fn support_streaming_partial_write(&self) -> bool {
        true
    }

    fn as_any(&self) -> &(dyn Any + Send + Sync + 'static) {
        self
    }
}

#[cfg(test)]
mod tests;
