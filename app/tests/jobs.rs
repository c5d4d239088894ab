//! Job recovery: while the SQLite file is write-locked by another connection, the job
//! worker fails (apalis marks its backend dead on the database error and drops the running
//! reply); the worker is rebuilt, the orphaned job is re-enqueued after the heartbeat, and
//! the reply is stored exactly once when the database is writable again.

mod common;

use std::time::Duration;

use common::*;
use sqlx::Connection;
use wingman_app::llm::offline::OfflineModel;
use wingman_app::llm::{ChatMessage, ChatRequest};
use wingman_app::Options;

fn restarts(metrics: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("job_worker_restarts_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_interrupted_by_a_locked_database_is_recovered_and_stored_once() {
    let db = TestDb::new(Backend::Sqlite).await;
    let mut settings = test_settings(&db.url);
    settings.database.busy_timeout = Duration::from_millis(100);
    settings.llm.token_delay = Duration::from_millis(30);
    settings.jobs.retries = 5;
    settings.jobs.heartbeat_interval = Duration::from_secs(1);
    let app = TestApp::start(settings, Options::default()).await;
    let (token, _) = app.register("retry").await;
    let conv = app.new_conversation(&token, "r").await;
    let mut ws = app.ws(&token).await;
    let text = "please survive a locked database";
    let id = app.post_message(&token, conv, text).await["message"]["id"]
        .as_i64()
        .expect("id");
    ws.until(|v| v["type"] == "token" && v["reply_to"] == id).await;

    // another connection takes the write lock while the reply is streaming
    let mut locker = sqlx::SqliteConnection::connect(&db.url).await.expect("locker");
    sqlx::query("BEGIN IMMEDIATE").execute(&mut locker).await.expect("lock");
    let before = restarts(&app.metrics().await);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while restarts(&app.metrics().await) == before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the lock never hit the job queue"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sqlx::query("ROLLBACK").execute(&mut locker).await.expect("unlock");

    let final_msg = ws
        .until(|v| v["type"] == "message" && v["message"]["reply_to"] == id)
        .await
        .pop()
        .expect("final")["message"]
        .clone();
    let want = OfflineModel::reply_for(&ChatRequest {
        messages: vec![ChatMessage {
            role: "user".into(),
            content: text.into(),
        }],
    });
    assert_eq!(final_msg["content"].as_str(), Some(want.as_str()));
    let (_, v) = app.list_messages(&token, conv).await;
    let replies = v["messages"]
        .as_array()
        .expect("array")
        .iter()
        .filter(|m| m["reply_to"] == id)
        .count();
    assert_eq!(replies, 1, "exactly one stored reply: {v}");
    app.stop().await;
}
