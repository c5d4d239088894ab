//! Messages of a conversation: the keyset-paginated list
//! (`GET /api/conversations/{id}/messages?after=|before=&limit=`) and posting a user
//! message, which is persisted together with its AI reply job before the 201.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use super::conversations::invalidate;
use super::error::ApiError;
use super::extract::{parse_id, ApiJson, ApiQuery, AuthUser};
use super::{private, AppState};
use crate::bus::Event;
use crate::jobs::{AiJob, Queues};
use crate::store::Page;

pub fn router() -> Router<AppState> {
    Router::new().route("/api/conversations/{id}/messages", get(list).post(post_message))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    after: Option<i64>,
    before: Option<i64>,
    limit: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PostMessage {
    content: String,
}

async fn list(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let conversation_id = parse_id("id", &id)?;
    let max = state.settings.limits.max_page;
    let limit = q.limit.unwrap_or(state.settings.limits.default_page);
    if limit == 0 || limit > max {
        return Err(ApiError::bad("limit", format!("must be between 1 and {max}")));
    }
    // one extra row tells whether there is more
    let page = match (q.after, q.before) {
        (Some(_), Some(_)) => return Err(ApiError::bad("after", "give either after or before, not both")),
        (Some(after), None) => Page::After {
            after,
            limit: limit + 1,
        },
        (None, before) => Page::Before {
            before: before.unwrap_or(i64::MAX),
            limit: limit + 1,
        },
    };
    // (the statement checks that the conversation is this user's: 404 otherwise)
    let mut messages = state
        .store
        .list_messages(user.id, conversation_id, page)
        .await?
        .ok_or(ApiError::NotFound)?;
    let has_more = messages.len() > limit as usize;
    if has_more {
        match page {
            Page::After { .. } => {
                messages.pop();
            }
            Page::Before { .. } => {
                messages.remove(0);
            }
        }
    }
    Ok((private(), Json(json!({ "messages": messages, "has_more": has_more }))))
}

async fn post_message(
    State(state): State<AppState>,
    AuthUser(user): AuthUser,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<PostMessage>,
) -> Result<impl IntoResponse, ApiError> {
    let id = parse_id("id", &id)?;
    let max = state.settings.limits.max_message_bytes;
    if body.content.len() > max {
        return Err(ApiError::TooLarge {
            field: Some("content".into()),
            message: format!("content is over {max} bytes"),
        });
    }
    if body.content.trim().is_empty() {
        return Err(ApiError::invalid("content", "must not be empty"));
    }
    // The message and its `ai` job are committed together: a 201 means both are durable.
    // The inserting statement checks that the conversation is this user's (404 otherwise).
    let (user_id, conversation_id) = (user.id, id);
    let encode = move |message_id: i64| {
        Queues::encode_ai(&AiJob {
            user_id,
            conversation_id,
            message_id,
        })
    };
    let message = state
        .store
        .insert_message_with_job(
            user.id,
            id,
            "user",
            &body.content,
            state.queues.ai_queue(),
            Box::new(encode),
        )
        .await
        // deleted while the insert was under way
        .map_err(|e| {
            if e.is_missing_parent() {
                ApiError::NotFound
            } else {
                e.into()
            }
        })?
        .ok_or(ApiError::NotFound)?;
    state.queues.wake_ai();
    invalidate(
        &state,
        user.id,
        Some(Event::Message {
            message: message.clone(),
        }),
    )
    .await;
    Ok((
        StatusCode::CREATED,
        private(),
        Json(json!({ "message": message, "reply_queued": true })),
    ))
}
