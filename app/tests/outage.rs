//! Dependencies going down: `/readyz` fails with 503, requests get a JSON 503 (never a
//! panic or a hang), and every message acknowledged with 201 is in the database.
//! PostgreSQL is cut with a TCP proxy the test controls; Redis is a private
//! `redis-server` on an ephemeral port that the test stops and restarts.

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use wingman_app::Options;

/// A TCP proxy to `upstream` whose connections can be cut and refused.
struct Proxy {
    port: u16,
    up: Arc<AtomicBool>,
    conns: Arc<tokio::sync::Mutex<JoinSet<()>>>,
}

impl Proxy {
    async fn start(upstream: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let up = Arc::new(AtomicBool::new(true));
        let conns = Arc::new(tokio::sync::Mutex::new(JoinSet::new()));
        let (up2, conns2) = (up.clone(), conns.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !up2.load(Ordering::SeqCst) {
                    continue; // refused: dropped at once
                }
                let upstream = upstream.clone();
                conns2.lock().await.spawn(async move {
                    if let Ok(mut out) = TcpStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
            }
        });
        Proxy { port, up, conns }
    }

    async fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.conns.lock().await.abort_all();
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

struct RedisServer {
    child: Child,
    port: u16,
}

impl RedisServer {
    async fn start(port: u16) -> RedisServer {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server on PATH (apt-get install redis-server)");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            assert!(tokio::time::Instant::now() < deadline, "redis-server did not listen");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        RedisServer { child, port }
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Polls `/readyz` until it reports `want` (bounded).
async fn await_ready(app: &TestApp, want: u16) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (s, v) = app.call("GET", "/readyz", None, None).await;
        if s == want {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "readyz never became {want}: {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_down_gives_503_and_loses_no_acknowledged_message() {
    let db = TestDb::new(Backend::Postgres).await;
    let url = reqwest::Url::parse(&db.url).expect("url");
    let upstream = format!("{}:{}", url.host_str().expect("host"), url.port().unwrap_or(5432));
    let proxy = Proxy::start(upstream).await;
    let mut proxied = url.clone();
    proxied.set_host(Some("127.0.0.1")).expect("host");
    proxied.set_port(Some(proxy.port)).expect("port");
    let mut settings = test_settings(proxied.as_str());
    settings.database.acquire_timeout = Duration::from_millis(500);
    settings.cache.ttl = Duration::from_millis(1); // every list goes to the database
    let app = TestApp::start(settings, Options::default()).await;
    let (token, _) = app.register("outage").await;
    let conv = app.new_conversation(&token, "flaky").await;

    let mut acknowledged = Vec::new();
    let post = |i: usize| {
        let app = &app;
        let token = token.clone();
        async move {
            app.call(
                "POST",
                &format!("/api/conversations/{conv}/messages"),
                Some(&token),
                Some(json!({"content": format!("m{i}")})),
            )
            .await
        }
    };
    for i in 0..3 {
        let (s, v) = post(i).await;
        assert_eq!(s, 201, "{v}");
        acknowledged.push(format!("m{i}"));
    }

    proxy.cut().await;
    let v = await_ready(&app, 503).await;
    assert_ne!(v["database"], "ok", "{v}");
    for i in 3..6 {
        let (s, v) = post(i).await;
        assert!(s == 201 || s == 503, "got {s}: {v}");
        if s == 201 {
            acknowledged.push(format!("m{i}"));
        } else {
            assert_eq!(v["error"]["code"], "unavailable", "{v}");
        }
    }
    let (s, v) = app.call("GET", "/api/conversations", Some(&token), None).await;
    assert_eq!(s, 503, "{v}");
    assert_eq!(
        app.call("GET", "/healthz", None, None).await.0,
        200,
        "liveness stays up"
    );

    proxy.restore();
    await_ready(&app, 200).await;
    // the job workers recover too: a new message gets its AI reply
    let mut ws = app.ws(&token).await;
    let (s, v) = post(99).await;
    assert_eq!(s, 201, "{v}");
    acknowledged.push("m99".into());
    await_reply(&mut ws, v["message"]["id"].as_i64().expect("id")).await;
    for i in 6..8 {
        let (s, v) = post(i).await;
        assert_eq!(s, 201, "{v}");
        acknowledged.push(format!("m{i}"));
    }
    let (_, v) = app
        .call(
            "GET",
            &format!("/api/conversations/{conv}/messages?limit=200"),
            Some(&token),
            None,
        )
        .await;
    let stored: Vec<String> = v["messages"]
        .as_array()
        .expect("array")
        .iter()
        .filter(|m| m["role"] == "user")
        .map(|m| m["content"].as_str().expect("c").to_string())
        .collect();
    for m in &acknowledged {
        assert!(stored.contains(m), "acknowledged {m} is missing: {stored:?}");
    }
    // and each acknowledged message gets its AI reply (its job was stored with it).
    // Jobs a dead worker held re-run after two missed heartbeats (~10 s); the bound
    // leaves room for a loaded CI machine.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        let (_, v) = app
            .call(
                "GET",
                &format!("/api/conversations/{conv}/messages?limit=200"),
                Some(&token),
                None,
            )
            .await;
        let msgs = v["messages"].as_array().expect("array").clone();
        let unanswered: Vec<&str> = msgs
            .iter()
            .filter(|m| m["role"] == "user")
            .filter(|m| !msgs.iter().any(|r| r["reply_to"] == m["id"]))
            .filter_map(|m| m["content"].as_str())
            .collect();
        if unanswered.is_empty() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no reply to {unanswered:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    app.stop().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_fails_readyz_but_keeps_serving_from_the_database() {
    let port = free_port();
    let mut redis = RedisServer::start(port).await;
    let db = TestDb::new(Backend::Sqlite).await;
    let mut settings = test_settings(&db.url);
    settings.redis.url = format!("redis://127.0.0.1:{}/", redis.port);
    let app = TestApp::start(settings, Options::default()).await;
    let (token, _) = app.register("redisless").await;
    let conv = app.new_conversation(&token, "r").await;

    redis.stop();
    let v = await_ready(&app, 503).await;
    assert_ne!(v["redis"], "ok", "{v}");
    assert_eq!(v["database"], "ok");
    // the cache degrades to the database; writes are still acknowledged and stored
    let posted = app.post_message(&token, conv, "while redis is down").await;
    let (s, v) = app.list_messages(&token, conv).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["messages"][0]["id"], posted["message"]["id"]);

    let _redis = RedisServer::start(port).await;
    await_ready(&app, 200).await;
    app.stop().await;
}
