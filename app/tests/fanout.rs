//! Several instances on one database: WebSocket events and cache invalidations fan out
//! through Redis pub/sub, or through a shared in-process bus for instances in one process.

mod common;

use std::sync::Arc;

use common::*;
use wingman_app::{EventBus, InProcessBus, Options};

/// Registers on A, listens on B, posts on A: B's socket gets the user message, the
/// streamed tokens and the persisted reply; B's cached list sees A's writes.
async fn fan_out(a: &TestApp, b: &TestApp) {
    let (token, _) = a.register("fanny").await;
    let conv = a.new_conversation(&token, "across").await;
    let (s, v) = b.call("GET", "/api/conversations", Some(&token), None).await; // token works on B; caches B's list
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["conversations"][0]["message_count"], 0);

    let mut ws_b = b.ws(&token).await;
    let posted = a.post_message(&token, conv, "hello from instance A").await;
    let id = posted["message"]["id"].as_i64().expect("id");
    let frames = ws_b.until(|v| v["type"] == "message" && v["message"]["id"] == id).await;
    assert_eq!(
        frames.last().expect("frame")["message"]["content"],
        "hello from instance A"
    );
    let (streamed, reply) = await_reply(&mut ws_b, id).await;
    assert!(streamed.contains("hello from instance A"), "{streamed}");
    assert_eq!(reply["content"].as_str(), Some(streamed.as_str()));

    // B's list reflects A's writes (the user message and the reply)
    let (_, v) = b.call("GET", "/api/conversations", Some(&token), None).await;
    assert_eq!(v["conversations"][0]["message_count"], 2, "stale list on B: {v}");
    assert_eq!(v["conversations"][0]["last_message_role"], "assistant");

    // A deletes the conversation B has just served: B answers 404 at once (ownership is
    // checked by the database on every read, never taken from a cache).
    let messages = format!("/api/conversations/{conv}/messages");
    let (s, _) = b.call("GET", &messages, Some(&token), None).await;
    assert_eq!(s, 200);
    let (s, _) = a
        .call("DELETE", &format!("/api/conversations/{conv}"), Some(&token), None)
        .await;
    assert_eq!(s, 204);
    let (s, v) = b.call("GET", &messages, Some(&token), None).await;
    assert_eq!(s, 404, "B still serves a deleted conversation: {v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_fan_out_through_redis() {
    let db = TestDb::new(Backend::Postgres).await;
    let prefix = format!("{}:", unique("wmtest"));
    let mut settings = test_settings(&db.url);
    settings.redis.url = redis_url();
    settings.redis.prefix = prefix.clone();
    let a = TestApp::start(
        settings.clone(),
        Options {
            instance: Some("a".into()),
            ..Default::default()
        },
    )
    .await;
    let b = TestApp::start(
        settings,
        Options {
            instance: Some("b".into()),
            ..Default::default()
        },
    )
    .await;
    let (_, ready) = b.call("GET", "/readyz", None, None).await;
    assert_eq!(ready["redis"], "ok");
    fan_out(&a, &b).await;
    assert!(b.metrics().await.contains("cache_requests_total{cache=\"redis\""));
    a.stop().await;
    b.stop().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_one_sqlite_file_share_an_in_process_bus() {
    let db = TestDb::new(Backend::Sqlite).await;
    let bus: Arc<dyn EventBus> = Arc::new(InProcessBus::new());
    let settings = test_settings(&db.url);
    let a = TestApp::start(
        settings.clone(),
        Options {
            bus: Some(bus.clone()),
            instance: Some("a".into()),
            ..Default::default()
        },
    )
    .await;
    let b = TestApp::start(
        settings,
        Options {
            bus: Some(bus),
            instance: Some("b".into()),
            ..Default::default()
        },
    )
    .await;
    fan_out(&a, &b).await;
    a.stop().await;
    b.stop().await;
}
