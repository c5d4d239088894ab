//! The circuit breaker in front of Redis that the query cache and the event bus
//! share. Its own home, so that neither of them depends on the other for it.

use std::future::Future;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

/// Fails Redis operations fast while Redis is known to be down (a small circuit breaker
/// shared by the cache and the bus), so requests never queue behind a dead server.
#[derive(Debug)]
pub struct RedisGate {
    down_until_ms: AtomicI64,
    op_timeout: Duration,
    retry_after: Duration,
}

impl RedisGate {
    pub fn new(op_timeout: Duration, retry_after: Duration) -> Self {
        Self {
            down_until_ms: AtomicI64::new(0),
            op_timeout,
            retry_after,
        }
    }

    /// Runs `f` unless Redis failed within `retry_after`; `None` on any failure.
    pub async fn run<T>(&self, op: &'static str, f: impl Future<Output = redis::RedisResult<T>>) -> Option<T> {
        let now = crate::store::now_ms();
        if now < self.down_until_ms.load(Ordering::Relaxed) {
            return None;
        }
        match tokio::time::timeout(self.op_timeout, f).await {
            Ok(Ok(v)) => Some(v),
            other => {
                if let Ok(Err(e)) = other {
                    tracing::warn!(op, error = %e, "redis operation failed");
                } else {
                    tracing::warn!(op, "redis operation timed out");
                }
                metrics::counter!("redis_errors_total", "op" => op).increment(1);
                self.down_until_ms
                    .store(now + self.retry_after.as_millis() as i64, Ordering::Relaxed);
                None
            }
        }
    }
}
