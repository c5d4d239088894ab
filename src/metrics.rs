//! Prometheus metrics of the edge, in one registry served by the admin listener.
//!
//! Counters and histograms are updated on the request path (mostly in `logging`,
//! which runs exactly once per request). Gauges that mirror runtime state (server
//! health, in-flight and queued requests) are filled from the current snapshot when
//! `/metrics` is scraped, so removed servers disappear from the output.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::snapshot::Snapshot;

/// Request duration buckets, in seconds: fine below 100 ms, where the edge lives.
const DURATION_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

pub struct Metrics {
    registry: Registry,
    /// The access log whose counters `render` copies into the two series below.
    access_log: parking_lot::Mutex<Option<std::sync::Arc<crate::accesslog::AccessLog>>>,
    access_log_lines: IntCounterVec,
    access_log_reopens: IntCounterVec,
    pub requests: IntCounterVec,
    pub duration: HistogramVec,
    pub connect_failures: IntCounterVec,
    pub retries: IntCounterVec,
    pub ejections: IntCounterVec,
    pub ejections_refused: IntCounterVec,
    pub panic: IntCounterVec,
    pool_panic: IntGaugeVec,
    pub health_changes: IntCounterVec,
    pub queue_rejections: IntCounterVec,
    pub websockets_active: IntGauge,
    pub reloads: IntCounterVec,
    pub generation: IntGauge,
    pub restart_needed: IntGauge,
    pub rejected_requests: IntCounterVec,
    server_healthy: IntGaugeVec,
    server_in_flight: IntGaugeVec,
    pool_in_flight: IntGaugeVec,
    pool_queued: IntGaugeVec,
    pub queue_wait: Histogram,
    pub upstream_requests: IntCounter,
    pub compression_bytes: IntCounterVec,
    pub compressed_responses: IntCounterVec,
    pub buffered_responses: IntCounterVec,
    pub buffered_requests: IntCounterVec,
    pub buffer_spills: IntCounterVec,
    pub buffer_refusals: IntCounterVec,
    buffer_bytes: IntGaugeVec,
    buffer_limit: IntGaugeVec,
    pub body_too_large: IntCounter,
    pub cache_lookups: IntCounterVec,
    pub cache_purges: IntCounterVec,
    pub cache_lock_waits: IntCounter,
    pub cache_bytes: IntGauge,
    pub cache_objects: IntGauge,
    pub cache_evictions: IntGauge,
    pub rate_limited: IntCounterVec,
    pub upgrade_failures: IntCounter,
}

fn must<T>(r: prometheus::Result<T>) -> T {
    // metric definitions are static: a failure here is a programming error
    r.unwrap_or_else(|e| panic!("invalid metric definition: {e}"))
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        macro_rules! reg {
            ($m:expr) => {{
                let m = must($m);
                must(registry.register(Box::new(m.clone())));
                m
            }};
        }
        let counter = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels)
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            IntGaugeVec::new(Opts::new(name, help), labels)
        };
        Metrics {
            requests: reg!(counter(
                "wingman_edge_requests_total",
                "Requests answered, by route and status class",
                &["route", "class"]
            )),
            duration: reg!(HistogramVec::new(
                HistogramOpts::new(
                    "wingman_edge_request_duration_seconds",
                    "Time from request header to end of response, by route"
                )
                .buckets(DURATION_BUCKETS.to_vec()),
                &["route"]
            )),
            connect_failures: reg!(counter(
                "wingman_edge_upstream_connect_failures_total",
                "Failed connection attempts to upstream servers",
                &["pool", "server"]
            )),
            retries: reg!(counter(
                "wingman_edge_upstream_retries_total",
                "Requests retried on another server",
                &["pool"]
            )),
            ejections: reg!(counter(
                "wingman_edge_upstream_ejections_total",
                "Servers ejected by passive failure tracking",
                &["pool", "server"]
            )),
            ejections_refused: reg!(counter(
                "wingman_edge_upstream_ejections_refused_total",
                "Ejections not done because the server was its pool's last available one",
                &["pool", "server"]
            )),
            panic: reg!(counter(
                "wingman_edge_upstream_panic_total",
                "Attempts balanced across every server of a pool because too few were available (panic mode)",
                &["pool"]
            )),
            pool_panic: reg!(gauge(
                "wingman_edge_upstream_pool_panic",
                "1 while a pool is in panic mode (fewer servers available than panic_threshold)",
                &["pool"]
            )),
            health_changes: reg!(counter(
                "wingman_edge_upstream_health_changes_total",
                "Active health check transitions, by new state",
                &["pool", "server", "state"]
            )),
            queue_rejections: reg!(counter(
                "wingman_edge_upstream_queue_rejections_total",
                "Requests answered 503 because the pool queue was full or timed out",
                &["pool", "reason"]
            )),
            websockets_active: reg!(IntGauge::new(
                "wingman_edge_websockets_active",
                "Upgraded WebSocket connections open now"
            )),
            reloads: reg!(counter(
                "wingman_edge_config_reloads_total",
                "Configuration reloads, by result",
                &["result"]
            )),
            generation: reg!(IntGauge::new(
                "wingman_edge_config_generation",
                "Generation of the configuration in use"
            )),
            restart_needed: reg!(IntGauge::new(
                "wingman_edge_config_restart_needed",
                "1 when the loaded config changes listeners, which needs a restart or upgrade"
            )),
            rejected_requests: reg!(counter(
                "wingman_edge_rejected_requests_total",
                "Requests the edge refused before routing, by status",
                &["status"]
            )),
            server_healthy: reg!(gauge(
                "wingman_edge_upstream_server_up",
                "1 when a server is healthy, not ejected and not disabled",
                &["pool", "server"]
            )),
            server_in_flight: reg!(gauge(
                "wingman_edge_upstream_server_in_flight",
                "Requests in flight to a server",
                &["pool", "server"]
            )),
            pool_in_flight: reg!(gauge(
                "wingman_edge_upstream_pool_in_flight",
                "Requests in flight to a pool",
                &["pool"]
            )),
            pool_queued: reg!(gauge(
                "wingman_edge_upstream_pool_queued",
                "Requests waiting in a pool's queue",
                &["pool"]
            )),
            queue_wait: reg!(Histogram::with_opts(
                HistogramOpts::new(
                    "wingman_edge_upstream_queue_wait_seconds",
                    "Time requests spent waiting for a server"
                )
                .buckets(DURATION_BUCKETS.to_vec())
            )),
            upstream_requests: reg!(IntCounter::new(
                "wingman_edge_upstream_attempts_total",
                "Attempts to send a request to an upstream server"
            )),
            compression_bytes: reg!(counter(
                "wingman_edge_compression_bytes_total",
                "Bytes into and out of the response compressors, by algorithm",
                &["algorithm", "direction"]
            )),
            compressed_responses: reg!(counter(
                "wingman_edge_compressed_responses_total",
                "Responses compressed by the edge, by algorithm",
                &["algorithm"]
            )),
            buffered_responses: reg!(counter(
                "wingman_edge_buffered_responses_total",
                "Responses buffered before sending, by where they ended up (memory, file, streamed)",
                &["outcome"]
            )),
            buffered_requests: reg!(counter(
                "wingman_edge_buffered_requests_total",
                "Request bodies read before contacting an upstream, by storage (memory, file; streamed: the budgets held only their start)",
                &["storage"]
            )),
            buffer_spills: reg!(counter(
                "wingman_edge_buffer_spills_total",
                "Bodies spooled to a temporary file, by kind (request, response)",
                &["kind"]
            )),
            buffer_refusals: reg!(counter(
                "wingman_edge_buffer_budget_refusals_total",
                "Bodies a full buffering budget refused (memory: spooled to disk sooner; disk: streamed), by kind",
                &["kind", "storage"]
            )),
            buffer_bytes: reg!(gauge(
                "wingman_edge_buffer_bytes",
                "Bytes of buffered bodies held now, by storage (memory, disk)",
                &["storage"]
            )),
            buffer_limit: reg!(gauge(
                "wingman_edge_buffer_limit_bytes",
                "The buffering budgets (server.buffer_memory, server.buffer_disk), by storage",
                &["storage"]
            )),
            body_too_large: reg!(IntCounter::new(
                "wingman_edge_request_body_too_large_total",
                "Requests answered 413 for a body above client_max_body_size"
            )),
            cache_lookups: reg!(counter(
                "wingman_edge_cache_lookups_total",
                "Cache lookups by result (hit, stale, miss, expired, bypass, uncacheable)",
                &["result"]
            )),
            cache_purges: reg!(counter(
                "wingman_edge_cache_purges_total",
                "Cached responses removed, by cause (admin, invalidation)",
                &["cause"]
            )),
            cache_lock_waits: reg!(IntCounter::new(
                "wingman_edge_cache_lock_waits_total",
                "Requests that waited for another request's origin fetch of the same key"
            )),
            cache_bytes: reg!(IntGauge::new(
                "wingman_edge_cache_bytes",
                "Bytes of responses stored in the cache"
            )),
            cache_objects: reg!(IntGauge::new(
                "wingman_edge_cache_objects",
                "Responses stored in the cache"
            )),
            cache_evictions: reg!(IntGauge::new(
                "wingman_edge_cache_evictions",
                "Responses evicted from the cache since start"
            )),
            rate_limited: reg!(counter(
                "wingman_edge_rate_limited_total",
                "Requests answered 429 by a route's rate limit",
                &["route"]
            )),
            access_log: parking_lot::Mutex::new(None),
            access_log_lines: reg!(counter(
                "wingman_edge_access_log_lines_total",
                "Access log lines by result: written, dropped (queue full), write_error (lost)",
                &["result"]
            )),
            access_log_reopens: reg!(counter(
                "wingman_edge_access_log_reopens_total",
                "Access log file reopens (SIGHUP, for logrotate) by result: ok, failed",
                &["result"]
            )),
            upgrade_failures: reg!(IntCounter::new(
                "wingman_edge_upgrade_failures_total",
                "Binary upgrades given up (the new process was not ready in time); this process kept serving"
            )),
            registry,
        }
    }

    pub fn health_transitions(&self, pool: &str, server: &str, healthy: bool) {
        let state = if healthy { "up" } else { "down" };
        self.health_changes
            .with_label_values(&[pool, server, state])
            .inc();
    }

    /// Counts one buffered body (`kind`: request or response): where it ended up
    /// (`outcome`), whether it went to a file, which budgets refused it.
    pub fn buffered_body(
        &self,
        kind: &str,
        outcome: &str,
        spilled: bool,
        refused: crate::buffer::Refusals,
    ) {
        let by_outcome = match kind {
            "request" => &self.buffered_requests,
            _ => &self.buffered_responses,
        };
        by_outcome.with_label_values(&[outcome]).inc();
        if spilled {
            self.buffer_spills.with_label_values(&[kind]).inc();
        }
        for storage in refused.labels() {
            self.buffer_refusals
                .with_label_values(&[kind, storage])
                .inc();
        }
    }

    /// Renders the text exposition, after filling the state gauges from `snap`.
    /// Makes `render` report this access log's counters.
    pub fn watch_access_log(&self, log: std::sync::Arc<crate::accesslog::AccessLog>) {
        *self.access_log.lock() = Some(log);
    }

    /// Copies the access log's own counters (kept off the request path by the log)
    /// into their series.
    fn sync_access_log(&self) {
        // held throughout, so two renders never both add the same difference
        let guard = self.access_log.lock();
        let Some(log) = guard.as_ref() else {
            return;
        };
        let catch_up = |c: &IntCounterVec, label: &str, now: u64| {
            let c = c.with_label_values(&[label]);
            c.inc_by(now.saturating_sub(c.get()));
        };
        catch_up(&self.access_log_lines, "written", log.written());
        catch_up(&self.access_log_lines, "dropped", log.dropped());
        catch_up(&self.access_log_lines, "write_error", log.write_errors());
        catch_up(&self.access_log_reopens, "ok", log.reopens());
        catch_up(&self.access_log_reopens, "failed", log.reopen_failures());
    }

    pub fn render(&self, snap: &Snapshot) -> Vec<u8> {
        self.sync_access_log();
        self.server_healthy.reset();
        self.server_in_flight.reset();
        self.pool_in_flight.reset();
        self.pool_queued.reset();
        self.pool_panic.reset();
        for pool in &snap.pools {
            for s in &pool.servers {
                let l = [pool.name.as_str(), s.label.as_str()];
                self.server_healthy
                    .with_label_values(&l)
                    .set(s.state.available() as i64);
                self.server_in_flight
                    .with_label_values(&l)
                    .set(s.state.in_flight() as i64);
            }
            self.pool_in_flight
                .with_label_values(&[pool.name.as_str()])
                .set(pool.in_flight() as i64);
            self.pool_queued
                .with_label_values(&[pool.name.as_str()])
                .set(pool.state.queued() as i64);
            self.pool_panic
                .with_label_values(&[pool.name.as_str()])
                .set(pool.in_panic() as i64);
        }
        let b = &snap.buffers;
        for (storage, used, limit) in [
            ("memory", b.used.memory(), b.memory),
            ("disk", b.used.disk(), b.disk),
        ] {
            let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
            self.buffer_bytes
                .with_label_values(&[storage])
                .set(clamp(used));
            self.buffer_limit
                .with_label_values(&[storage])
                .set(clamp(limit));
        }
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            log::error!("encoding metrics: {e}");
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// `2xx`, `4xx`, ... for a status code.
pub fn status_class(code: u16) -> &'static str {
    match code {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        500..=599 => "5xx",
        _ => "none",
    }
}
