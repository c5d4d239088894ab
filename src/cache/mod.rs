//! The edge's shared HTTP cache (RFC 9111) on pingora-cache.
//!
//! - [`policy`]: what may be stored and reused, keys, Vary, `Cache-Status`;
//! - [`storage`] and [`disk`]: where cached responses live: a byte-bounded memory
//!   tier with LRU eviction, an optional disk tier that survives restarts, in-progress
//!   fills that cache-lock readers stream, purge by key, primary key and prefix;
//! - [`store`]: the process-wide handle the proxy enables per request;
//! - `index`: the types both tiers share (serialized meta, primary-key index).

pub mod disk;
mod index;
pub mod policy;
pub mod storage;
pub mod store;

pub use disk::DiskFormatError;
pub use storage::{
    CacheStorageConfig, DiskConfig, EdgeStorage, StorageError, StorageStats,
    DEFAULT_MAX_OBJECT_BYTES, DEFAULT_MEMORY_BYTES,
};
