//! The deterministic offline provider: the reply is a pure function of the last user
//! message, streamed word by word with a configurable delay. Used by default, in tests
//! and in load tests, so everything runs without a network.

use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;

use super::{ChatModel, ChatRequest, LlmError, TokenStream};

#[derive(Debug, Clone)]
pub struct OfflineModel {
    token_delay: Duration,
}

impl OfflineModel {
    pub fn new(token_delay: Duration) -> Self {
        Self { token_delay }
    }

    /// The full reply for a prompt (what the streamed tokens concatenate to).
    pub fn reply_for(request: &ChatRequest) -> String {
        let last = request
            .messages
            .iter()
            .rev()
            .find(|m| m.role == "user")
            .map(|m| m.content.trim())
            .unwrap_or("");
        let words = last.split_whitespace().count();
        let echo: String = last.chars().take(200).collect();
        format!(
            "You said: \"{echo}\". That is {words} word{} in a conversation of {} message{}.",
            if words == 1 { "" } else { "s" },
            request.messages.len(),
            if request.messages.len() == 1 { "" } else { "s" },
        )
    }

    /// Splits a reply into tokens: words with their trailing space.
    pub fn tokens(reply: &str) -> Vec<String> {
        reply.split_inclusive(' ').map(str::to_string).collect()
    }
}

#[async_trait]
impl ChatModel for OfflineModel {
    fn name(&self) -> (&'static str, String) {
        ("offline", "offline".into())
    }

    async fn stream(&self, request: ChatRequest) -> Result<TokenStream, LlmError> {
        let tokens = Self::tokens(&Self::reply_for(&request));
        let delay = self.token_delay;
        Ok(futures::stream::iter(tokens)
            .then(move |t| async move {
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                Ok(t)
            })
            .boxed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::ChatMessage;

    #[tokio::test]
    async fn reply_is_deterministic_and_streams_in_order() {
        let req = ChatRequest {
            messages: vec![ChatMessage {
                role: "user".into(),
                content: "hello there world".into(),
            }],
        };
        let want = OfflineModel::reply_for(&req);
        assert!(want.contains("hello there world") && want.contains("3 words"), "{want}");
        let got: Vec<String> = OfflineModel::new(Duration::ZERO)
            .stream(req)
            .await
            .expect("stream starts")
            .map(|t| t.expect("token"))
            .collect()
            .await;
        assert!(got.len() > 5);
        assert_eq!(got.concat(), want);
    }
}
