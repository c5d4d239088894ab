//! Response cache storage for pingora-cache.
//!
//! This module owns where cached responses live: a byte-bounded memory tier with LRU
//! eviction, an optional disk tier that survives restarts ([`disk`]), in-progress fills that
//! cache-lock readers stream, and purge by exact key, by primary key and by prefix
//! ([`storage`]). What is cacheable, the cache key, Vary and the purge endpoint are HTTP
//! semantics and live in `crate::proxy`, which hands [`EdgeStorage`] to
//! `session.cache.enable(..)`.

pub mod disk;
pub mod storage;

pub use disk::DiskFormatError;
pub use storage::{
    CacheStorageConfig, DiskConfig, EdgeStorage, StorageError, StorageStats,
    DEFAULT_MAX_OBJECT_BYTES, DEFAULT_MEMORY_BYTES,
};
