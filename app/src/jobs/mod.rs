//! Background jobs on apalis 1.0: the `ai` queue (streamed AI replies, I/O bound, high
//! concurrency) and the `heavy` queue (CPU-bound conversation exports, low concurrency).
//!
//! Queues are durable in the app's own database: apalis-sqlite in the same SQLite file, or
//! apalis-postgres. The `ai` job of a user message is inserted in the same transaction as
//! the message (see `Store::insert_message_with_job`), so an acknowledged message always
//! gets its reply. This instance's workers are woken right after it enqueues; jobs from
//! other instances are found through LISTEN/NOTIFY (PostgreSQL) and by polling every
//! `jobs.poll_interval`. (apalis' NOTIFY-only strategy, `with_pubsub()`, stalled under load
//! in the benchmark — replies took ~26 s — hence the polling fallback next to it.)
//! Workers have per-queue concurrency, a timeout per attempt, retries with exponential
//! backoff, and orphaned jobs of a dead worker are re-enqueued by apalis (heartbeats).

use std::sync::Arc;
use std::time::{Duration, Instant};

use apalis::layers::retry::backoff::{ExponentialBackoff, ExponentialBackoffMaker, MakeBackoff};
use apalis::layers::retry::HasherRng;
use apalis::prelude::*;
use apalis_postgres::PostgresStorage;
use apalis_sqlite::SqliteStorage;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::bus::{Envelope, Event, EventBus};
use crate::cache::{conversations_key, QueryCache};
use crate::config::{DatabaseSettings, JobSettings, LlmSettings};
use crate::llm::{ChatMessage, ChatModel, ChatRequest};
use crate::store::{Page, Store, StoreError};

/// Produce the assistant reply to one user message.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AiJob {
    pub user_id: i64,
    pub conversation_id: i64,
    pub message_id: i64,
}

/// Export (and summarize) a whole conversation: CPU work on the `heavy` queue.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExportJob {
    pub user_id: i64,
    pub conversation_id: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("job queue database error: {0}")]
    Sqlite(#[from] apalis_sqlite::Error),
    #[error("job queue database error: {0}")]
    Postgres(#[from] apalis_postgres::Error),
    #[error("could not open the job queue: {0}")]
    Open(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("export failed: {0}")]
    Export(String),
}

/// Everything a job handler needs.
pub struct JobContext {
    pub store: Arc<dyn Store>,
    pub bus: Arc<dyn EventBus>,
    pub cache: Arc<QueryCache>,
    pub model: Arc<dyn ChatModel>,
    pub llm: LlmSettings,
}

/// The enqueue side of both queues.
#[derive(Clone)]
pub enum Queues {
    Sqlite {
        ai: SqliteStorage<AiJob>,
        heavy: SqliteStorage<ExportJob>,
        /// Wakes this instance's workers right after an enqueue (no polling delay).
        wake_ai: Wake,
        wake_heavy: Wake,
        ai_queue: String,
    },
    Postgres {
        ai: PostgresStorage<AiJob>,
        heavy: PostgresStorage<ExportJob>,
        wake_ai: Wake,
        wake_heavy: Wake,
        ai_queue: String,
    },
}

/// Signals the local worker of a queue that a job was enqueued.
pub type Wake = futures::channel::mpsc::UnboundedSender<()>;

/// Queue depth (pending jobs) of both queues.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Depth {
    pub ai: u64,
    pub heavy: u64,
}

fn pending(stats: &[Statistic]) -> u64 {
    stats
        .iter()
        .find(|s| s.title == "PENDING_JOBS")
        .and_then(|s| s.value.parse::<f64>().ok())
        .unwrap_or(0.0) as u64
}

impl Queues {
    /// Name of the `ai` queue (for enqueueing inside a store transaction).
    pub fn ai_queue(&self) -> &str {
        match self {
            Queues::Sqlite { ai_queue, .. } | Queues::Postgres { ai_queue, .. } => ai_queue,
        }
    }

    /// Wakes this instance's `ai` worker after a job was enqueued by other means.
    pub fn wake_ai(&self) {
        let (Queues::Sqlite { wake_ai, .. } | Queues::Postgres { wake_ai, .. }) = self;
        let _ = wake_ai.unbounded_send(());
    }

    /// The job's payload as the queue stores it (apalis' JSON codec).
    pub fn encode_ai(job: &AiJob) -> Vec<u8> {
        serde_json::to_vec(job).unwrap_or_default()
    }

    pub async fn enqueue_export(&self, job: ExportJob) -> Result<(), JobError> {
        match self {
            Queues::Sqlite { heavy, wake_heavy, .. } => {
                heavy
                    .clone()
                    .push(job)
                    .await
                    .map_err(|e| JobError::Open(e.to_string()))?;
                let _ = wake_heavy.unbounded_send(());
                Ok(())
            }
            Queues::Postgres { heavy, wake_heavy, .. } => {
                heavy
                    .clone()
                    .push(job)
                    .await
                    .map_err(|e| JobError::Open(e.to_string()))?;
                let _ = wake_heavy.unbounded_send(());
                Ok(())
            }
        }
    }

    pub async fn depth(&self) -> Result<Depth, JobError> {
        Ok(match self {
            Queues::Sqlite { ai, heavy, .. } => Depth {
                ai: pending(&ai.fetch_by_queue().await?),
                heavy: pending(&heavy.fetch_by_queue().await?),
            },
            Queues::Postgres { ai, heavy, .. } => Depth {
                ai: pending(&ai.fetch_by_queue().await?),
                heavy: pending(&heavy.fetch_by_queue().await?),
            },
        })
    }
}

/// Running workers; [`Workers::wait`] returns when all have drained.
pub struct Workers {
    handles: Vec<tokio::task::JoinHandle<()>>,
}

impl Workers {
    pub async fn wait(self) {
        for h in self.handles {
            let _ = h.await;
        }
    }
}

fn retry_policy(retries: usize) -> BackoffRetryPolicy<ExponentialBackoff<HasherRng>> {
    let backoff = ExponentialBackoffMaker::new(
        Duration::from_millis(200),
        Duration::from_secs(10),
        0.5,
        HasherRng::default(),
    )
    .map(|mut m| m.make_backoff());
    RetryPolicy::retries(retries).with_backoff(backoff.expect("constant backoff bounds are valid"))
}

/// Builds a worker and runs it until `stop`; a worker that dies (e.g. the database went
/// away and apalis marked its backend dead) is rebuilt after a backoff, so queues resume
/// by themselves when the database comes back. `$backend` is evaluated per (re)start.
macro_rules! spawn_worker {
    ($name:expr, $backend:expr, $handler:expr, $concurrency:expr, $timeout:expr, $retries:expr, $ctx:expr, $stop:expr) => {{
        let stop: CancellationToken = $stop;
        let name: String = $name;
        let ctx = $ctx;
        let make_backend = $backend;
        let (concurrency, timeout, retries): (usize, Duration, usize) = ($concurrency, $timeout, $retries);
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(200);
            let mut generation = 0u32;
            loop {
                // A fresh name per start: apalis re-enqueues the jobs a worker held only
                // once its name stops heartbeating, so a worker rebuilt under the old
                // name kept the jobs the dead one had locked forever (the replies of
                // messages posted just before a database outage never came).
                let worker_name = if generation == 0 {
                    name.clone()
                } else {
                    format!("{name}-r{generation}")
                };
                generation += 1;
                let worker = WorkerBuilder::new(worker_name.clone())
                    .backend(make_backend())
                    .concurrency(concurrency)
                    .retry(retry_policy(retries))
                    .timeout(timeout)
                    .data(ctx.clone())
                    .build($handler);
                let signal_stop = stop.clone();
                let signal = async move {
                    signal_stop.cancelled().await;
                    Ok::<(), std::io::Error>(())
                };
                match worker.run_until(signal).await {
                    Ok(()) => break,
                    Err(e) => {
                        metrics::counter!("job_worker_restarts_total").increment(1);
                        tracing::error!(worker = %worker_name, error = %e, "job worker died; restarting");
                    }
                }
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        })
    }};
}

/// Opens the queues in the app database, and starts this instance's workers
/// (they stop taking jobs when `stop` is cancelled and finish the running ones).
///
/// On SQLite the queues use `sqlite_writer`, the store's single writer connection, when
/// given: SQLite has one writer at a time anyway, and two connections that both write
/// (the store's and the queue's) meet in SQLite's busy handler, which sleeps in steps
/// of up to 100 ms instead of queueing; message posts waited there under load.
pub async fn start(
    db: &DatabaseSettings,
    sqlite_writer: Option<sqlx::SqlitePool>,
    settings: &JobSettings,
    ctx: Arc<JobContext>,
    instance: &str,
    stop: CancellationToken,
) -> Result<(Queues, Workers), JobError> {
    let ai_queue = format!("{}ai", settings.queue_prefix);
    let heavy_queue = format!("{}heavy", settings.queue_prefix);
    let mut handles = Vec::new();
    let queues = if db.url.starts_with("sqlite:") {
        let pool = match sqlite_writer {
            Some(writer) => {
                migrate_queue(&writer).await?;
                writer
            }
            None => sqlite_pool(db).await?,
        };
        let (ai_pool, heavy_pool) = (pool.clone(), pool);
        let (wake_ai, ai_hook) = futures::channel::mpsc::unbounded::<()>();
        let (wake_heavy, heavy_hook) = futures::channel::mpsc::unbounded::<()>();
        let ai_cfg = apalis_sqlite::Config::default()
            .queue(&ai_queue)
            .batch_size(32)
            .persist_results(false)
            // No separate "Running" update per job: a fetched task is already taken
            // (status Queued, lock_by = this worker), the ack checks lock_by, and a dead
            // worker's Queued tasks are re-enqueued like Running ones. One write fewer
            // per reply on the single writer: +9..43% req/s under the seed workload.
            .lock_tasks(false)
            .heartbeat_interval(settings.heartbeat_interval);
        let heavy_cfg = apalis_sqlite::Config::default()
            .queue(&heavy_queue)
            .batch_size(settings.heavy_concurrency)
            .heartbeat_interval(settings.heartbeat_interval);
        let ai = SqliteStorage::<AiJob>::new(&ai_pool).with_config(ai_cfg);
        let heavy = SqliteStorage::<ExportJob>::new(&heavy_pool).with_config(heavy_cfg);
        let ai_strategy = Strategy::new()
            .stream(ai_hook.ready_chunks(32))
            .interval(settings.poll_interval);
        let heavy_strategy = Strategy::new()
            .stream(heavy_hook.ready_chunks(8))
            .interval(settings.poll_interval);
        handles.push(spawn_worker!(
            format!("ai-{instance}"),
            {
                let (ai, st) = (ai.clone(), ai_strategy);
                move || ai.clone().poll_with_strategy(st.clone())
            },
            run_ai,
            settings.ai_concurrency,
            settings.ai_timeout,
            settings.retries,
            ctx.clone(),
            stop.clone()
        ));
        handles.push(spawn_worker!(
            format!("heavy-{instance}"),
            {
                let (heavy, st) = (heavy.clone(), heavy_strategy);
                move || heavy.clone().poll_with_strategy(st.clone())
            },
            run_export,
            settings.heavy_concurrency,
            settings.heavy_timeout,
            settings.retries,
            ctx.clone(),
            stop.clone()
        ));
        Queues::Sqlite {
            ai,
            heavy,
            wake_ai,
            wake_heavy,
            ai_queue: ai_queue.clone(),
        }
    } else {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(db.acquire_timeout)
            .connect(&db.url)
            .await
            .map_err(|e| JobError::Open(e.to_string()))?;
        let mut migrator = PostgresStorage::<()>::migrations();
        migrator.set_ignore_missing(true);
        migrator
            .run(&pool)
            .await
            .map_err(|e| JobError::Open(format!("apalis migrations: {e}")))?;
        let ai_cfg = apalis_postgres::Config::default()
            .queue(&ai_queue)
            .batch_size(32)
            .persist_results(false)
            .heartbeat_interval(settings.heartbeat_interval);
        let heavy_cfg = apalis_postgres::Config::default()
            .queue(&heavy_queue)
            .batch_size(settings.heavy_concurrency)
            .heartbeat_interval(settings.heartbeat_interval);
        let (wake_ai, ai_wake_rx) = futures::channel::mpsc::unbounded::<()>();
        let (wake_heavy, heavy_wake_rx) = futures::channel::mpsc::unbounded::<()>();
        let ai = PostgresStorage::<AiJob>::new(&pool).with_config(ai_cfg);
        let heavy = PostgresStorage::<ExportJob>::new(&pool).with_config(heavy_cfg);
        handles.push(spawn_worker!(
            format!("ai-{instance}"),
            {
                // local wake-up after an enqueue here, LISTEN/NOTIFY for jobs from other
                // instances, and polling as the fallback
                let strategy = Strategy::new()
                    .stream(ai_wake_rx.ready_chunks(32))
                    .stream(apalis_postgres::Pubsub::new(pool.clone(), ai_queue.clone()))
                    .interval(settings.poll_interval);
                let ai = ai.clone();
                move || ai.clone().poll_with_strategy(strategy.clone())
            },
            run_ai,
            settings.ai_concurrency,
            settings.ai_timeout,
            settings.retries,
            ctx.clone(),
            stop.clone()
        ));
        handles.push(spawn_worker!(
            format!("heavy-{instance}"),
            {
                let strategy = Strategy::new()
                    .stream(heavy_wake_rx.ready_chunks(8))
                    .stream(apalis_postgres::Pubsub::new(pool.clone(), heavy_queue.clone()))
                    .interval(settings.poll_interval);
                let heavy = heavy.clone();
                move || heavy.clone().poll_with_strategy(strategy.clone())
            },
            run_export,
            settings.heavy_concurrency,
            settings.heavy_timeout,
            settings.retries,
            ctx.clone(),
            stop.clone()
        ));
        Queues::Postgres {
            ai,
            heavy,
            wake_ai,
            wake_heavy,
            ai_queue: ai_queue.clone(),
        }
    };
    Ok((queues, Workers { handles }))
}

/// A pool of the job queue's own on the app's SQLite file, with the app's connection
/// options (WAL, `synchronous=NORMAL`, `busy_timeout`), for a caller that has no store
/// writer to share. (A separate pool used to be required: apalis kept a fetch's
/// transaction open while a stopping worker waited for its running jobs, and those
/// jobs needed the writer to store their replies; vendor/apalis-core fixes that.)
async fn sqlite_pool(db: &DatabaseSettings) -> Result<sqlx::SqlitePool, JobError> {
    let pool = sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(2)
        .acquire_timeout(db.acquire_timeout)
        .connect_with(crate::store::sqlite::connect_options(db)?)
        .await
        .map_err(|e| JobError::Open(e.to_string()))?;
    migrate_queue(&pool).await?;
    Ok(pool)
}

/// apalis-sqlite's own tables, in the app's file.
async fn migrate_queue(pool: &sqlx::SqlitePool) -> Result<(), JobError> {
    let mut migrator = SqliteStorage::<()>::migrations();
    migrator.set_ignore_missing(true);
    let _guard = crate::store::sqlite::migrate_lock().lock().await;
    if let Err(first) = migrator.run(pool).await {
        tracing::warn!(error = %first, "apalis migration failed, retrying once");
        migrator
            .run(pool)
            .await
            .map_err(|e| JobError::Open(format!("apalis migrations: {e}")))?;
    }
    Ok(())
}

/// Maps a handler failure to an apalis error (so the retry layer sees it).
type HandlerResult = Result<(), BoxDynError>;

async fn run_ai(job: AiJob, ctx: Data<Arc<JobContext>>) -> HandlerResult {
    let started = Instant::now();
    let res = ai_reply(&ctx, &job).await;
    let outcome = if res.is_ok() { "ok" } else { "error" };
    metrics::histogram!("job_duration_seconds", "queue" => "ai", "outcome" => outcome)
        .record(started.elapsed().as_secs_f64());
    metrics::counter!("jobs_total", "queue" => "ai", "outcome" => outcome).increment(1);
    res.map_err(|e| {
        tracing::warn!(error = %e, message_id = job.message_id, "ai job attempt failed");
        Box::new(e) as BoxDynError
    })
}

async fn publish(ctx: &JobContext, user_id: i64, event: Event) {
    if let Err(e) = ctx.bus.publish(&Envelope { user_id, event }).await {
        tracing::warn!(error = %e, "event not published");
    }
}

/// Streams the reply to the bus token by token and persists it when complete.
async fn ai_reply(ctx: &JobContext, job: &AiJob) -> Result<(), JobError> {
    let context = ctx
        .store
        .reply_context(
            job.user_id,
            job.conversation_id,
            job.message_id,
            ctx.llm.history_messages.max(1),
        )
        .await?;
    if context.replied {
        return Ok(()); // a previous attempt finished
    }
    let history = context.history;
    if !history.iter().any(|m| m.id == job.message_id) {
        return Ok(()); // the conversation or message was deleted (or is not the job's user's)
    }
    let request = ChatRequest {
        messages: history
            .into_iter()
            .map(|m| ChatMessage {
                role: m.role,
                content: m.content,
            })
            .collect(),
    };
    let (provider, model) = ctx.model.name();
    let started = Instant::now();
    let fail = |error: String| Event::ReplyFailed {
        conversation_id: job.conversation_id,
        reply_to: job.message_id,
        error,
    };
    let stream = match ctx.model.stream(request).await {
        Ok(s) => s,
        Err(e) => {
            // the provider already retried before the first token; give up on this reply
            metrics::counter!("llm_errors_total", "provider" => provider).increment(1);
            publish(ctx, job.user_id, fail(e.to_string())).await;
            return Ok(());
        }
    };
    let mut text = String::new();
    let mut seq = 0u32;
    let mut tokens = 0u64;
    // Tokens that have already arrived go out as one event: a provider that sends a burst
    // (or the offline model without delay) costs one frame per burst, not one per token;
    // tokens that arrive apart still stream one by one.
    let mut stream = stream.ready_chunks(64);
    while let Some(items) = stream.next().await {
        let mut delta = String::new();
        let mut failure = None;
        for item in items {
            match item {
                Ok(d) => {
                    tokens += 1;
                    delta.push_str(&d);
                }
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        if !delta.is_empty() {
            if seq == 0 {
                metrics::histogram!("llm_time_to_first_token_seconds", "provider" => provider, "model" => model.clone())
                    .record(started.elapsed().as_secs_f64());
            }
            text.push_str(&delta);
            publish(
                ctx,
                job.user_id,
                Event::Token {
                    conversation_id: job.conversation_id,
                    reply_to: job.message_id,
                    seq,
                    delta,
                },
            )
            .await;
            seq += 1;
        }
        if let Some(e) = failure {
            metrics::counter!("llm_errors_total", "provider" => provider).increment(1);
            publish(ctx, job.user_id, fail(e.to_string())).await;
            if text.is_empty() {
                return Ok(());
            }
            text.push_str(" [reply interrupted]");
            break;
        }
    }
    metrics::histogram!("llm_request_duration_seconds", "provider" => provider, "model" => model)
        .record(started.elapsed().as_secs_f64());
    metrics::counter!("llm_tokens_total", "provider" => provider).increment(tokens);
    match ctx
        .store
        .insert_message(
            job.user_id,
            job.conversation_id,
            "assistant",
            &text,
            Some(job.message_id),
        )
        .await
    {
        Ok(Some(message)) => {
            ctx.cache.invalidate(&[conversations_key(job.user_id)]).await;
            publish(ctx, job.user_id, Event::Message { message }).await;
            Ok(())
        }
        Ok(None) => Ok(()), // another attempt stored it, or the conversation is gone
        Err(e) if e.is_missing_parent() => Ok(()),
        Err(e) => Err(e.into()),
    }
}

async fn run_export(job: ExportJob, ctx: Data<Arc<JobContext>>) -> HandlerResult {
    let started = Instant::now();
    let res = export(&ctx, &job).await;
    let outcome = if res.is_ok() { "ok" } else { "error" };
    metrics::histogram!("job_duration_seconds", "queue" => "heavy", "outcome" => outcome)
        .record(started.elapsed().as_secs_f64());
    metrics::counter!("jobs_total", "queue" => "heavy", "outcome" => outcome).increment(1);
    res.map_err(|e| Box::new(e) as BoxDynError)
}

async fn export(ctx: &JobContext, job: &ExportJob) -> Result<(), JobError> {
    let mut messages = Vec::new();
    let mut after = 0;
    loop {
        let Some(page) = ctx
            .store
            .list_messages(job.user_id, job.conversation_id, Page::After { after, limit: 1000 })
            .await?
        else {
            return Ok(()); // the conversation was deleted
        };
        let Some(last) = page.last() else { break };
        after = last.id;
        let done = page.len() < 1000;
        messages.extend(page);
        if done {
            break;
        }
    }
    // CPU-bound: off the async workers.
    let body = tokio::task::spawn_blocking(move || summarize(&messages))
        .await
        .map_err(|e| JobError::Export(e.to_string()))?;
    let export = match ctx.store.save_export(job.user_id, job.conversation_id, &body).await {
        Ok(Some(e)) => e,
        Ok(None) => return Ok(()), // the conversation was deleted
        Err(e) if e.is_missing_parent() => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    publish(
        ctx,
        job.user_id,
        Event::ExportReady {
            conversation_id: job.conversation_id,
            export_id: export.id,
        },
    )
    .await;
    Ok(())
}

/// A Markdown transcript plus statistics (word counts, most frequent words, a digest).
pub fn summarize(messages: &[crate::store::Message]) -> String {
    use sha2::{Digest, Sha256};
    use std::collections::HashMap;
    let mut transcript = String::new();
    let mut freq: HashMap<String, u64> = HashMap::new();
    let mut words = 0u64;
    for m in messages {
        transcript.push_str(&format!("**{}**: {}\n\n", m.role, m.content));
        for w in m.content.split(|c: char| !c.is_alphanumeric()).filter(|w| w.len() > 3) {
            words += 1;
            *freq.entry(w.to_lowercase()).or_default() += 1;
        }
    }
    let mut top: Vec<(String, u64)> = freq.into_iter().collect();
    top.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    top.truncate(10);
    let digest = hex::encode(Sha256::digest(transcript.as_bytes()));
    serde_json::json!({
        "messages": messages.len(),
        "words": words,
        "top_words": top,
        "sha256": digest,
        "transcript_markdown": transcript,
    })
    .to_string()
}
