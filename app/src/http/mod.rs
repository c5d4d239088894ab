//! The HTTP API: shared [`AppState`], the router assembled from one module per resource,
//! and the middleware (per-route duration histogram, request timeout, body limit).

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::bus::EventBus;
use crate::cache::QueryCache;
use crate::config::Settings;
use crate::jobs::Queues;
use crate::store::Store;
use crate::ws::Hub;

pub mod conversations;
pub mod error;
pub mod extract;
pub mod health;
pub mod messages;
pub mod sessions;
pub mod throttle;
pub mod users;
pub mod web;

/// Everything a handler can reach; cheap to clone.
#[derive(Clone)]
pub struct AppState(pub Arc<Inner>);

pub struct Inner {
    pub settings: Settings,
    pub instance: String,
    pub store: Arc<dyn Store>,
    pub cache: Arc<QueryCache>,
    pub auth_cache: sessions::AuthCache,
    /// Failed-login counters per user name and client address.
    pub login_throttle: throttle::LoginThrottle,
    /// What a login for an unknown user name is checked against (see `users::dummy_hash`).
    pub dummy_hash: String,
    pub bus: Arc<dyn EventBus>,
    pub hub: Arc<Hub>,
    pub queues: Queues,
    pub redis: Option<redis::aio::ConnectionManager>,
    pub metrics: PrometheusHandle,
    /// Cancelled when shutdown begins (WebSockets close, workers drain).
    pub shutdown: CancellationToken,
    /// WebSocket tasks, awaited on shutdown.
    pub ws_tasks: TaskTracker,
}

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

/// `Cache-Control` for per-user responses: the edge and shared caches must not store them.
pub fn private() -> [(header::HeaderName, HeaderValue); 1] {
    [(header::CACHE_CONTROL, HeaderValue::from_static("private, no-cache"))]
}

/// `Cache-Control` for public data and static assets.
pub fn public(max_age_secs: u64) -> [(header::HeaderName, HeaderValue); 1] {
    let v =
        HeaderValue::from_str(&format!("public, max-age={max_age_secs}")).unwrap_or(HeaderValue::from_static("public"));
    [(header::CACHE_CONTROL, v)]
}

pub fn router(state: AppState) -> Router {
    let body_limit = state.settings.limits.max_body_bytes;
    Router::new()
        .merge(users::router())
        .merge(sessions::router())
        .merge(conversations::router())
        .merge(messages::router())
        .merge(health::router())
        .merge(web::router())
        .route("/ws", axum::routing::get(crate::ws::upgrade))
        .fallback(|| async { error::ApiError::NotFound })
        .layer(axum::middleware::from_fn_with_state(state.clone(), observe))
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state)
}

/// Records `http_server_request_duration_seconds{method,route,status}` and applies the
/// request timeout (503) to everything but the WebSocket upgrade.
async fn observe(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = req.method().as_str().to_string();
    let start = Instant::now();
    metrics::gauge!("http_server_requests_in_flight").increment(1.0);
    let resp = if route == "/ws" {
        next.run(req).await
    } else {
        match tokio::time::timeout(state.settings.server.request_timeout, next.run(req)).await {
            Ok(r) => r,
            Err(_) => error::ApiError::Unavailable("request timed out".into()).into_response(),
        }
    };
    metrics::gauge!("http_server_requests_in_flight").decrement(1.0);
    let status = resp.status();
    metrics::histogram!(
        "http_server_request_duration_seconds",
        "method" => method,
        "route" => route,
        "status" => status.as_u16().to_string()
    )
    .record(start.elapsed().as_secs_f64());
    if status == StatusCode::PAYLOAD_TOO_LARGE
        && resp
            .headers()
            .get(header::CONTENT_TYPE)
            .is_none_or(|v| v != "application/json")
    {
        // axum's own body-limit rejection: give it the API's JSON shape
        return error::ApiError::TooLarge {
            field: None,
            message: "request body too large".into(),
        }
        .into_response();
    }
    resp
}
