//! Operations endpoints: `/healthz` (liveness), `/readyz` (database and Redis reachable,
//! 503 otherwise) and `/api/info` (public data) on the public listener; `/metrics`
//! (Prometheus text) only on the metrics listener ([`metrics_router`]).

use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use super::{public, AppState};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/api/info", get(info))
}

/// The metrics listener's routes: `/metrics`, nothing else.
pub fn metrics_router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .fallback(|| async { super::error::ApiError::NotFound })
        .with_state(state)
}

const NO_STORE: [(header::HeaderName, HeaderValue); 1] =
    [(header::CACHE_CONTROL, HeaderValue::from_static("no-store"))];

async fn healthz() -> impl IntoResponse {
    (NO_STORE, Json(json!({ "status": "ok" })))
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let limit = Duration::from_secs(2);
    let db = match tokio::time::timeout(limit, state.store.ping()).await {
        Ok(Ok(())) => "ok".to_string(),
        Ok(Err(e)) => e.to_string(),
        Err(_) => "timeout".to_string(),
    };
    let redis = match &state.redis {
        None => "disabled".to_string(),
        Some(conn) => {
            let mut conn = conn.clone();
            match tokio::time::timeout(limit, redis::cmd("PING").query_async::<String>(&mut conn)).await {
                Ok(Ok(_)) => "ok".to_string(),
                Ok(Err(e)) => e.to_string(),
                Err(_) => "timeout".to_string(),
            }
        }
    };
    let shutting_down = state.shutdown.is_cancelled();
    let ready = db == "ok" && (redis == "ok" || redis == "disabled") && !shutting_down;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        NO_STORE,
        Json(json!({
            "status": if ready { "ready" } else { "unavailable" },
            "database": db,
            "redis": redis,
            "shutting_down": shutting_down,
        })),
    )
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let inst = state.instance.clone();
    let pool = state.store.pool_stats();
    metrics::gauge!("db_pool_connections", "state" => "idle", "instance" => inst.clone()).set(f64::from(pool.idle));
    metrics::gauge!("db_pool_connections", "state" => "in_use", "instance" => inst.clone())
        .set(f64::from(pool.size.saturating_sub(pool.idle)));
    metrics::gauge!("ws_connections_active", "instance" => inst.clone()).set(state.hub.connections() as f64);
    match tokio::time::timeout(Duration::from_secs(2), state.queues.depth()).await {
        Ok(Ok(depth)) => {
            metrics::gauge!("jobs_queue_depth", "queue" => "ai", "instance" => inst.clone()).set(depth.ai as f64);
            metrics::gauge!("jobs_queue_depth", "queue" => "heavy", "instance" => inst).set(depth.heavy as f64);
        }
        Ok(Err(e)) => tracing::warn!(error = %e, "queue depth unavailable"),
        Err(_) => tracing::warn!("queue depth timed out"),
    }
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        )],
        NO_STORE,
        state.metrics.render(),
    )
}

/// Public, cacheable data about this deployment.
async fn info(State(state): State<AppState>) -> impl IntoResponse {
    let s = &state.settings;
    (
        public(60),
        Json(json!({
            "name": "wingman-app",
            "version": env!("CARGO_PKG_VERSION"),
            "provider": s.llm.provider,
            "limits": { "max_message_bytes": s.limits.max_message_bytes, "max_page": s.limits.max_page },
        })),
    )
}
