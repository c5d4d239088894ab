//! Users: registration (`POST /api/users`), login (`POST /api/login`) and the profile
//! (`GET`/`PATCH /api/me`). Passwords are hashed with Argon2id off the async threads;
//! tokens are 256-bit random values stored as SHA-256 hashes.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use super::error::ApiError;
use super::extract::{hash_token, ApiJson, AuthUser};
use super::{private, AppState};
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

fn argon2(state: &AppState) -> Result<Argon2<'static>, ApiError> {
    let a = &state.settings.auth;
    let params = Params::new(a.argon2_memory_kib, a.argon2_iterations, 1, None)
        .map_err(|e| ApiError::Internal(format!("argon2 params: {e}")))?;
    Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
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
    let hasher = argon2(&state)?;
    let password = body.password;
    let _slot = hash_slots()
        .acquire()
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let hash = tokio::task::spawn_blocking(move || {
        let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>()).map_err(|e| e.to_string())?;
        hasher
            .hash_password(password.as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(|e| e.to_string())
    })
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

async fn login(State(state): State<AppState>, ApiJson(body): ApiJson<Login>) -> Result<impl IntoResponse, ApiError> {
    let creds = state.store.credentials(&body.username).await?;
    let hasher = argon2(&state)?;
    let stored = creds.as_ref().map(|c| c.password_hash.clone());
    let password = body.password;
    let _slot = hash_slots()
        .acquire()
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let ok = tokio::task::spawn_blocking(move || {
        let Some(stored) = stored else { return false };
        PasswordHash::new(&stored)
            .map(|h| hasher.verify_password(password.as_bytes(), &h).is_ok())
            .unwrap_or(false)
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))?;
    let Some(creds) = creds.filter(|_| ok) else {
        return Err(ApiError::Unauthorized);
    };
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
