//! Request extractors with the API's error semantics: [`ApiJson`] (400 for malformed JSON,
//! 422 naming the offending field, 413 past the body limit), [`AuthUser`] and
//! [`AuthSession`] (401),
//! [`ApiQuery`] (400 naming the parameter) and [`parse_id`] for path ids.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

use super::error::ApiError;
use super::sessions::{authenticate, Session};
use super::AppState;
use crate::store::User;

/// A JSON body.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e: BytesRejection| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::TooLarge {
                    field: None,
                    message: "request body too large".into(),
                }
            } else {
                ApiError::BadRequest {
                    field: None,
                    message: e.body_text(),
                }
            }
        })?;
        parse_json(&bytes).map(ApiJson)
    }
}

/// Parses JSON, naming the field at fault.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        use serde_json::error::Category;
        match inner.classify() {
            Category::Syntax | Category::Eof | Category::Io => ApiError::BadRequest {
                field: None,
                message: format!("malformed JSON: {inner}"),
            },
            Category::Data => {
                let msg = inner.to_string();
                // "missing field `x`" is reported at the parent path
                let field = match msg.strip_prefix("missing field `").and_then(|r| r.split('`').next()) {
                    Some(name) if path == "." => name.to_string(),
                    Some(name) => format!("{path}.{name}"),
                    None if path == "." => "body".to_string(),
                    None => path,
                };
                let msg = msg.split(" at line ").next().unwrap_or(&msg).to_string();
                ApiError::Invalid { field, message: msg }
            }
        }
    })
}

/// Query parameters.
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let query = parts.uri.query().unwrap_or("");
        let de = serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
        serde_path_to_error::deserialize(de).map(ApiQuery).map_err(|err| {
            let field = err.path().to_string();
            let msg = err.into_inner().to_string();
            ApiError::BadRequest {
                field: Some(if field == "." { "query".into() } else { field }),
                message: msg,
            }
        })
    }
}

/// Parses a numeric path id (400 naming `field` otherwise).
pub fn parse_id(field: &str, raw: &str) -> Result<i64, ApiError> {
    raw.parse::<i64>()
        .ok()
        .filter(|v| *v > 0)
        .ok_or_else(|| ApiError::bad(field, "must be a positive integer"))
}

pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// The token of an `Authorization: Bearer <token>` header.
pub fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim)
}

/// The authenticated user (from `Authorization: Bearer <token>`).
pub struct AuthUser(pub User);

impl FromRequestParts<AppState> for AuthUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        AuthSession::from_request_parts(parts, state)
            .await
            .map(|AuthSession(s)| AuthUser(s.user))
    }
}

/// The authenticated session (from `Authorization: Bearer <token>`).
pub struct AuthSession(pub Session);

impl FromRequestParts<AppState> for AuthSession {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let token = bearer(&parts.headers).ok_or(ApiError::Unauthorized)?;
        authenticate(state, token).await.map(AuthSession)
    }
}
