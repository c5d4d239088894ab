//! Users: registration (`POST /api/users`), login (`POST /api/login`, throttled per user
//! name and client address, the same Argon2 work for unknown names) and the profile
//! (`GET`/`PATCH /api/me`). Passwords are hashed with Argon2id off the async threads;
//! tokens are 256-bit random values stored as SHA-256 hashes.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use std::net::SocketAddr;

use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use super::error::ApiError;
use super::extract::{hash_token, ApiJson, AuthUser};
use super::{private, AppState};
use crate::config::AuthSettings;
use crate::store::{now_ms, User};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/users", post(register))
        .route("/api/login", post(login))
        .route("/api/me", get(me).patch(update_me))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Register {
    username: String,
    password: String,
    #[serde(default)]
    display_name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Login {
    username: String,
    password: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateProfile {
    display_name: String,
}

fn validate_username(name: &str) -> Result<(), ApiError> {
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if !(3..=32).contains(&name.len()) || !ok_chars {
        return Err(ApiError::invalid(
            "username",
            "3 to 32 characters: letters, digits, _ - .",
        ));
    }
    Ok(())
}

fn validate_display_name(name: &str) -> Result<(), ApiError> {
    if name.trim().is_empty() || name.chars().count() > 64 {
        return Err(ApiError::invalid("display_name", "1 to 64 characters"));
    }
    Ok(())
}

/// Bounds concurrent password hashes to the CPU count: each Argon2 hash holds
/// `auth.argon2_memory_kib` of memory, and a burst of logins must queue, not allocate
/// gigabytes at once.
fn hash_slots() -> &'static tokio::sync::Semaphore {
    static SLOTS: std::sync::OnceLock<tokio::sync::Semaphore> = std::sync::OnceLock::new();
    SLOTS
        .get_or_init(|| tokio::sync::Semaphore::new(std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2)))
}

fn argon2(a: &AuthSettings) -> Result<Argon2<'static>, ApiError> {
    let params = Params::new(a.argon2_memory_kib, a.argon2_iterations, 1, None)
        .map_err(|e| ApiError::Internal(format!("argon2 params: {e}")))?;
    Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
}

/// Hashes `password` with a fresh salt (blocking: run off the async threads).
fn hash_password(hasher: &Argon2<'static>, password: &[u8]) -> Result<String, String> {
    let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>()).map_err(|e| e.to_string())?;
    hasher
        .hash_password(password, &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// A hash of a random password with the configured cost, made once at start: a login
/// for a user name that does not exist is checked against it, so it costs the same
/// Argon2 work as a wrong password (the time does not tell whether a name exists).
pub async fn dummy_hash(auth: &AuthSettings) -> Result<String, String> {
    let hasher = argon2(auth).map_err(|e| e.to_string())?;
    tokio::task::spawn_blocking(move || hash_password(&hasher, &rand::random::<[u8; 32]>()))
        .await
        .map_err(|e| e.to_string())?
}

async fn issue_token(state: &AppState, user: &User) -> Result<String, ApiError> {
    let token = hex::encode(rand::random::<[u8; 32]>());
    let expires = now_ms() + state.settings.auth.token_ttl.as_millis() as i64;
    state
        .store
        .create_session(&hash_token(&token), user.id, expires)
        .await?;
    Ok(token)
}

async fn register(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<Register>,
) -> Result<impl IntoResponse, ApiError> {
    validate_username(&body.username)?;
    if !(8..=256).contains(&body.password.len()) {
        return Err(ApiError::invalid("password", "8 to 256 bytes"));
    }
    let display_name = body.display_name.unwrap_or_else(|| body.username.clone());
    validate_display_name(&display_name)?;
    let hasher = argon2(&state.settings.auth)?;
    let password = body.password;
    let _slot = hash_slots()
        .acquire()
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let hash = tokio::task::spawn_blocking(move || hash_password(&hasher, password.as_bytes()))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(ApiError::Internal)?;
    let user = state.store.create_user(&body.username, &hash, &display_name).await?;
    let token = issue_token(&state, &user).await?;
    Ok((
        StatusCode::CREATED,
        private(),
        Json(json!({ "user": user, "token": token })),
    ))
}

/// Checks a password. Every attempt costs one Argon2 verification, whether the user
/// exists or not; a name or client address whose failures are used up gets 429 with
/// Retry-After before any password check (see [`super::throttle`]).
async fn login(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ApiJson(body): ApiJson<Login>,
) -> Result<impl IntoResponse, ApiError> {
    let attempt = state
        .login_throttle
        .begin(&body.username, peer.ip())
        .await
        .map_err(|retry_after_secs| {
            metrics::counter!("login_throttled_total").increment(1);
            ApiError::TooManyRequests { retry_after_secs }
        })?;
    let creds = state.store.credentials(&body.username).await?;
    let hasher = argon2(&state.settings.auth)?;
    let stored = match &creds {
        Some(c) => c.password_hash.clone(),
        None => state.dummy_hash.clone(),
    };
    let password = body.password;
    let _slot = hash_slots()
        .acquire()
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let verified = tokio::task::spawn_blocking(move || {
        PasswordHash::new(&stored)
            .map(|h| hasher.verify_password(password.as_bytes(), &h).is_ok())
            .unwrap_or(false)
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))?;
    let Some(creds) = creds.filter(|_| verified) else {
        metrics::counter!("login_failures_total").increment(1);
        state.login_throttle.failed(attempt).await;
        return Err(ApiError::Unauthorized);
    };
    state.login_throttle.succeeded(attempt).await;
    let user = creds.user();
    let token = issue_token(&state, &user).await?;
    Ok((private(), Json(json!({ "user": user, "token": token }))))
}

async fn me(AuthUser(user): AuthUser) -> impl IntoResponse {
    (private(), Json(json!({ "user": user })))
}

async fn update_me(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    ApiJson(body): ApiJson<UpdateProfile>,
) -> Result<impl IntoResponse, ApiError> {
    validate_display_name(&body.display_name)?;
    let updated = state
        .store
        .update_display_name(user.id, body.display_name.trim())
        .await?
        .ok_or(ApiError::NotFound)?;
    // (cached lookups hold the old display name)
    state.auth_cache.forget(None).await;
    Ok((private(), Json(json!({ "user": updated }))))
}
