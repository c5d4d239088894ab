//! [`OpenAiCompatible`]: `POST {base_url}/v1/chat/completions` with `"stream": true`,
//! parsing server-sent events (`choices[0].delta.content`, ending at `data: [DONE]`).
//! Retries (with backoff) only until the first token arrives: connect errors, 429/5xx,
//! timeouts and streams that break before any content. After the first token an error
//! ends the stream and is reported, never retried, so no text is ever duplicated.

use std::time::Duration;

use async_trait::async_trait;
use eventsource_stream::{Event, Eventsource};
use futures::stream::BoxStream;
use futures::StreamExt;
use serde_json::json;

use super::{ChatModel, ChatRequest, LlmError, TokenStream};
use crate::config::LlmSettings;

#[derive(Debug, Clone)]
pub struct OpenAiCompatible {
    http: reqwest::Client,
    url: String,
    model: String,
    api_key: String,
    first_token_timeout: Duration,
    idle_timeout: Duration,
    max_attempts: u32,
}

type Events = BoxStream<'static, Result<Event, LlmError>>;

impl OpenAiCompatible {
    pub fn new(settings: &LlmSettings) -> Result<Self, LlmError> {
        let http = reqwest::Client::builder()
            .connect_timeout(settings.connect_timeout)
            .build()
            .map_err(|e| LlmError::Config(e.to_string()))?;
        Ok(Self {
            http,
            url: format!("{}/v1/chat/completions", settings.base_url.trim_end_matches('/')),
            model: settings.model.clone(),
            api_key: settings.api_key.clone(),
            first_token_timeout: settings.first_token_timeout,
            idle_timeout: settings.idle_timeout,
            max_attempts: settings.max_attempts,
        })
    }

    /// One attempt: sends the request and waits for the first content token.
    async fn start(&self, request: &ChatRequest) -> Result<(String, Events), LlmError> {
        let body = json!({ "model": self.model, "stream": true, "messages": request.messages });
        let mut req = self.http.post(&self.url).json(&body);
        if !self.api_key.is_empty() {
            req = req.bearer_auth(&self.api_key);
        }
        let deadline = tokio::time::Instant::now() + self.first_token_timeout;
        let resp = tokio::time::timeout_at(deadline, req.send())
            .await
            .map_err(|_| LlmError::FirstTokenTimeout(self.first_token_timeout))?
            .map_err(LlmError::Connect)?;
        let status = resp.status();
        if !status.is_success() {
            let body = tokio::time::timeout_at(deadline, resp.text())
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default();
            return Err(LlmError::Status {
                status: status.as_u16(),
                body: body.chars().take(500).collect(),
            });
        }
        let mut events: Events = resp
            .bytes_stream()
            .eventsource()
            .map(|r| r.map_err(|e| LlmError::Stream(e.to_string())))
            .boxed();
        loop {
            let next = tokio::time::timeout_at(deadline, events.next())
                .await
                .map_err(|_| LlmError::FirstTokenTimeout(self.first_token_timeout))?;
            match next {
                None => return Err(LlmError::Stream("stream ended before [DONE]".into())),
                Some(Err(e)) => return Err(e),
                Some(Ok(ev)) => match parse(&ev)? {
                    Chunk::Done => return Ok((String::new(), futures::stream::empty().boxed())),
                    Chunk::Text(t) if !t.is_empty() => return Ok((t, events)),
                    Chunk::Text(_) => continue,
                },
            }
        }
    }
}

enum Chunk {
    Text(String),
    Done,
}

fn parse(ev: &Event) -> Result<Chunk, LlmError> {
    let data = ev.data.trim();
    if data == "[DONE]" {
        return Ok(Chunk::Done);
    }
    if data.is_empty() {
        return Ok(Chunk::Text(String::new()));
    }
    let v: serde_json::Value = serde_json::from_str(data).map_err(|e| LlmError::Protocol(format!("{e}: {data}")))?;
    if let Some(err) = v.get("error") {
        return Err(LlmError::Stream(err.to_string()));
    }
    Ok(Chunk::Text(
        v.pointer("/choices/0/delta/content")
            .and_then(|c| c.as_str())
            .unwrap_or("")
            .to_string(),
    ))
}

#[async_trait]
impl ChatModel for OpenAiCompatible {
    fn name(&self) -> (&'static str, String) {
        ("openai", self.model.clone())
    }

    async fn stream(&self, request: ChatRequest) -> Result<TokenStream, LlmError> {
        let mut attempt = 0;
        let (first, events) = loop {
            attempt += 1;
            match self.start(&request).await {
                Ok(ok) => break ok,
                Err(e) if e.retryable() && attempt < self.max_attempts => {
                    metrics::counter!("llm_retries_total").increment(1);
                    tracing::warn!(attempt, error = %e, "llm request failed before the first token; retrying");
                    tokio::time::sleep(Duration::from_millis(100 * (1 << attempt.min(6)))).await;
                }
                Err(e) => return Err(e),
            }
        };
        let idle = self.idle_timeout;
        let rest = futures::stream::unfold(Some(events), move |state| async move {
            let mut events = state?;
            loop {
                match tokio::time::timeout(idle, events.next()).await {
                    Err(_) => return Some((Err(LlmError::Idle(idle)), None)),
                    Ok(None) => return Some((Err(LlmError::Stream("stream ended before [DONE]".into())), None)),
                    Ok(Some(Err(e))) => return Some((Err(e), None)),
                    Ok(Some(Ok(ev))) => match parse(&ev) {
                        Err(e) => return Some((Err(e), None)),
                        Ok(Chunk::Done) => return None,
                        Ok(Chunk::Text(t)) if t.is_empty() => continue,
                        Ok(Chunk::Text(t)) => return Some((Ok(t), Some(events))),
                    },
                }
            }
        });
        if first.is_empty() {
            return Ok(futures::stream::empty().boxed());
        }
        Ok(futures::stream::once(async move { Ok(first) }).chain(rest).boxed())
    }
}
