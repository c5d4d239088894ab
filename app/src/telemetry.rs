//! Logging and metrics: the process-wide Prometheus recorder (histograms with buckets,
//! so they aggregate across instances) and [`QueryCounter`], a tracing layer that counts
//! the SQL statements sqlx runs for the app's tables (used by the N+1 regression test).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::Context;
use tracing_subscriber::Layer;

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Inserts per group commit (`db_message_batch_size`; at most `store::batch::MAX_BATCH`).
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// The Prometheus recorder, installed once per process and shared by all instances in it.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full("db_message_batch_size".into()), BATCH_BUCKETS))
                .map(|b| b.build_recorder())
                .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
            let handle = recorder.handle();
            // Fails only if the embedding program installed its own recorder first;
            // then our metrics go there and /metrics renders an empty registry.
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
            }
            handle
        })
        .clone()
}

/// Installs a fmt subscriber honouring `RUST_LOG` (default `info`). For the binary.
pub fn init_logging() {
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::fmt::layer())
        .try_init();
}

/// Counts `sqlx::query` events (one per executed statement) that touch the app's own
/// tables, ignoring the job queue's and transaction control (BEGIN/COMMIT/…). Enable it with a subscriber that lets
/// `sqlx::query=debug` through.
#[derive(Debug, Clone, Default)]
pub struct QueryCounter {
    count: Arc<AtomicU64>,
    log: Arc<std::sync::Mutex<Vec<String>>>,
}

impl QueryCounter {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn get(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }
    /// The statements counted from position `from` on (for assertion messages).
    pub fn statements_since(&self, from: u64) -> Vec<String> {
        self.log
            .lock()
            .map(|l| l.iter().skip(from as usize).cloned().collect())
            .unwrap_or_default()
    }
}

#[derive(Default)]
struct SqlText(String);

impl Visit for SqlText {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "summary" || field.name() == "db.statement" {
            self.0.push_str(value);
            self.0.push(' ');
        }
    }
    fn record_debug(&mut self, _field: &Field, _value: &dyn std::fmt::Debug) {}
}

impl<S: tracing::Subscriber> Layer<S> for QueryCounter {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        if event.metadata().target() != "sqlx::query" {
            return;
        }
        let mut sql = SqlText::default();
        event.record(&mut sql);
        let text = sql.0.to_ascii_lowercase();
        // Transaction control carries no table name, so it cannot be attributed (the job
        // queue's transactions would be counted); only data statements are counted.
        let first = text.split_whitespace().next().unwrap_or("");
        if matches!(first, "begin" | "commit" | "rollback" | "savepoint" | "release") {
            return;
        }
        // sqlx's own catalog lookups (PostgreSQL type OIDs of the job queue's custom types)
        if text.contains("pg_catalog") {
            return;
        }
        // apalis tables (`Jobs`, `Workers`, `apalis.*`) and migration bookkeeping
        if text.starts_with("pragma")
            || text.contains("jobs")
            || text.contains("workers")
            || text.contains("apalis")
            || text.contains("_sqlx_migrations")
        {
            return;
        }
        if let Ok(mut log) = self.log.lock() {
            log.push(text);
        }
        self.count.fetch_add(1, Ordering::SeqCst);
    }
}
