//! N+1 regression test: the number of SQL statements a list request runs stays constant
//! as conversations and messages grow. Statements are counted from sqlx's own
//! per-statement `sqlx::query` events by `telemetry::QueryCounter` (the job queue's
//! statements are excluded). One test per binary, so no other test's queries interfere.

mod common;

use common::*;
use serde_json::json;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::prelude::*;
use wingman_app::telemetry::QueryCounter;
use wingman_app::Options;

/// Waits until no statement event is still in flight: on SQLite, sqlx emits a
/// statement's event from the connection's worker thread, which can be a moment after
/// the rows reached the handler. Two `/healthz` round trips (no SQL) with an unchanged
/// count in between mark the quiet point (bounded to 50 rounds).
async fn settle(counter: &QueryCounter, app: &TestApp) {
    let mut last = counter.get();
    for _ in 0..50 {
        app.call("GET", "/healthz", None, None).await;
        let now = counter.get();
        if now == last {
            return;
        }
        last = now;
    }
    panic!("statement count never settled");
}

async fn queries_for(counter: &QueryCounter, app: &TestApp, token: &str, path: &str) -> Counted {
    settle(counter, app).await;
    let before = counter.get();
    let (s, v) = app.call("GET", path, Some(token), None).await;
    assert_eq!(s, 200, "{v}");
    settle(counter, app).await;
    Counted(counter.get() - before, counter.statements_since(before))
}

/// A statement count and the statements (shown when an assertion fails).
#[derive(Debug)]
struct Counted(
    u64,
    #[allow(dead_code)] /* read through Debug in assertion messages */ Vec<String>,
);

impl PartialEq for Counted {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}

impl PartialEq<u64> for Counted {
    fn eq(&self, other: &u64) -> bool {
        self.0 == *other
    }
}

async fn import(app: &TestApp, token: &str, n_messages: usize) -> i64 {
    let messages: Vec<_> = (0..n_messages)
        .map(|i| json!({"role": "user", "content": format!("message {i}")}))
        .collect();
    let (s, v) = app
        .call(
            "POST",
            "/api/conversations/import",
            Some(token),
            Some(json!({"title": "c", "messages": messages})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    v["conversation"]["id"].as_i64().expect("id")
}

async fn check(counter: &QueryCounter, backend: Backend) {
    let db = TestDb::new(backend).await;
    let app = TestApp::start(test_settings(&db.url), Options::default()).await;
    let (token, _) = app.register("counter").await;
    app.call("GET", "/api/me", Some(&token), None).await; // warms the token cache

    let first = import(&app, &token, 3).await;
    let small_list = queries_for(counter, &app, &token, "/api/conversations").await;
    let cached_list = queries_for(counter, &app, &token, "/api/conversations").await;
    let small_msgs = queries_for(counter, &app, &token, &format!("/api/conversations/{first}/messages")).await;

    let mut last = first;
    for _ in 0..40 {
        last = import(&app, &token, 25).await;
    }
    let big_list = queries_for(counter, &app, &token, "/api/conversations").await;
    let big_msgs = queries_for(counter, &app, &token, &format!("/api/conversations/{last}/messages")).await;
    let (_, v) = app.call("GET", "/api/conversations", Some(&token), None).await;
    assert_eq!(v["conversations"].as_array().expect("array").len(), 41);
    assert_eq!(v["conversations"][0]["message_count"], 25);

    eprintln!(
        "{backend:?}: list {} -> {} statements (cached: {}); messages {} -> {}",
        small_list.0, big_list.0, cached_list.0, small_msgs.0, big_msgs.0
    );
    assert!(
        small_list.0 >= 1,
        "the counter saw no statement: is sqlx::query logging reaching it?"
    );
    assert_eq!(small_list, big_list, "conversation list statements grew with the data");
    assert_eq!(big_list, 1, "the conversation list must be one query");
    assert_eq!(cached_list, 0, "a repeated list must come from the cache");
    assert_eq!(small_msgs, big_msgs, "message page statements grew with the data");
    assert_eq!(
        big_msgs, 1,
        "a message page, with its ownership check, must be one query"
    );
    app.stop().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_requests_run_a_constant_number_of_queries() {
    let counter = QueryCounter::new();
    tracing_subscriber::registry()
        .with(
            counter
                .clone()
                .with_filter(Targets::new().with_target("sqlx::query", tracing::Level::TRACE)),
        )
        .init();
    check(&counter, Backend::Sqlite).await;
    check(&counter, Backend::Postgres).await;
}
