//! Conversations of the signed-in user: list (one query, cached), create, import (batch
//! insert), rename, delete, and the `heavy`-queue export. Another user's conversation is
//! reported as 404, exactly like a missing one.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use super::error::ApiError;
use super::extract::{parse_id, ApiJson, ApiQuery, AuthUser};
use super::{private, AppState};
use crate::bus::{Envelope, Event};
use crate::cache::conversations_key;
use crate::jobs::ExportJob;
use crate::store::{Conversation, NewMessage};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/conversations", get(list).post(create))
        .route("/api/conversations/import", post(import))
        .route("/api/conversations/{id}", get(show).patch(rename).delete(remove))
        .route("/api/conversations/{id}/export", post(start_export).get(latest_export))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    limit: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Create {
    #[serde(default)]
    title: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Rename {
    title: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportMessage {
    role: String,
    content: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Import {
    title: String,
    messages: Vec<ImportMessage>,
}

fn validate_title(title: &str) -> Result<String, ApiError> {
    let t = title.trim();
    if t.is_empty() || t.chars().count() > 200 {
        return Err(ApiError::invalid("title", "1 to 200 characters"));
    }
    Ok(t.to_string())
}

/// The conversation if it belongs to `user_id`, else 404. Read from the database every
/// time: an ownership decision is never cached (a read racing a delete could put it back
/// after the delete dropped it).
pub async fn owned(state: &AppState, user_id: i64, id: i64) -> Result<Conversation, ApiError> {
    state.store.conversation(user_id, id).await?.ok_or(ApiError::NotFound)
}

/// Drops the cached list a write to a conversation of `user_id` made stale, and tells
/// the other instances (whose in-process caches listen on the bus).
pub async fn invalidate(state: &AppState, user_id: i64, event: Option<Event>) {
    state.cache.invalidate(&[conversations_key(user_id)]).await;
    if let Some(event) = event {
        if let Err(e) = state.bus.publish(&Envelope { user_id, event }).await {
            tracing::warn!(error = %e, "event not published");
        }
    }
}

async fn list(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let max = state.settings.limits.max_page;
    let limit = q.limit.unwrap_or(state.settings.limits.default_page);
    if limit == 0 || limit > max {
        return Err(ApiError::bad("limit", format!("must be between 1 and {max}")));
    }
    let key = conversations_key(user.id);
    let all = match state.cache.get::<Vec<Conversation>>(&key).await {
        Some(v) => v,
        None => {
            let v = state.store.list_conversations(user.id, max).await?;
            state.cache.put(&key, &v).await;
            v
        }
    };
    let page: Vec<&Conversation> = all.iter().take(limit as usize).collect();
    Ok((private(), Json(json!({ "conversations": page }))))
}

async fn create(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    ApiJson(body): ApiJson<Create>,
) -> Result<impl IntoResponse, ApiError> {
    let title = validate_title(body.title.as_deref().unwrap_or("New conversation"))?;
    let conv = state.store.create_conversation(user.id, &title).await?;
    invalidate(
        &state,
        user.id,
        Some(Event::ConversationChanged {
            conversation_id: conv.id,
            deleted: false,
        }),
    )
    .await;
    Ok((StatusCode::CREATED, private(), Json(json!({ "conversation": conv }))))
}

async fn import(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    ApiJson(body): ApiJson<Import>,
) -> Result<impl IntoResponse, ApiError> {
    let title = validate_title(&body.title)?;
    let limits = &state.settings.limits;
    if body.messages.len() > limits.max_import_messages {
        return Err(ApiError::TooLarge {
            field: Some("messages".into()),
            message: format!("at most {} messages per import", limits.max_import_messages),
        });
    }
    let mut messages = Vec::with_capacity(body.messages.len());
    for (i, m) in body.messages.into_iter().enumerate() {
        if !matches!(m.role.as_str(), "user" | "assistant" | "system") {
            return Err(ApiError::invalid(
                &format!("messages[{i}].role"),
                "one of user, assistant, system",
            ));
        }
        if m.content.len() > limits.max_message_bytes {
            return Err(ApiError::TooLarge {
                field: Some(format!("messages[{i}].content")),
                message: format!("at most {} bytes", limits.max_message_bytes),
            });
        }
        messages.push(NewMessage {
            role: m.role,
            content: m.content,
        });
    }
    let conv = state.store.import_conversation(user.id, &title, &messages).await?;
    invalidate(
        &state,
        user.id,
        Some(Event::ConversationChanged {
            conversation_id: conv.id,
            deleted: false,
        }),
    )
    .await;
    Ok((StatusCode::CREATED, private(), Json(json!({ "conversation": conv }))))
}

async fn show(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let conv = owned(&state, user.id, parse_id("id", &id)?).await?;
    Ok((private(), Json(json!({ "conversation": conv }))))
}

async fn rename(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<Rename>,
) -> Result<impl IntoResponse, ApiError> {
    let id = parse_id("id", &id)?;
    let title = validate_title(&body.title)?;
    let conv = state
        .store
        .rename_conversation(user.id, id, &title)
        .await?
        .ok_or(ApiError::NotFound)?;
    invalidate(
        &state,
        user.id,
        Some(Event::ConversationChanged {
            conversation_id: id,
            deleted: false,
        }),
    )
    .await;
    Ok((private(), Json(json!({ "conversation": conv }))))
}

async fn remove(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let id = parse_id("id", &id)?;
    if !state.store.delete_conversation(user.id, id).await? {
        return Err(ApiError::NotFound);
    }
    invalidate(
        &state,
        user.id,
        Some(Event::ConversationChanged {
            conversation_id: id,
            deleted: true,
        }),
    )
    .await;
    Ok(StatusCode::NO_CONTENT)
}

async fn start_export(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let conv = owned(&state, user.id, parse_id("id", &id)?).await?;
    state
        .queues
        .enqueue_export(ExportJob {
            user_id: user.id,
            conversation_id: conv.id,
        })
        .await
        .map_err(|e| ApiError::Unavailable(e.to_string()))?;
    Ok((
        StatusCode::ACCEPTED,
        private(),
        Json(json!({ "status": "queued", "queue": "heavy" })),
    ))
}

async fn latest_export(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let export = state
        .store
        .latest_export(user.id, parse_id("id", &id)?)
        .await?
        .ok_or(ApiError::NotFound)?;
    let body: serde_json::Value = serde_json::from_str(&export.body).map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok((
        private(),
        Json(json!({ "export": { "id": export.id, "created_at": export.created_at, "summary": body } })),
    ))
}
