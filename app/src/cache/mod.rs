//! Query result cache: moka in-process by default, Redis when `redis.url` is set, with
//! hit/miss counters (`cache_requests_total{cache,result}`; moka has none built in).
//!
//! Cached: each user's conversation list (`convs:{user}`, the first `limits.max_page`
//! rows, read with the user's id: an entry only ever holds that user's rows). Writers
//! invalidate the keys they touch; with moka, the other instances of a process that share
//! the event bus invalidate on the bus events (see [`QueryCache::on_event`]). A Redis
//! failure degrades to a miss (the database answers) and is counted.
//!
//! Nothing here decides who may see what: ownership is checked by the statements that
//! read and write a conversation's rows (see [`crate::store::Store`]). A cached decision
//! could be put back by a read that raced the delete which dropped it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::bus::{Envelope, Event};

pub use crate::redis_gate::RedisGate;

enum Backend {
    Moka(moka::future::Cache<String, Arc<[u8]>>),
    Redis {
        conn: redis::aio::ConnectionManager,
        gate: Arc<RedisGate>,
        prefix: String,
        ttl: Duration,
    },
}

/// The query cache of one instance.
pub struct QueryCache {
    backend: Backend,
    hits: AtomicU64,
    misses: AtomicU64,
}

/// Hit and miss counts since start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
}

pub fn conversations_key(user_id: i64) -> String {
    format!("convs:{user_id}")
}

impl QueryCache {
    pub fn moka(max_entries: u64, ttl: Duration) -> Self {
        Self::with(Backend::Moka(
            moka::future::Cache::builder()
                .max_capacity(max_entries)
                .time_to_live(ttl)
                .build(),
        ))
    }

    pub fn redis(conn: redis::aio::ConnectionManager, gate: Arc<RedisGate>, prefix: &str, ttl: Duration) -> Self {
        Self::with(Backend::Redis {
            conn,
            gate,
            prefix: format!("{prefix}wingman:cache:"),
            ttl,
        })
    }

    fn with(backend: Backend) -> Self {
        Self {
            backend,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self.backend {
            Backend::Moka(_) => "moka",
            Backend::Redis { .. } => "redis",
        }
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
        }
    }

    fn count(&self, hit: bool) {
        let (counter, result) = if hit {
            (&self.hits, "hit")
        } else {
            (&self.misses, "miss")
        };
        counter.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("cache_requests_total", "cache" => self.kind(), "result" => result).increment(1);
    }

    /// The cached value, counting a hit or a miss.
    pub async fn get<T: DeserializeOwned>(&self, key: &str) -> Option<T> {
        let bytes: Option<Vec<u8>> = match &self.backend {
            Backend::Moka(c) => c.get(key).await.map(|b| b.to_vec()),
            Backend::Redis { conn, gate, prefix, .. } => {
                let mut conn = conn.clone();
                let mut cmd = redis::cmd("GET");
                cmd.arg(format!("{prefix}{key}"));
                gate.run("cache_get", cmd.query_async::<Option<Vec<u8>>>(&mut conn))
                    .await
                    .flatten()
            }
        };
        let value = bytes.and_then(|b| serde_json::from_slice(&b).ok());
        self.count(value.is_some());
        value
    }

    pub async fn put<T: Serialize>(&self, key: &str, value: &T) {
        let Ok(bytes) = serde_json::to_vec(value) else { return };
        match &self.backend {
            Backend::Moka(c) => c.insert(key.to_string(), Arc::from(bytes)).await,
            Backend::Redis {
                conn,
                gate,
                prefix,
                ttl,
            } => {
                let mut conn = conn.clone();
                let mut cmd = redis::cmd("SET");
                cmd.arg(format!("{prefix}{key}"))
                    .arg(bytes)
                    .arg("PX")
                    .arg(ttl.as_millis() as u64);
                gate.run("cache_put", cmd.query_async::<()>(&mut conn)).await;
            }
        }
    }

    pub async fn invalidate(&self, keys: &[String]) {
        match &self.backend {
            Backend::Moka(c) => {
                for k in keys {
                    c.invalidate(k).await;
                }
            }
            Backend::Redis { conn, gate, prefix, .. } => {
                let mut conn = conn.clone();
                let mut cmd = redis::cmd("DEL");
                for k in keys {
                    cmd.arg(format!("{prefix}{k}"));
                }
                // A failed delete leaves an entry that expires after `cache.ttl`.
                gate.run("cache_del", cmd.query_async::<i64>(&mut conn)).await;
            }
        }
    }

    /// Invalidation driven by bus events from other instances of the same process
    /// (Redis entries were already deleted by the writer).
    pub async fn on_event(&self, env: &Envelope) {
        if !matches!(self.backend, Backend::Moka(_)) {
            return;
        }
        if matches!(env.event, Event::Message { .. } | Event::ConversationChanged { .. }) {
            self.invalidate(&[conversations_key(env.user_id)]).await;
        }
    }
}
