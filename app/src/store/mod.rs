//! Storage: the [`Store`] trait the HTTP layer and the jobs use, its models and errors,
//! and the two implementations ([`sqlite::SqliteStore`], [`postgres::PgStore`]).
//!
//! Both implementations run the same SQL text (both dialects accept `$N` placeholders,
//! `RETURNING`, partial indexes and `ON CONFLICT … DO NOTHING`); the shared method bodies
//! live in the `impl_store!` macro, instantiated once per typed pool, so each backend keeps
//! its native types and there is no `Any` driver in the hot path.
//!
//! Query shapes (each has an index, see `migrations/`):
//! - the conversation list is ONE query: the message count and the last message id are
//!   kept on the conversation row by a trigger on every message insert (so in the same
//!   statement), and the preview comes from a join on `last_message_id`;
//! - message inserts are group-committed: see [`batch`];
//! - message pages are keyset-paginated on `(conversation_id, id)`;
//! - imports insert all messages with one multi-row `INSERT`.

use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use serde::Serialize;

pub mod batch;
pub mod postgres;
pub mod sqlite;

use batch::{JobSpec, NewMessageOp};

/// What went wrong in the database layer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A unique constraint was hit (e.g. the username is taken).
    #[error("already exists: {0}")]
    Conflict(&'static str),
    /// The database cannot be reached or the pool is exhausted.
    #[error("database unavailable during {op}: {source}")]
    Unavailable {
        op: &'static str,
        #[source]
        source: sqlx::Error,
    },
    /// Any other database error.
    #[error("database error during {op}: {source}")]
    Database {
        op: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("could not open the database: {0}")]
    Open(String),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The job could not be written to the queue (the transaction was rolled back).
    #[error("enqueue failed: {0}")]
    Enqueue(String),
}

impl StoreError {
    /// Classifies a sqlx error raised during `op`.
    pub fn from_sqlx(op: &'static str, err: sqlx::Error) -> Self {
        match &err {
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::BeginFailed
            | sqlx::Error::WorkerCrashed => StoreError::Unavailable { op, source: err },
            sqlx::Error::Database(db) => {
                let code = db.code().map(|c| c.to_string()).unwrap_or_default();
                // SQLITE_BUSY (5) / SQLITE_LOCKED (6); PG admin shutdown / cannot connect now
                if matches!(code.as_str(), "5" | "6" | "57P01" | "57P03" | "53300") {
                    StoreError::Unavailable { op, source: err }
                } else {
                    StoreError::Database { op, source: err }
                }
            }
            _ => StoreError::Database { op, source: err },
        }
    }

    /// A foreign key failed: the row it refers to (a conversation, say) is gone.
    pub fn is_missing_parent(&self) -> bool {
        matches!(self, StoreError::Database { source: sqlx::Error::Database(d), .. } if d.is_foreign_key_violation())
    }

    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable { .. } | StoreError::Enqueue(_))
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct User {
    pub id: i64,
    pub username: String,
    pub display_name: String,
    pub created_at: i64,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Credentials {
    pub id: i64,
    pub username: String,
    pub display_name: String,
    pub created_at: i64,
    pub password_hash: String,
}

impl Credentials {
    pub fn user(&self) -> User {
        User {
            id: self.id,
            username: self.username.clone(),
            display_name: self.display_name.clone(),
            created_at: self.created_at,
        }
    }
}

/// An unexpired session and its user.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Session {
    #[sqlx(flatten)]
    pub user: User,
    /// When the session ends (Unix milliseconds).
    pub expires_at: i64,
}

/// A conversation with its message count and a preview of its last message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize, sqlx::FromRow)]
pub struct Conversation {
    pub id: i64,
    pub user_id: i64,
    pub title: String,
    pub message_count: i64,
    pub last_message_id: Option<i64>,
    pub last_message_role: Option<String>,
    pub last_message_preview: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize, sqlx::FromRow)]
pub struct Message {
    pub id: i64,
    pub conversation_id: i64,
    pub role: String,
    pub content: String,
    pub reply_to: Option<i64>,
    pub created_at: i64,
}

/// A message to insert in a batch.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub role: String,
    pub content: String,
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Export {
    pub id: i64,
    pub conversation_id: i64,
    pub body: String,
    pub created_at: i64,
}

/// Which slice of a conversation's messages to read (keyset pagination on `id`).
#[derive(Debug, Clone, Copy)]
pub enum Page {
    /// The oldest `limit` messages with `id > after`, ascending (catch-up, forward paging).
    After { after: i64, limit: u32 },
    /// The newest `limit` messages with `id < before`, returned ascending (scroll back).
    Before { before: i64, limit: u32 },
}

/// What an AI job reads before it asks the model (see [`Store::reply_context`]).
#[derive(Debug, Clone)]
pub struct ReplyContext {
    /// The user message already has a stored reply (an earlier attempt finished).
    pub replied: bool,
    /// The conversation's newest messages up to and including the user message, ascending.
    pub history: Vec<Message>,
}

/// Connection pool gauges.
#[derive(Debug, Clone, Copy, Default)]
pub struct PoolStats {
    pub size: u32,
    pub idle: u32,
}

/// Characters of the last message shown in the conversation list.
pub const PREVIEW_CHARS: i64 = 120;

/// Everything the app asks of its database.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// `"sqlite"` or `"postgres"`.
    fn backend(&self) -> &'static str;
    fn pool_stats(&self) -> PoolStats;
    /// A trivial round trip, for `/readyz`.
    async fn ping(&self) -> StoreResult<()>;
    /// Closes the pool (waits for checked-out connections).
    async fn close(&self);

    async fn create_user(&self, username: &str, password_hash: &str, display_name: &str) -> StoreResult<User>;
    async fn credentials(&self, username: &str) -> StoreResult<Option<Credentials>>;
    async fn update_display_name(&self, user_id: i64, display_name: &str) -> StoreResult<Option<User>>;
    async fn create_session(&self, token_hash: &str, user_id: i64, expires_at: i64) -> StoreResult<()>;
    /// The unexpired session `token_hash` and its user.
    async fn session_user(&self, token_hash: &str, now: i64) -> StoreResult<Option<Session>>;
    /// Ends one session; false when there was none.
    async fn delete_session(&self, token_hash: &str) -> StoreResult<bool>;
    /// Ends every session of a user; returns how many there were.
    async fn delete_user_sessions(&self, user_id: i64) -> StoreResult<u64>;
    /// Deletes the sessions expired at `now`; returns how many.
    async fn prune_sessions(&self, now: i64) -> StoreResult<u64>;

    async fn create_conversation(&self, user_id: i64, title: &str) -> StoreResult<Conversation>;
    /// Creates a conversation with its messages in one transaction (one multi-row insert).
    async fn import_conversation(
        &self,
        user_id: i64,
        title: &str,
        messages: &[NewMessage],
    ) -> StoreResult<Conversation>;
    async fn rename_conversation(&self, user_id: i64, id: i64, title: &str) -> StoreResult<Option<Conversation>>;
    /// False when there is no such conversation of this user.
    async fn delete_conversation(&self, user_id: i64, id: i64) -> StoreResult<bool>;
    /// The conversation if it exists and belongs to `user_id`.
    async fn conversation(&self, user_id: i64, id: i64) -> StoreResult<Option<Conversation>>;
    /// The user's conversations, most recently active first, in one query.
    async fn list_conversations(&self, user_id: i64, limit: u32) -> StoreResult<Vec<Conversation>>;

    // Every read and write of a conversation's messages (and of its exports) names the
    // user it is for, and the statement itself checks that the conversation belongs to
    // that user (a join on `conversations.user_id`): no caller-side ownership check, and
    // so no cached authorization decision, stands between a request and the rows.

    /// A page of messages, ascending by id; `None` when the conversation does not exist
    /// or is not `user_id`'s (checked in the same statement).
    async fn list_messages(&self, user_id: i64, conversation_id: i64, page: Page) -> StoreResult<Option<Vec<Message>>>;
    /// Inserts a message and bumps the conversation's count, last message and activity time.
    /// Returns `None` when nothing was stored: the conversation does not exist or is not
    /// `user_id`'s (checked in the inserting statement), or, with `reply_to`, that message
    /// already has a reply (idempotent retry).
    async fn insert_message(
        &self,
        user_id: i64,
        conversation_id: i64,
        role: &str,
        content: &str,
        reply_to: Option<i64>,
    ) -> StoreResult<Option<Message>>;
    /// Inserts a message like [`Store::insert_message`] and, in the same transaction,
    /// enqueues the job `job(message_id)` on the job queue `queue` (whose tables live in the
    /// same database): the message and its reply job are stored together or not at all.
    /// `None` (and no job) when the conversation does not exist or is not `user_id`'s.
    async fn insert_message_with_job(
        &self,
        user_id: i64,
        conversation_id: i64,
        role: &str,
        content: &str,
        queue: &str,
        job: Box<dyn Fn(i64) -> Vec<u8> + Send + Sync>,
    ) -> StoreResult<Option<Message>>;
    /// Whether `user_message_id` has a reply yet, and the `history` newest messages of
    /// its conversation up to it (none when the conversation is not `user_id`'s): what an
    /// AI job needs, in one read where the database allows.
    async fn reply_context(
        &self,
        user_id: i64,
        conversation_id: i64,
        user_message_id: i64,
        history: u32,
    ) -> StoreResult<ReplyContext>;

    /// Stores an export; `None` when the conversation is gone or not `user_id`'s.
    async fn save_export(&self, user_id: i64, conversation_id: i64, body: &str) -> StoreResult<Option<Export>>;
    /// The newest export of `user_id`'s conversation.
    async fn latest_export(&self, user_id: i64, conversation_id: i64) -> StoreResult<Option<Export>>;
}

/// Shared implementation over a typed pool; `$db` is `sqlx::Sqlite` or `sqlx::Postgres`.
macro_rules! impl_store {
    ($store:ty, $db:ty, $backend:literal, $push_job:path) => {
        #[async_trait]
        impl Store for $store {
        fn backend(&self) -> &'static str {
            $backend
        }
        async fn create_user(&self, username: &str, password_hash: &str, display_name: &str) -> StoreResult<User> {
            sqlx::query_as::<$db, User>(
                "INSERT INTO users (username, password_hash, display_name, created_at) VALUES ($1, $2, $3, $4) \
                 RETURNING id, username, display_name, created_at",
            )
            .bind(username)
            .bind(password_hash)
            .bind(display_name)
            .bind(now_ms())
            .fetch_one(&self.writer)
            .await
            .map_err(|e| match &e {
                sqlx::Error::Database(d) if d.is_unique_violation() => StoreError::Conflict("username"),
                _ => StoreError::from_sqlx("create_user", e),
            })
        }

        async fn credentials(&self, username: &str) -> StoreResult<Option<Credentials>> {
            sqlx::query_as::<$db, Credentials>(
                "SELECT id, username, display_name, created_at, password_hash FROM users WHERE username = $1",
            )
            .bind(username)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| StoreError::from_sqlx("credentials", e))
        }

        async fn update_display_name(&self, user_id: i64, display_name: &str) -> StoreResult<Option<User>> {
            sqlx::query_as::<$db, User>(
                "UPDATE users SET display_name = $1 WHERE id = $2 RETURNING id, username, display_name, created_at",
            )
            .bind(display_name)
            .bind(user_id)
            .fetch_optional(&self.writer)
            .await
            .map_err(|e| StoreError::from_sqlx("update_display_name", e))
        }

        async fn create_session(&self, token_hash: &str, user_id: i64, expires_at: i64) -> StoreResult<()> {
            sqlx::query::<$db>("INSERT INTO sessions (token_hash, user_id, created_at, expires_at) VALUES ($1, $2, $3, $4)")
                .bind(token_hash)
                .bind(user_id)
                .bind(now_ms())
                .bind(expires_at)
                .execute(&self.writer)
                .await
                .map_err(|e| StoreError::from_sqlx("create_session", e))?;
            Ok(())
        }

        async fn session_user(&self, token_hash: &str, now: i64) -> StoreResult<Option<Session>> {
            sqlx::query_as::<$db, Session>(
                "SELECT u.id, u.username, u.display_name, u.created_at, s.expires_at FROM sessions s \
                 JOIN users u ON u.id = s.user_id WHERE s.token_hash = $1 AND s.expires_at > $2",
            )
            .bind(token_hash)
            .bind(now)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| StoreError::from_sqlx("session_user", e))
        }

        async fn delete_session(&self, token_hash: &str) -> StoreResult<bool> {
            let done = sqlx::query::<$db>("DELETE FROM sessions WHERE token_hash = $1")
                .bind(token_hash)
                .execute(&self.writer)
                .await
                .map_err(|e| StoreError::from_sqlx("delete_session", e))?;
            Ok(done.rows_affected() > 0)
        }

        async fn delete_user_sessions(&self, user_id: i64) -> StoreResult<u64> {
            let done = sqlx::query::<$db>("DELETE FROM sessions WHERE user_id = $1")
                .bind(user_id)
                .execute(&self.writer)
                .await
                .map_err(|e| StoreError::from_sqlx("delete_user_sessions", e))?;
            Ok(done.rows_affected())
        }

        async fn prune_sessions(&self, now: i64) -> StoreResult<u64> {
            let done = sqlx::query::<$db>("DELETE FROM sessions WHERE expires_at <= $1")
                .bind(now)
                .execute(&self.writer)
                .await
                .map_err(|e| StoreError::from_sqlx("prune_sessions", e))?;
            Ok(done.rows_affected())
        }

        async fn create_conversation(&self, user_id: i64, title: &str) -> StoreResult<Conversation> {
            let now = now_ms();
            sqlx::query_as::<$db, Conversation>(
                "INSERT INTO conversations (user_id, title, created_at, updated_at) VALUES ($1, $2, $3, $3) \
                 RETURNING id, user_id, title, message_count, last_message_id, \
                 NULL AS last_message_role, NULL AS last_message_preview, created_at, updated_at",
            )
            .bind(user_id)
            .bind(title)
            .bind(now)
            .fetch_one(&self.writer)
            .await
            .map_err(|e| StoreError::from_sqlx("create_conversation", e))
        }

        async fn import_conversation(&self, user_id: i64, title: &str, messages: &[NewMessage]) -> StoreResult<Conversation> {
            let op = "import_conversation";
            let now = now_ms();
            let mut tx = self.writer.begin().await.map_err(|e| StoreError::from_sqlx(op, e))?;
            let (id,): (i64,) = sqlx::query_as::<$db, (i64,)>(
                "INSERT INTO conversations (user_id, title, created_at, updated_at) VALUES ($1, $2, $3, $3) RETURNING id",
            )
            .bind(user_id)
            .bind(title)
            .bind(now)
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| StoreError::from_sqlx(op, e))?;
            // One multi-row INSERT per chunk (SQLite allows 32766 bind parameters).
            for chunk in messages.chunks(1000) {
                let mut qb = sqlx::QueryBuilder::<$db>::new("INSERT INTO messages (conversation_id, role, content, created_at) ");
                qb.push_values(chunk, |mut row, m| {
                    row.push_bind(id).push_bind(m.role.as_str()).push_bind(m.content.as_str()).push_bind(now);
                });
                qb.build().execute(&mut *tx).await.map_err(|e| StoreError::from_sqlx(op, e))?;
            }
            // (the trigger counted them into the conversation)
            tx.commit().await.map_err(|e| StoreError::from_sqlx(op, e))?;
            self.conversation(user_id, id)
                .await?
                .ok_or(StoreError::Database { op, source: sqlx::Error::RowNotFound })
        }

        async fn rename_conversation(&self, user_id: i64, id: i64, title: &str) -> StoreResult<Option<Conversation>> {
            let done = sqlx::query::<$db>("UPDATE conversations SET title = $1 WHERE id = $2 AND user_id = $3")
                .bind(title)
                .bind(id)
                .bind(user_id)
                .execute(&self.writer)
                .await
                .map_err(|e| StoreError::from_sqlx("rename_conversation", e))?;
            if done.rows_affected() == 0 {
                return Ok(None);
            }
            self.conversation(user_id, id).await
        }

        async fn delete_conversation(&self, user_id: i64, id: i64) -> StoreResult<bool> {
            let done = sqlx::query::<$db>("DELETE FROM conversations WHERE id = $1 AND user_id = $2")
                .bind(id)
                .bind(user_id)
                .execute(&self.writer)
                .await
                .map_err(|e| StoreError::from_sqlx("delete_conversation", e))?;
            Ok(done.rows_affected() > 0)
        }

        async fn conversation(&self, user_id: i64, id: i64) -> StoreResult<Option<Conversation>> {
            const SQL: &str = concat!(
                "SELECT c.id, c.user_id, c.title, c.message_count, c.last_message_id, \
                 m.role AS last_message_role, substr(m.content, 1, 120) AS last_message_preview, \
                 c.created_at, c.updated_at \
                 FROM conversations c LEFT JOIN messages m ON m.id = c.last_message_id",
                " WHERE c.id = $1 AND c.user_id = $2"
            );
            sqlx::query_as::<$db, Conversation>(SQL)
                .bind(id)
                .bind(user_id)
                .fetch_optional(&self.pool)
                .await
                .map_err(|e| StoreError::from_sqlx("conversation", e))
        }

        async fn list_conversations(&self, user_id: i64, limit: u32) -> StoreResult<Vec<Conversation>> {
            self.read_conversations(user_id, limit)
                .await
                .map_err(|e| StoreError::from_sqlx("list_conversations", e))
        }

        async fn list_messages(&self, user_id: i64, conversation_id: i64, page: Page) -> StoreResult<Option<Vec<Message>>> {
            self.read_messages(user_id, conversation_id, page)
                .await
                .map_err(|e| StoreError::from_sqlx("list_messages", e))
        }

        async fn insert_message(&self, user_id: i64, conversation_id: i64, role: &str, content: &str, reply_to: Option<i64>) -> StoreResult<Option<Message>> {
            self.messages
                .write(NewMessageOp {
                    user_id,
                    conversation_id,
                    role: role.to_owned(),
                    content: content.to_owned(),
                    reply_to,
                    created_at: now_ms(),
                    job: None,
                })
                .await
        }

        async fn insert_message_with_job(
            &self,
            user_id: i64,
            conversation_id: i64,
            role: &str,
            content: &str,
            queue: &str,
            job: Box<dyn Fn(i64) -> Vec<u8> + Send + Sync>,
        ) -> StoreResult<Option<Message>> {
            self.messages
                .write(NewMessageOp {
                    user_id,
                    conversation_id,
                    role: role.to_owned(),
                    content: content.to_owned(),
                    reply_to: None,
                    created_at: now_ms(),
                    job: Some(JobSpec {
                        queue: queue.to_owned(),
                        encode: job,
                    }),
                })
                .await
        }

        async fn reply_context(&self, user_id: i64, conversation_id: i64, user_message_id: i64, history: u32) -> StoreResult<ReplyContext> {
            self.read_reply_context(user_id, conversation_id, user_message_id, history)
                .await
                .map_err(|e| StoreError::from_sqlx("reply_context", e))
        }

        async fn save_export(&self, user_id: i64, conversation_id: i64, body: &str) -> StoreResult<Option<Export>> {
            sqlx::query_as::<$db, Export>(
                "INSERT INTO exports (conversation_id, body, created_at) \
                 SELECT id, $2, $3 FROM conversations WHERE id = $1 AND user_id = $4 \
                 RETURNING id, conversation_id, body, created_at",
            )
            .bind(conversation_id)
            .bind(body)
            .bind(now_ms())
            .bind(user_id)
            .fetch_optional(&self.writer)
            .await
            .map_err(|e| StoreError::from_sqlx("save_export", e))
        }

        async fn latest_export(&self, user_id: i64, conversation_id: i64) -> StoreResult<Option<Export>> {
            sqlx::query_as::<$db, Export>(
                "SELECT e.id, e.conversation_id, e.body, e.created_at FROM exports e \
                 JOIN conversations c ON c.id = e.conversation_id \
                 WHERE e.conversation_id = $1 AND c.user_id = $2 ORDER BY e.id DESC LIMIT 1",
            )
            .bind(conversation_id)
            .bind(user_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| StoreError::from_sqlx("latest_export", e))
        }

        fn pool_stats(&self) -> PoolStats {
            PoolStats {
                size: self.pool.size() + self.extra_writer_size(),
                idle: self.pool.num_idle() as u32 + self.extra_writer_idle(),
            }
        }

        async fn ping(&self) -> StoreResult<()> {
            sqlx::query::<$db>("SELECT 1")
                .execute(&self.pool)
                .await
                .map_err(|e| StoreError::from_sqlx("ping", e))?;
            Ok(())
        }

        async fn close(&self) {
            self.pool.close().await;
            self.writer.close().await;
        }
        }

        #[async_trait]
        impl batch::WriteMessages for batch::PoolWriter<$db> {
            async fn write_batch(&self, ops: &[&NewMessageOp]) -> StoreResult<Vec<Option<Message>>> {
                let op = "insert_message";
                let mut tx = self.0.begin().await.map_err(|e| StoreError::from_sqlx(op, e))?;
                // Each row is stored only if its conversation belongs to its user: the
                // join drops the others (they get no row back, like a skipped reply).
                // (`columnN` are the VALUES columns in both databases; the WHERE keeps
                // SQLite from reading ON CONFLICT as the join's constraint.)
                let mut qb = sqlx::QueryBuilder::<$db>::new(
                    "INSERT INTO messages (conversation_id, role, content, reply_to, created_at) \
                     SELECT v.column1, v.column2, v.column3, v.column4, v.column5 FROM (",
                );
                qb.push_values(ops, |mut row, m| {
                    row.push_bind(m.conversation_id)
                        .push_bind(m.role.as_str())
                        .push_bind(m.content.as_str())
                        .push_bind(m.reply_to)
                        .push_bind(m.created_at)
                        .push_bind(m.user_id);
                });
                qb.push(
                    ") AS v JOIN conversations c ON c.id = v.column1 WHERE c.user_id = v.column6 \
                     ON CONFLICT (reply_to) WHERE reply_to IS NOT NULL DO NOTHING \
                     RETURNING id, conversation_id, role, content, reply_to, created_at",
                );
                // one prepared statement per batch size would crowd the statement cache
                let rows = qb
                    .build_query_as::<Message>()
                    .persistent(ops.len() == 1)
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(|e| StoreError::from_sqlx(op, e))?;
                let stored = batch::match_rows(ops, rows);
                let mut jobs: Vec<(&str, Vec<u8>)> = Vec::new();
                for (o, message) in ops.iter().zip(&stored) {
                    if let (Some(job), Some(message)) = (&o.job, message) {
                        jobs.push((job.queue.as_str(), (job.encode)(message.id)));
                    }
                }
                // one push per queue (all posts use the `ai` queue)
                while let Some((queue, _)) = jobs.first() {
                    let queue = *queue;
                    let (same, rest): (Vec<_>, Vec<_>) = jobs.into_iter().partition(|(q, _)| *q == queue);
                    jobs = rest;
                    $push_job(&mut *tx, queue, same.into_iter().map(|(_, p)| p).collect()).await?;
                }
                tx.commit().await.map_err(|e| StoreError::from_sqlx(op, e))?;
                Ok(stored)
            }
        }
    };
}
pub(crate) use impl_store;

/// An open store, and on SQLite the one connection all writes to the file go through
/// (the job queue shares it: see [`crate::jobs::start`]).
pub struct Opened {
    pub store: std::sync::Arc<dyn Store>,
    pub sqlite_writer: Option<sqlx::SqlitePool>,
}

/// Opens the store named by `settings.url` and runs its migrations.
pub async fn open(settings: &crate::config::DatabaseSettings) -> StoreResult<Opened> {
    if settings.url.starts_with("sqlite:") {
        let store = sqlite::SqliteStore::open(settings).await?;
        let writer = store.writer().clone();
        Ok(Opened {
            store: std::sync::Arc::new(store),
            sqlite_writer: Some(writer),
        })
    } else {
        Ok(Opened {
            store: std::sync::Arc::new(postgres::PgStore::open(settings).await?),
            sqlite_writer: None,
        })
    }
}
