//! Event fan-out between app instances: the [`EventBus`] trait, the in-process
//! [`InProcessBus`] (a `tokio::sync::broadcast` channel, the default) and [`RedisBus`]
//! (Redis pub/sub on one channel, used when `redis.url` is set).
//!
//! Delivery is at most once: the database stays the source of truth and a client that
//! missed events catches up with `GET …/messages?after=<id>` or the WebSocket `resume`.
//! Several instances in ONE process share events by sharing one `InProcessBus`
//! (see `serve_with`); instances in different processes need Redis.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::store::Message;

/// An event for one user's sockets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub user_id: i64,
    #[serde(flatten)]
    pub event: Event,
}

/// What the WebSocket clients receive (as JSON with a `type` tag).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// A message was persisted (a user message, or a completed assistant reply).
    Message { message: Message },
    /// One streamed token of the reply to `reply_to`; `seq` counts from 0 per attempt.
    Token {
        conversation_id: i64,
        reply_to: i64,
        seq: u32,
        delta: String,
    },
    /// The reply to `reply_to` failed for good.
    ReplyFailed {
        conversation_id: i64,
        reply_to: i64,
        error: String,
    },
    /// Title changed or conversation deleted.
    ConversationChanged { conversation_id: i64, deleted: bool },
    /// A `heavy` export finished.
    ExportReady { conversation_id: i64, export_id: i64 },
    /// Sessions of the user ended: the one whose token hashes to `token_hash`, or all of
    /// them. Between instances only: each drops its cached lookups and closes the
    /// sessions' sockets; never sent to a client.
    SessionsRevoked { token_hash: Option<String> },
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("redis unavailable; event not published")]
    Unavailable,
    #[error("event encoding failed: {0}")]
    Encode(#[from] serde_json::Error),
}

/// Publishes events to every instance and lets this instance receive them.
#[async_trait]
pub trait EventBus: Send + Sync + 'static {
    async fn publish(&self, envelope: &Envelope) -> Result<(), BusError>;
    /// A receiver of every event published by any instance (including this one).
    fn subscribe(&self) -> broadcast::Receiver<Arc<Envelope>>;
    fn kind(&self) -> &'static str;
}

/// Capacity of the local broadcast ring; a lagging receiver skips (and counts) events.
const LOCAL_CAPACITY: usize = 65_536;

/// The default bus: events stay in this process. Clone it to share between instances.
#[derive(Debug, Clone)]
pub struct InProcessBus {
    tx: broadcast::Sender<Arc<Envelope>>,
}

impl Default for InProcessBus {
    fn default() -> Self {
        Self::new()
    }
}

impl InProcessBus {
    pub fn new() -> Self {
        let (tx, _) = broadcast::channel(LOCAL_CAPACITY);
        Self { tx }
    }
}

#[async_trait]
impl EventBus for InProcessBus {
    async fn publish(&self, envelope: &Envelope) -> Result<(), BusError> {
        // No receiver is not an error: nobody is listening yet.
        let _ = self.tx.send(Arc::new(envelope.clone()));
        metrics::counter!("pubsub_messages_total", "direction" => "out").increment(1);
        Ok(())
    }
    fn subscribe(&self) -> broadcast::Receiver<Arc<Envelope>> {
        self.tx.subscribe()
    }
    fn kind(&self) -> &'static str {
        "in-process"
    }
}

/// Redis pub/sub: every instance publishes to and subscribes to one channel.
pub struct RedisBus {
    conn: redis::aio::ConnectionManager,
    gate: Arc<crate::redis_gate::RedisGate>,
    channel: String,
    local: broadcast::Sender<Arc<Envelope>>,
    task: tokio::task::JoinHandle<()>,
}

impl RedisBus {
    /// Connects and starts the subscriber task (which reconnects on its own).
    pub async fn connect(
        client: redis::Client,
        conn: redis::aio::ConnectionManager,
        gate: Arc<crate::redis_gate::RedisGate>,
        prefix: &str,
    ) -> Result<Self, BusError> {
        let channel = format!("{prefix}wingman:events");
        let (local, _) = broadcast::channel(LOCAL_CAPACITY);
        // Subscribe before returning so no event published after `connect` is missed.
        let first = subscribe(&client, &channel).await?;
        let task = tokio::spawn(run_subscriber(client, channel.clone(), local.clone(), first));
        Ok(Self {
            conn,
            gate,
            channel,
            local,
            task,
        })
    }
}

impl Drop for RedisBus {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn subscribe(client: &redis::Client, channel: &str) -> Result<redis::aio::PubSub, redis::RedisError> {
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub.subscribe(channel).await?;
    Ok(pubsub)
}

async fn run_subscriber(
    client: redis::Client,
    channel: String,
    local: broadcast::Sender<Arc<Envelope>>,
    first: redis::aio::PubSub,
) {
    let mut pubsub = Some(first);
    let mut backoff = Duration::from_millis(100);
    loop {
        let ps = match pubsub.take() {
            Some(ps) => ps,
            None => match subscribe(&client, &channel).await {
                Ok(ps) => {
                    backoff = Duration::from_millis(100);
                    ps
                }
                Err(e) => {
                    metrics::counter!("redis_errors_total", "op" => "subscribe").increment(1);
                    tracing::warn!(error = %e, "redis subscribe failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            },
        };
        let mut stream = ps.into_on_message();
        while let Some(msg) = stream.next().await {
            let payload: Vec<u8> = match msg.get_payload() {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(error = %e, "bad pub/sub payload");
                    continue;
                }
            };
            match serde_json::from_slice::<Envelope>(&payload) {
                Ok(env) => {
                    metrics::counter!("pubsub_messages_total", "direction" => "in").increment(1);
                    let _ = local.send(Arc::new(env));
                }
                Err(e) => tracing::warn!(error = %e, "undecodable event on the bus"),
            }
        }
        metrics::counter!("redis_errors_total", "op" => "subscription_lost").increment(1);
        tracing::warn!("redis subscription ended; resubscribing");
    }
}

#[async_trait]
impl EventBus for RedisBus {
    async fn publish(&self, envelope: &Envelope) -> Result<(), BusError> {
        let payload = serde_json::to_vec(envelope)?;
        let mut conn = self.conn.clone();
        let mut cmd = redis::cmd("PUBLISH");
        cmd.arg(&self.channel).arg(payload);
        match self.gate.run("publish", cmd.query_async::<i64>(&mut conn)).await {
            Some(_) => {
                metrics::counter!("pubsub_messages_total", "direction" => "out").increment(1);
                Ok(())
            }
            None => Err(BusError::Unavailable),
        }
    }
    fn subscribe(&self) -> broadcast::Receiver<Arc<Envelope>> {
        self.local.subscribe()
    }
    fn kind(&self) -> &'static str {
        "redis"
    }
}
