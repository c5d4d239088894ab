//! [`ApiError`]: every error the API returns, as `{"error": {"code", "message", "field"?}}`
//! with the status the "Bad input" section asks for.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Malformed request (bad JSON syntax, bad query or path parameter).
    #[error("{message}")]
    BadRequest { field: Option<String>, message: String },
    /// Well-formed but invalid field.
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    #[error("missing or invalid bearer token")]
    Unauthorized,
    #[error("not found")]
    NotFound,
    #[error("{field} already exists")]
    Conflict { field: String },
    #[error("{message}")]
    TooLarge { field: Option<String>, message: String },
    /// Too many failed attempts; retry after this many seconds.
    #[error("too many failed attempts, retry in {retry_after_secs} s")]
    TooManyRequests { retry_after_secs: u64 },
    /// Database, Redis or the job queue is unreachable.
    #[error("service unavailable: {0}")]
    Unavailable(String),
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
    pub fn invalid(field: &str, message: impl Into<String>) -> Self {
        ApiError::Invalid {
            field: field.into(),
            message: message.into(),
        }
    }
    pub fn bad(field: &str, message: impl Into<String>) -> Self {
        ApiError::BadRequest {
            field: Some(field.into()),
            message: message.into(),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(field) => ApiError::Conflict { field: field.into() },
            e if e.is_unavailable() => ApiError::Unavailable(e.to_string()),
            e => ApiError::Internal(e.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, field) = match &self {
            ApiError::BadRequest { field, .. } => (StatusCode::BAD_REQUEST, "bad_request", field.clone()),
            ApiError::Invalid { field, .. } => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_field", Some(field.clone())),
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized", None),
            ApiError::NotFound => (StatusCode::NOT_FOUND, "not_found", None),
            ApiError::Conflict { field } => (StatusCode::CONFLICT, "conflict", Some(field.clone())),
            ApiError::TooLarge { field, .. } => (StatusCode::PAYLOAD_TOO_LARGE, "too_large", field.clone()),
            ApiError::TooManyRequests { .. } => (StatusCode::TOO_MANY_REQUESTS, "too_many_requests", None),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable", None),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal", None),
        };
        let message = match &self {
            ApiError::Unavailable(detail) | ApiError::Internal(detail) => {
                tracing::error!(%status, detail, "request failed");
                // do not leak internals; the detail is logged
                if status == StatusCode::SERVICE_UNAVAILABLE {
                    "service temporarily unavailable, retry later".to_string()
                } else {
                    "internal error".to_string()
                }
            }
            other => other.to_string(),
        };
        let mut body = json!({ "error": { "code": code, "message": message } });
        if let Some(f) = field {
            body["error"]["field"] = json!(f);
        }
        let mut resp = (status, axum::Json(body)).into_response();
        resp.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if let ApiError::TooManyRequests { retry_after_secs } = self {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
        }
        resp
    }
}
