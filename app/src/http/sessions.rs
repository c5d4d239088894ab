//! Sessions: bearer-token authentication with its in-process cache ([`AuthCache`]),
//! logout (`POST /api/logout` ends this session, `POST /api/logout?all=1` every session
//! of the user) and the periodic pruning of expired sessions.
//!
//! A cached lookup is never used past its session's expiry, and a logout takes effect at
//! once: the session rows are deleted, this instance drops its cached lookups and closes
//! the session's WebSockets, and a [`Event::SessionsRevoked`] on the event bus makes every
//! other instance do the same (as soon as it arrives: the bus delivers at most once, so
//! an instance the event does not reach keeps a cached lookup for `cache.auth_ttl` at
//! most).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::post;
use axum::Router;
use serde::Deserialize;

use super::error::ApiError;
use super::extract::{hash_token, ApiQuery, AuthSession};
use super::AppState;
use crate::bus::{Envelope, Event};
use crate::store::{now_ms, Store, User};

pub fn router() -> Router<AppState> {
    Router::new().route("/api/logout", post(logout))
}

/// An authenticated session.
#[derive(Debug, Clone)]
pub struct Session {
    pub user: User,
    /// SHA-256 of the bearer token (the key of its row and of its cached lookup).
    pub token_hash: String,
    /// When the session ends (Unix milliseconds).
    pub expires_at: i64,
}

#[derive(Clone)]
struct Cached {
    user: User,
    expires_at: i64,
}

/// Token lookups of this instance. A lookup that raced a revocation cannot be put back
/// after the revocation dropped it: every revocation bumps `epoch` (after the rows are
/// deleted, before the entries are dropped), and a lookup that saw the epoch move while
/// it read the database drops what it has just inserted.
pub struct AuthCache {
    entries: moka::future::Cache<String, Cached>,
    epoch: AtomicU64,
}

impl AuthCache {
    pub fn new(ttl: Duration) -> Self {
        Self {
            entries: moka::future::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(ttl)
                .build(),
            epoch: AtomicU64::new(0),
        }
    }

    /// Drops the cached lookup of one token, or every cached lookup (`None`); call after
    /// the database no longer has what they cached.
    pub async fn forget(&self, token_hash: Option<&str>) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        match token_hash {
            Some(key) => self.entries.invalidate(key).await,
            None => self.entries.invalidate_all(),
        }
    }
}

/// Resolves a bearer token: from the cache while its session is unexpired, else from
/// the database (then cached for at most `cache.auth_ttl`).
pub async fn authenticate(state: &AppState, token: &str) -> Result<Session, ApiError> {
    if token.is_empty() || token.len() > 256 {
        return Err(ApiError::Unauthorized);
    }
    let key = hash_token(token);
    let cache = &state.auth_cache;
    let now = now_ms();
    if let Some(hit) = cache.entries.get(&key).await {
        if hit.expires_at > now {
            return Ok(Session {
                user: hit.user,
                token_hash: key,
                expires_at: hit.expires_at,
            });
        }
        cache.entries.invalidate(&key).await;
    }
    let epoch = cache.epoch.load(Ordering::SeqCst);
    let found = state
        .store
        .session_user(&key, now)
        .await?
        .ok_or(ApiError::Unauthorized)?;
    cache
        .entries
        .insert(
            key.clone(),
            Cached {
                user: found.user.clone(),
                expires_at: found.expires_at,
            },
        )
        .await;
    if cache.epoch.load(Ordering::SeqCst) != epoch {
        // a revocation ran meanwhile: what was just read may be what it deleted
        cache.entries.invalidate(&key).await;
    }
    Ok(Session {
        user: found.user,
        token_hash: key,
        expires_at: found.expires_at,
    })
}

/// What this instance does when sessions of `user_id` end (one, or all with `None`):
/// drop their cached lookups and close their WebSockets. Runs for revocations made here
/// and for those other instances announce on the bus.
pub async fn on_revoked(state: &AppState, user_id: i64, token_hash: Option<&str>) {
    state.auth_cache.forget(token_hash).await;
    state.hub.revoke(user_id, token_hash);
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LogoutQuery {
    all: Option<String>,
}

async fn logout(
    State(state): State<AppState>,
    AuthSession(session): AuthSession,
    ApiQuery(q): ApiQuery<LogoutQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let all = match q.all.as_deref() {
        None | Some("0") | Some("false") => false,
        Some("1") | Some("true") => true,
        Some(_) => return Err(ApiError::bad("all", "must be 1 or true (or 0, false)")),
    };
    let user_id = session.user.id;
    let token_hash = if all {
        state.store.delete_user_sessions(user_id).await?;
        None
    } else {
        state.store.delete_session(&session.token_hash).await?;
        Some(session.token_hash)
    };
    on_revoked(&state, user_id, token_hash.as_deref()).await;
    let event = Event::SessionsRevoked { token_hash };
    if let Err(e) = state.bus.publish(&Envelope { user_id, event }).await {
        tracing::warn!(error = %e, "session revocation not published; other instances drop it within cache.auth_ttl");
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Deletes expired sessions now and every `interval` until `stop`.
pub async fn prune_expired(
    store: std::sync::Arc<dyn Store>,
    interval: Duration,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        match store.prune_sessions(now_ms()).await {
            Ok(n) => {
                metrics::counter!("sessions_pruned_total").increment(n);
                if n > 0 {
                    tracing::debug!(sessions = n, "expired sessions pruned");
                }
            }
            Err(e) => tracing::warn!(error = %e, "pruning expired sessions failed"),
        }
    }
}
