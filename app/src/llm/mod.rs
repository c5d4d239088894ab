//! AI providers behind the [`ChatModel`] trait: [`offline::OfflineModel`] (the default,
//! deterministic, no network) and [`openai::OpenAiCompatible`] (streaming chat
//! completions from any OpenAI-compatible server).

use std::sync::Arc;

use async_trait::async_trait;
use futures::stream::BoxStream;
use serde::Serialize;

use crate::config::{LlmSettings, Provider};

pub mod offline;
pub mod openai;

/// One message of the prompt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// A prompt: the conversation so far, oldest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessage>,
}

/// Streamed reply text pieces.
pub type TokenStream = BoxStream<'static, Result<String, LlmError>>;

#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    #[error("could not reach the model server: {0}")]
    Connect(#[source] reqwest::Error),
    #[error("model server answered HTTP {status}: {body}")]
    Status { status: u16, body: String },
    #[error("no token within {0:?}")]
    FirstTokenTimeout(std::time::Duration),
    #[error("stream stalled for {0:?}")]
    Idle(std::time::Duration),
    #[error("stream broke: {0}")]
    Stream(String),
    #[error("bad stream event: {0}")]
    Protocol(String),
    #[error("invalid llm settings: {0}")]
    Config(String),
}

impl LlmError {
    /// Worth another attempt (only ever before the first token).
    pub fn retryable(&self) -> bool {
        match self {
            LlmError::Connect(_) | LlmError::FirstTokenTimeout(_) | LlmError::Stream(_) | LlmError::Idle(_) => true,
            LlmError::Status { status, .. } => *status == 429 || *status >= 500,
            LlmError::Protocol(_) | LlmError::Config(_) => false,
        }
    }
}

/// A model that streams its reply.
#[async_trait]
pub trait ChatModel: Send + Sync + 'static {
    /// Provider and model, for metric labels.
    fn name(&self) -> (&'static str, String);
    /// Starts the reply. Errors before the first token are returned here (after the
    /// provider's retries); errors after it arrive in the stream.
    async fn stream(&self, request: ChatRequest) -> Result<TokenStream, LlmError>;
}

/// The provider chosen by the settings.
pub fn from_settings(settings: &LlmSettings) -> Result<Arc<dyn ChatModel>, LlmError> {
    Ok(match settings.provider {
        Provider::Offline => Arc::new(offline::OfflineModel::new(settings.token_delay)),
        Provider::Openai => Arc::new(openai::OpenAiCompatible::new(settings)?),
    })
}
