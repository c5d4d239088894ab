//! Test harness: starts real `wingman-app` instances in-process on 127.0.0.1 ephemeral
//! ports, against a fresh SQLite file or a fresh PostgreSQL database per test, and talks
//! to them over real HTTP and WebSocket connections.
#![allow(dead_code)]

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message as WsMsg;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use wingman_app::{Options, Settings};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

pub fn pg_base_url() -> String {
    std::env::var("WINGMAN_TEST_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

pub fn redis_url() -> String {
    std::env::var("WINGMAN_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into())
}

pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{}_{:08x}", std::process::id(), rand::random::<u32>())
}

/// A database for one test: a SQLite file in a temp dir, or a new PostgreSQL database.
pub struct TestDb {
    pub url: String,
    _dir: Option<tempfile::TempDir>,
    pg_name: Option<String>,
}

impl TestDb {
    pub async fn new(backend: Backend) -> TestDb {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("temp dir");
                let url = format!("sqlite://{}", dir.path().join("app.db").display());
                TestDb {
                    url,
                    _dir: Some(dir),
                    pg_name: None,
                }
            }
            Backend::Postgres => {
                let base = pg_base_url();
                let name = unique("wm_test");
                let pool = sqlx::PgPool::connect(&base)
                    .await
                    .expect("PostgreSQL reachable at WINGMAN_TEST_DATABASE_URL");
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(&pool)
                    .await
                    .expect("create test database");
                pool.close().await;
                let url = match base.rfind('/') {
                    Some(i) => format!("{}/{name}", &base[..i]),
                    None => panic!("WINGMAN_TEST_DATABASE_URL has no database part: {base}"),
                };
                TestDb {
                    url,
                    _dir: None,
                    pg_name: Some(name),
                }
            }
        }
    }

    pub async fn drop_db(&self) {
        if let Some(name) = &self.pg_name {
            if let Ok(pool) = sqlx::PgPool::connect(&pg_base_url()).await {
                let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                )))
                .execute(&pool)
                .await;
                pool.close().await;
            }
        }
    }
}

/// Settings for tests: cheap password hashing, no token delay, fast polling.
pub fn test_settings(db_url: &str) -> Settings {
    let mut s = Settings::default();
    s.database.url = db_url.to_string();
    s.database.max_connections = 8;
    s.auth.argon2_memory_kib = 256;
    s.auth.argon2_iterations = 1;
    s.llm.token_delay = Duration::from_millis(1);
    s.jobs.poll_interval = Duration::from_millis(50);
    s.server.shutdown_grace = Duration::from_secs(5);
    s
}

pub struct TestApp {
    pub base: String,
    pub ws_base: String,
    /// The metrics listener (`/metrics` is not on the public one).
    pub metrics_base: String,
    pub http: reqwest::Client,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<Result<(), wingman_app::AppError>>>,
}

impl TestApp {
    /// Starts an instance and waits until `/readyz` answers 200.
    pub async fn start(settings: Settings, options: Options) -> TestApp {
        if std::env::var_os("WINGMAN_TEST_LOG").is_some() {
            wingman_app::telemetry::init_logging();
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut options = options;
        let metrics_listener = match options.metrics_listener.take() {
            Some(l) => l,
            None => tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind"),
        };
        let metrics_addr = metrics_listener.local_addr().expect("addr");
        options.metrics_listener = Some(metrics_listener);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(wingman_app::serve_with(
            settings,
            listener,
            async move {
                let _ = rx.await;
            },
            options,
        ));
        let app = TestApp {
            base: format!("http://{addr}"),
            ws_base: format!("ws://{addr}"),
            metrics_base: format!("http://{metrics_addr}"),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .expect("client"),
            stop: Some(tx),
            handle: Some(handle),
        };
        app.wait_ready().await;
        app
    }

    pub async fn wait_ready(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = self.http.get(format!("{}/readyz", self.base)).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            if let Some(h) = &self.handle {
                assert!(!h.is_finished(), "server exited during startup");
            }
            assert!(tokio::time::Instant::now() < deadline, "server not ready in 30s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Graceful shutdown; returns what `serve` returned.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            let res = tokio::time::timeout(Duration::from_secs(15), h)
                .await
                .expect("shutdown within 15s");
            res.expect("server task").expect("serve returned Ok");
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn call(&self, method: &str, path: &str, token: Option<&str>, body: Option<Value>) -> (u16, Value) {
        let mut req = self.http.request(method.parse().expect("method"), self.url(path));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("request sent");
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("body");
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status, value)
    }

    pub async fn raw(&self, method: &str, path: &str, token: Option<&str>, body: &str) -> (u16, Value) {
        let mut req = self
            .http
            .request(method.parse().expect("method"), self.url(path))
            .header("content-type", "application/json")
            .body(body.to_string());
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.expect("request sent");
        let status = resp.status().as_u16();
        let v = resp.json::<Value>().await.unwrap_or(Value::Null);
        (status, v)
    }

    /// Registers a user; returns (token, user id).
    pub async fn register(&self, name: &str) -> (String, i64) {
        let (status, v) = self
            .call(
                "POST",
                "/api/users",
                None,
                Some(json!({ "username": name, "password": "correct horse battery" })),
            )
            .await;
        assert_eq!(status, 201, "register {name}: {v}");
        (
            v["token"].as_str().expect("token").to_string(),
            v["user"]["id"].as_i64().expect("user id"),
        )
    }

    /// Logs a user registered by [`TestApp::register`] in again: a new session's token.
    pub async fn login(&self, name: &str) -> String {
        self.login_with(name, "correct horse battery").await
    }

    /// Logs in with a password: a new session's token.
    pub async fn login_with(&self, name: &str, password: &str) -> String {
        let (status, v) = self
            .call(
                "POST",
                "/api/login",
                None,
                Some(json!({ "username": name, "password": password })),
            )
            .await;
        assert_eq!(status, 200, "login {name}: {v}");
        v["token"].as_str().expect("token").to_string()
    }

    pub async fn new_conversation(&self, token: &str, title: &str) -> i64 {
        let (status, v) = self
            .call(
                "POST",
                "/api/conversations",
                Some(token),
                Some(json!({ "title": title })),
            )
            .await;
        assert_eq!(status, 201, "{v}");
        v["conversation"]["id"].as_i64().expect("id")
    }

    /// The first page of a conversation's messages: (status, body).
    pub async fn list_messages(&self, token: &str, conv: i64) -> (u16, Value) {
        self.call("GET", &format!("/api/conversations/{conv}/messages"), Some(token), None)
            .await
    }

    pub async fn post_message(&self, token: &str, conv: i64, content: &str) -> Value {
        let (status, v) = self
            .call(
                "POST",
                &format!("/api/conversations/{conv}/messages"),
                Some(token),
                Some(json!({ "content": content })),
            )
            .await;
        assert_eq!(status, 201, "{v}");
        v
    }

    /// A WebSocket authenticated with `Authorization: Bearer` (the web page sends the
    /// token as a subprotocol instead; never in the URL).
    pub async fn ws(&self, token: &str) -> Ws {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut req = format!("{}/ws", self.ws_base).into_client_request().expect("request");
        req.headers_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("header value"),
        );
        let (stream, _) = tokio_tungstenite::connect_async(req).await.expect("ws connect");
        let mut ws = Ws {
            stream,
            history: Vec::new(),
        };
        let hello = ws.next_json().await;
        assert_eq!(hello["type"], "ready", "{hello}");
        ws
    }

    pub async fn metrics(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.metrics_base))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text")
    }
}

pub struct Ws {
    pub stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// Every JSON frame received so far.
    pub history: Vec<Value>,
}

impl Ws {
    /// The next JSON text frame (pings are skipped); panics after 20 s.
    pub async fn next_json(&mut self) -> Value {
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(20), self.stream.next())
                .await
                .expect("a WebSocket frame within 20s")
                .expect("socket open")
                .expect("frame ok");
            match msg {
                WsMsg::Text(t) => {
                    let v: Value = serde_json::from_str(t.as_str()).expect("json frame");
                    self.history.push(v.clone());
                    return v;
                }
                WsMsg::Close(c) => panic!("socket closed: {c:?}"),
                _ => continue,
            }
        }
    }

    /// Reads frames until one satisfies `pred`, returning every frame read.
    pub async fn until(&mut self, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
        let mut seen = Vec::new();
        loop {
            let v = self.next_json().await;
            let done = pred(&v);
            seen.push(v);
            if done {
                return seen;
            }
        }
    }

    pub async fn send_json(&mut self, v: Value) {
        self.stream
            .send(WsMsg::Text(v.to_string().into()))
            .await
            .expect("ws send");
    }
}

/// Collects the streamed reply to `reply_to` and the final persisted assistant message,
/// from every frame the socket received (replies to several messages interleave).
pub async fn await_reply(ws: &mut Ws, reply_to: i64) -> (String, Value) {
    let is_final = |v: &Value| v["type"] == "message" && v["message"]["reply_to"] == reply_to;
    while !ws.history.iter().any(is_final) {
        ws.next_json().await;
    }
    let mut tokens: Vec<(u64, String)> = ws
        .history
        .iter()
        .filter(|v| v["type"] == "token" && v["reply_to"] == reply_to)
        .map(|v| {
            (
                v["seq"].as_u64().expect("seq"),
                v["delta"].as_str().expect("delta").to_string(),
            )
        })
        .collect();
    tokens.sort_by_key(|t| t.0);
    for (i, (seq, _)) in tokens.iter().enumerate() {
        assert_eq!(*seq, i as u64, "token sequence has a gap");
    }
    let text: String = tokens.into_iter().map(|t| t.1).collect();
    let last = ws.history.iter().find(|v| is_final(v)).expect("final frame")["message"].clone();
    (text, last)
}

/// Sends raw bytes on a new connection and returns what the server answers (headers and
/// the start of the body).
pub async fn raw_http(app: &TestApp, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = app.base.trim_start_matches("http://");
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(request.as_bytes()).await.expect("write");
    let mut buf = vec![0u8; 4096];
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !String::from_utf8_lossy(&got).contains("}}") {
        let n = tokio::time::timeout_at(deadline, s.read(&mut buf))
            .await
            .expect("answer within 10s")
            .expect("read");
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}
