//! Graceful shutdown: an in-flight AI reply is finished and persisted, WebSockets are
//! closed with 1001, and `serve` returns Ok.

mod common;

use std::time::Duration;

use common::*;
use futures::StreamExt;
use tokio_tungstenite::tungstenite::Message as WsMsg;
use wingman_app::Options;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_running_jobs_and_closes_sockets() {
    let db = TestDb::new(Backend::Sqlite).await;
    let mut settings = test_settings(&db.url);
    // the reply takes ~1 s to stream
    settings.llm.token_delay = Duration::from_millis(40);
    // Poll the queue all the time, so that shutdown almost always lands while a fetch
    // is in flight: apalis 1.0 stopped polling it (holding SQLite's write lock) while
    // the running reply waited for that lock (see vendor/apalis-core/PATCHED.md).
    settings.jobs.poll_interval = Duration::from_millis(1);
    let app = TestApp::start(settings.clone(), Options::default()).await;
    let (token, _) = app.register("drain").await;
    let conv = app.new_conversation(&token, "d").await;
    let mut ws = app.ws(&token).await;
    let id = app
        .post_message(&token, conv, "please finish this reply even while shutting down")
        .await["message"]["id"]
        .as_i64()
        .expect("id");
    // the job is running once the first token arrives
    ws.until(|v| v["type"] == "token" && v["reply_to"] == id).await;

    let stopping = tokio::spawn(app.stop());
    // the socket is closed by the server with 1001 (going away)
    let close = loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.stream.next())
            .await
            .expect("close within 10s")
        {
            Some(Ok(WsMsg::Close(frame))) => break frame,
            Some(Ok(_)) => continue,
            other => panic!("socket ended without a close frame: {other:?}"),
        }
    };
    assert_eq!(close.map(|f| u16::from(f.code)), Some(1001));
    stopping.await.expect("stopped cleanly");

    // a new instance on the same file finds the complete reply
    let app = TestApp::start(settings, Options::default()).await;
    let (_, v) = app.list_messages(&token, conv).await;
    let msgs = v["messages"].as_array().expect("array");
    assert_eq!(msgs.len(), 2, "the running reply was not drained: {v}");
    assert_eq!(msgs[1]["reply_to"], id);
    assert!(msgs[1]["content"]
        .as_str()
        .expect("c")
        .contains("please finish this reply"));
    app.stop().await;
}
