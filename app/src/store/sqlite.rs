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
/// instead of sleeping in SQLite's busy handler. (The job queue has its own small pool.)
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    writer: SqlitePool,
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
        Ok(Self { pool, writer })
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

/// Writes one job into apalis-sqlite's table inside the caller's transaction.
async fn push_job(conn: &mut sqlx::SqliteConnection, queue: &str, payload: Vec<u8>) -> StoreResult<()> {
    let task = apalis::prelude::TaskBuilder::new(payload).build();
    apalis_sqlite::queries::push_tasks(conn, queue, &[task])
        .await
        .map_err(|e| StoreError::Enqueue(e.to_string()))
}

impl_store!(SqliteStore, sqlx::Sqlite, "sqlite", push_job);
