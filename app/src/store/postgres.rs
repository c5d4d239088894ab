//! [`PgStore`]: PostgreSQL, selected when `database.url` is `postgres://…`. Optional
//! `database.schema` puts the app's tables in their own schema (created if missing).

use std::str::FromStr;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgPool};

use super::*;
use crate::config::DatabaseSettings;

/// PostgreSQL implementation of [`Store`].
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    /// The same pool (PostgreSQL handles concurrent writers itself).
    writer: PgPool,
    /// Message inserts, group-committed (one commit per batch).
    messages: batch::MessageWriter,
}

impl PgStore {
    pub async fn open(settings: &DatabaseSettings) -> StoreResult<Self> {
        let mut options =
            PgConnectOptions::from_str(&settings.url).map_err(|e| StoreError::Open(format!("database.url: {e}")))?;
        if !settings.schema.is_empty() {
            // validated to [A-Za-z0-9_]
            let mut conn = sqlx::PgConnection::connect_with(&options)
                .await
                .map_err(|e| StoreError::Open(format!("{e}")))?;
            let sql = format!("CREATE SCHEMA IF NOT EXISTS \"{}\"", settings.schema);
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                .execute(&mut conn)
                .await
                .map_err(|e| StoreError::Open(format!("create schema: {e}")))?;
            let _ = conn.close().await;
            // public stays on the path: the job queue's hstore type lives there
            let path = format!("{},public", settings.schema);
            options = options.options([("search_path", path.as_str())]);
        }
        let pool = PgPoolOptions::new()
            .max_connections(settings.max_connections)
            .min_connections(settings.min_connections)
            .acquire_timeout(settings.acquire_timeout)
            .max_lifetime(settings.max_lifetime)
            .idle_timeout(settings.idle_timeout)
            .connect_with(options)
            .await
            .map_err(|e| StoreError::Open(format!("{e}")))?;
        let mut migrator = sqlx::migrate!("migrations/postgres");
        migrator.set_ignore_missing(true);
        // sqlx takes pg_advisory_lock around the run, so instances may start together.
        migrator.run(&pool).await?;
        Ok(Self {
            writer: pool.clone(),
            messages: batch::MessageWriter::spawn(batch::PoolWriter(pool.clone())),
            pool,
        })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    fn extra_writer_size(&self) -> u32 {
        0
    }

    fn extra_writer_idle(&self) -> u32 {
        0
    }
}

impl PgStore {
    /// The user's conversations, newest activity first: one row each.
    async fn read_conversations(&self, user_id: i64, limit: u32) -> Result<Vec<Conversation>, sqlx::Error> {
        sqlx::query_as::<_, Conversation>(
            "SELECT c.id, c.user_id, c.title, c.message_count, c.last_message_id, \
             m.role AS last_message_role, substr(m.content, 1, 120) AS last_message_preview, \
             c.created_at, c.updated_at \
             FROM conversations c LEFT JOIN messages m ON m.id = c.last_message_id \
             WHERE c.user_id = $1 ORDER BY c.updated_at DESC, c.id DESC LIMIT $2",
        )
        .bind(user_id)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
    }

    /// Two reads: the reply check, then the history (only if the conversation is
    /// `user_id`'s).
    async fn read_reply_context(
        &self,
        user_id: i64,
        conversation_id: i64,
        user_message_id: i64,
        history: u32,
    ) -> Result<ReplyContext, sqlx::Error> {
        let (replied,): (bool,) = sqlx::query_as("SELECT EXISTS (SELECT 1 FROM messages WHERE reply_to = $1)")
            .bind(user_message_id)
            .fetch_one(&self.pool)
            .await?;
        if replied {
            return Ok(ReplyContext {
                replied,
                history: Vec::new(),
            });
        }
        let history = self
            .read_messages(
                user_id,
                conversation_id,
                Page::Before {
                    before: user_message_id + 1,
                    limit: history,
                },
            )
            .await?
            .unwrap_or_default();
        Ok(ReplyContext { replied, history })
    }

    /// A page of a conversation's messages, ascending: one row each, read through the
    /// conversation row of `user_id` (no row: not that user's conversation; one row of
    /// NULLs: no message on this page).
    async fn read_messages(
        &self,
        user_id: i64,
        conversation_id: i64,
        page: Page,
    ) -> Result<Option<Vec<Message>>, sqlx::Error> {
        const AFTER: &str = "SELECT m.id, m.conversation_id, m.role, m.content, m.reply_to, m.created_at \
             FROM conversations c LEFT JOIN LATERAL (SELECT * FROM messages \
             WHERE conversation_id = c.id AND id > $2 ORDER BY id ASC LIMIT $3) m ON true \
             WHERE c.id = $1 AND c.user_id = $4";
        const BEFORE: &str = "SELECT m.id, m.conversation_id, m.role, m.content, m.reply_to, m.created_at \
             FROM conversations c LEFT JOIN LATERAL (SELECT * FROM messages \
             WHERE conversation_id = c.id AND id < $2 ORDER BY id DESC LIMIT $3) m ON true \
             WHERE c.id = $1 AND c.user_id = $4";
        let (sql, bound, limit, newest_first) = match page {
            Page::After { after, limit } => (AFTER, after, limit, false),
            Page::Before { before, limit } => (BEFORE, before, limit, true),
        };
        let rows = sqlx::query_as::<_, PageRow>(sql)
            .bind(conversation_id)
            .bind(bound)
            .bind(i64::from(limit))
            .bind(user_id)
            .fetch_all(&self.pool)
            .await?;
        if rows.is_empty() {
            return Ok(None);
        }
        let mut messages: Vec<Message> = rows.into_iter().filter_map(PageRow::message).collect();
        if newest_first {
            messages.reverse();
        }
        Ok(Some(messages))
    }
}

/// A row of [`PgStore::read_messages`]: a message, or NULLs for a page without one.
#[derive(sqlx::FromRow)]
struct PageRow {
    id: Option<i64>,
    conversation_id: Option<i64>,
    role: Option<String>,
    content: Option<String>,
    reply_to: Option<i64>,
    created_at: Option<i64>,
}

impl PageRow {
    fn message(self) -> Option<Message> {
        Some(Message {
            id: self.id?,
            conversation_id: self.conversation_id?,
            role: self.role?,
            content: self.content?,
            reply_to: self.reply_to,
            created_at: self.created_at?,
        })
    }
}

/// Writes jobs into apalis-postgres' table inside the caller's transaction.
async fn push_jobs(conn: &mut sqlx::PgConnection, queue: &str, payloads: Vec<Vec<u8>>) -> StoreResult<()> {
    let tasks: Vec<_> = payloads
        .into_iter()
        .map(|p| apalis::prelude::TaskBuilder::new(p).build())
        .collect();
    apalis_postgres::queries::push_tasks(conn, queue, tasks)
        .await
        .map_err(|e| StoreError::Enqueue(e.to_string()))
}

impl_store!(PgStore, sqlx::Postgres, "postgres", push_jobs);
