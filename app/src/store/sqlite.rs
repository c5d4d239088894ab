//! [`SqliteStore`]: the embedded default. One WAL-mode file, created on first run;
//! several instances (threads or processes) may share it: writers wait on `busy_timeout`.

use std::str::FromStr;
use std::sync::OnceLock;

use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::SqlitePool;

use super::*;
use crate::config::DatabaseSettings;

/// SQLite implementation of [`Store`]. Reads use a pool; every write of the store goes
/// through one writer connection, so writers queue in-process (fair, no busy-wait)
/// instead of sleeping in SQLite's busy handler; the job queue shares that connection
/// (see [`crate::jobs::start`]), and message inserts are group-committed on it.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    writer: SqlitePool,
    /// Message inserts, group-committed through `writer`.
    messages: batch::MessageWriter,
}

/// Connect options shared by the store pool and the job queue pool.
pub fn connect_options(settings: &DatabaseSettings) -> StoreResult<SqliteConnectOptions> {
    Ok(SqliteConnectOptions::from_str(&settings.url)
        .map_err(|e| StoreError::Open(format!("database.url {}: {e}", settings.url)))?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(settings.busy_timeout)
        .foreign_keys(true)
        .pragma("temp_store", "memory"))
}

/// Serializes migrations of instances in one process that share a file.
pub(crate) fn migrate_lock() -> &'static tokio::sync::Mutex<()> {
    static LOCK: OnceLock<tokio::sync::Mutex<()>> = OnceLock::new();
    LOCK.get_or_init(|| tokio::sync::Mutex::new(()))
}

impl SqliteStore {
    pub async fn open(settings: &DatabaseSettings) -> StoreResult<Self> {
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(settings.acquire_timeout)
            .max_lifetime(settings.max_lifetime)
            .connect_with(connect_options(settings)?)
            .await
            .map_err(|e| StoreError::Open(format!("{}: {e}", settings.url)))?;
        let pool = SqlitePoolOptions::new()
            .max_connections(settings.max_connections)
            .min_connections(settings.min_connections)
            .acquire_timeout(settings.acquire_timeout)
            .max_lifetime(settings.max_lifetime)
            .idle_timeout(settings.idle_timeout)
            .connect_with(connect_options(settings)?)
            .await
            .map_err(|e| StoreError::Open(format!("{}: {e}", settings.url)))?;
        let _guard = migrate_lock().lock().await;
        let mut migrator = sqlx::migrate!("migrations/sqlite");
        // The job queue (apalis) records its own migrations in the same table.
        migrator.set_ignore_missing(true);
        // Another process may migrate at the same moment: a second attempt sees its work.
        if let Err(first) = migrator.run(&writer).await {
            tracing::warn!(error = %first, "sqlite migration failed, retrying once");
            migrator.run(&writer).await?;
        }
        let messages = batch::MessageWriter::spawn(batch::PoolWriter(writer.clone()));
        Ok(Self { pool, writer, messages })
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// The single-connection pool all of the store's writes go through.
    pub fn writer(&self) -> &SqlitePool {
        &self.writer
    }

    fn extra_writer_size(&self) -> u32 {
        self.writer.size()
    }

    fn extra_writer_idle(&self) -> u32 {
        self.writer.num_idle() as u32
    }
}

// Multi-row reads come back as ONE row holding a JSON array that SQLite builds:
// sqlx-sqlite runs each connection on its own thread and hands every result row to the
// async side through a channel, waking the waiting task once per row. A 20-row page cost
// ~20 thread wake-ups; one row costs one. (Measured under the seed workload: the worker
// threads' futex waits and wake-ups were the largest item of the app's CPU profile.)

/// The columns of a [`Conversation`] as a JSON object (`c` conversation, `m` its last message).
const CONVERSATION_JSON: &str = "json_object('id', c.id, 'user_id', c.user_id, 'title', c.title, \
     'message_count', c.message_count, 'last_message_id', c.last_message_id, \
     'last_message_role', m.role, 'last_message_preview', substr(m.content, 1, 120), \
     'created_at', c.created_at, 'updated_at', c.updated_at)";

/// The columns of a [`Message`] as a JSON object.
const MESSAGE_JSON: &str = "json_object('id', id, 'conversation_id', conversation_id, 'role', role, \
     'content', content, 'reply_to', reply_to, 'created_at', created_at)";

fn decode_json<T: serde::de::DeserializeOwned>(json: &str) -> Result<T, sqlx::Error> {
    serde_json::from_str(json).map_err(|e| sqlx::Error::Decode(Box::new(e)))
}

impl SqliteStore {
    /// The user's conversations, newest activity first, as one JSON row.
    async fn read_conversations(&self, user_id: i64, limit: u32) -> Result<Vec<Conversation>, sqlx::Error> {
        static SQL: OnceLock<String> = OnceLock::new();
        let sql = SQL.get_or_init(|| {
            format!(
                "SELECT json_group_array({CONVERSATION_JSON} ORDER BY c.updated_at DESC, c.id DESC) \
                 FROM (SELECT * FROM conversations WHERE user_id = $1 \
                       ORDER BY updated_at DESC, id DESC LIMIT $2) c \
                 LEFT JOIN messages m ON m.id = c.last_message_id"
            )
        });
        let (json,): (String,) = sqlx::query_as(sql.as_str())
            .bind(user_id)
            .bind(i64::from(limit))
            .fetch_one(&self.pool)
            .await?;
        decode_json(&json)
    }

    /// The reply check and the history (only if the conversation is `user_id`'s) in one
    /// statement.
    async fn read_reply_context(
        &self,
        user_id: i64,
        conversation_id: i64,
        user_message_id: i64,
        history: u32,
    ) -> Result<ReplyContext, sqlx::Error> {
        static SQL: OnceLock<String> = OnceLock::new();
        let sql = SQL.get_or_init(|| {
            format!(
                "SELECT EXISTS (SELECT 1 FROM messages WHERE reply_to = $1), \
                 (SELECT json_group_array({MESSAGE_JSON} ORDER BY id) FROM (SELECT m.* FROM messages m \
                  JOIN conversations c ON c.id = m.conversation_id AND c.user_id = $4 \
                  WHERE m.conversation_id = $2 AND m.id <= $1 ORDER BY m.id DESC LIMIT $3))"
            )
        });
        let (replied, json): (bool, String) = sqlx::query_as(sql.as_str())
            .bind(user_message_id)
            .bind(conversation_id)
            .bind(i64::from(history))
            .bind(user_id)
            .fetch_one(&self.pool)
            .await?;
        Ok(ReplyContext {
            replied,
            history: decode_json(&json)?,
        })
    }

    /// A page of a conversation's messages, ascending, as one JSON row; no row when the
    /// conversation is not `user_id`'s (the page is read through that conversation row).
    async fn read_messages(
        &self,
        user_id: i64,
        conversation_id: i64,
        page: Page,
    ) -> Result<Option<Vec<Message>>, sqlx::Error> {
        static AFTER: OnceLock<String> = OnceLock::new();
        static BEFORE: OnceLock<String> = OnceLock::new();
        let page_of = |filter: &str| {
            format!(
                "SELECT (SELECT json_group_array({MESSAGE_JSON} ORDER BY id) FROM (SELECT * FROM messages \
                 WHERE conversation_id = c.id AND {filter} LIMIT $3)) \
                 FROM conversations c WHERE c.id = $1 AND c.user_id = $4"
            )
        };
        let (sql, bound, limit) = match page {
            Page::After { after, limit } => (AFTER.get_or_init(|| page_of("id > $2 ORDER BY id ASC")), after, limit),
            Page::Before { before, limit } => (
                BEFORE.get_or_init(|| page_of("id < $2 ORDER BY id DESC")),
                before,
                limit,
            ),
        };
        let row: Option<(String,)> = sqlx::query_as(sql.as_str())
            .bind(conversation_id)
            .bind(bound)
            .bind(i64::from(limit))
            .bind(user_id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|(json,)| decode_json(&json)).transpose()
    }
}

/// Writes jobs into apalis-sqlite's table inside the caller's transaction, in ONE
/// multi-row statement. apalis-sqlite 1.0's `push_tasks` writes the same row per task
/// (its `queries/task/sink.sql`) but one statement each, and every statement is a round
/// trip to the connection's thread while the single writer is held; a group commit of
/// a dozen posts spent most of its time there. Every test that waits for an AI reply
/// runs jobs written here.
async fn push_jobs(conn: &mut sqlx::SqliteConnection, queue: &str, payloads: Vec<Vec<u8>>) -> StoreResult<()> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let tasks: Vec<_> = payloads
        .into_iter()
        .map(|p| apalis::prelude::TaskBuilder::new(p).build())
        .collect();
    let mut qb = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
        "INSERT INTO Jobs (job, id, job_type, status, attempts, max_attempts, run_at, priority, metadata, idempotency_key) ",
    );
    qb.push_values(&tasks, |mut row, task| {
        let id = task
            .task_id()
            .map(|id| id.to_string())
            .unwrap_or_else(|| ulid::Ulid::generate().to_string());
        row.push_bind(task.args.as_slice())
            .push_bind(id)
            .push_bind(queue)
            .push_bind("Pending")
            .push_bind(0i64)
            .push_bind(task.max_attempts().unwrap_or(25) as i64)
            .push_bind(task.run_at().map(|t| t as i64).unwrap_or(now))
            .push_bind(task.priority().unwrap_or_default() as i64)
            .push_bind(serde_json::to_string(task.metadata()).unwrap_or_default())
            .push_bind(task.idempotency_key().map(str::to_owned));
    });
    qb.push(" ON CONFLICT (job_type, idempotency_key) DO NOTHING");
    qb.build()
        .persistent(tasks.len() == 1)
        .execute(conn)
        .await
        .map(|_| ())
        .map_err(|e| StoreError::Enqueue(e.to_string()))
}

impl_store!(SqliteStore, sqlx::Sqlite, "sqlite", push_jobs);
