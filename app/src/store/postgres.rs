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

/// Writes one job into apalis-postgres' table inside the caller's transaction.
async fn push_job(conn: &mut sqlx::PgConnection, queue: &str, payload: Vec<u8>) -> StoreResult<()> {
    let task = apalis::prelude::TaskBuilder::new(payload).build();
    apalis_postgres::queries::push_tasks(conn, queue, vec![task])
        .await
        .map_err(|e| StoreError::Enqueue(e.to_string()))
}

impl_store!(PgStore, sqlx::Postgres, "postgres", push_job);
