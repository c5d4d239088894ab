//! Load generator for wingman-app (REST + WebSocket); a benchmark, not a test.
//!
//! The seed workload: each virtual user logs in once (a session), opens a WebSocket,
//! then loops: list conversations, open one (its latest messages), post a message and
//! wait on the socket for the AI reply to be persisted. Extra idle sockets
//! (`--idle-sockets`) check that many concurrent WebSocket users are held.
//!
//! ```sh
//! cargo run --release --example loadgen -- --url http://127.0.0.1:3000 --users 200 --duration 30
//! ```
//! Traffic goes only to the given URL (refuses anything but loopback) and stops after
//! `--duration` seconds.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use futures::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::sync::Mutex;
use tokio_tungstenite::tungstenite::Message as WsMsg;

#[derive(Parser, Clone)]
struct Args {
    /// Base URL of the app or of the edge in front of it (loopback only). Several
    /// comma-separated URLs spread the users over several instances round-robin.
    #[arg(long, default_value = "http://127.0.0.1:3000")]
    url: String,
    /// Virtual users running the scenario.
    #[arg(long, default_value_t = 100)]
    users: usize,
    /// Seconds of load after setup.
    #[arg(long, default_value_t = 30)]
    duration: u64,
    /// Extra WebSocket connections held open (spread over the users) for the whole run.
    #[arg(long, default_value_t = 0)]
    idle_sockets: usize,
    /// Conversations imported per user at setup (10 messages each).
    #[arg(long, default_value_t = 5)]
    conversations: usize,
    /// Pause between iterations of one user, in milliseconds.
    #[arg(long, default_value_t = 0)]
    think_ms: u64,
    /// Username prefix (a fresh one per run avoids re-registering).
    #[arg(long, default_value = "lg")]
    prefix: String,
}

#[derive(Default)]
struct Stats {
    hist: Mutex<HashMap<&'static str, Histogram<u64>>>,
    errors: Mutex<HashMap<String, u64>>,
    rest_ok: AtomicU64,
}

impl Stats {
    async fn record(&self, what: &'static str, started: Instant) {
        let us = started.elapsed().as_micros() as u64;
        let mut h = self.hist.lock().await;
        let entry = h
            .entry(what)
            .or_insert_with(|| Histogram::new_with_bounds(1, 120_000_000, 3).expect("histogram bounds"));
        let _ = entry.record(us.max(1));
    }
    async fn error(&self, what: String) {
        *self.errors.lock().await.entry(what).or_default() += 1;
    }
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

struct Client {
    http: reqwest::Client,
    base: String,
    stats: Arc<Stats>,
}

fn bases(url: &str) -> Vec<String> {
    url.split(',')
        .map(|u| u.trim().trim_end_matches('/').to_string())
        .filter(|u| !u.is_empty())
        .collect()
}

impl Client {
    async fn call(
        &self,
        what: &'static str,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Option<Value> {
        let started = Instant::now();
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        match req.send().await {
            Ok(resp) if resp.status().is_success() => {
                let v = resp.json::<Value>().await.ok();
                self.stats.record(what, started).await;
                self.stats.rest_ok.fetch_add(1, Ordering::Relaxed);
                v
            }
            Ok(resp) => {
                self.stats
                    .error(format!("{what}: HTTP {}", resp.status().as_u16()))
                    .await;
                None
            }
            Err(e) => {
                self.stats
                    .error(format!(
                        "{what}: {}",
                        if e.is_timeout() { "timeout" } else { "connect/io" }
                    ))
                    .await;
                None
            }
        }
    }
}

/// A WebSocket authenticated with `Authorization: Bearer` (never a token in the URL).
async fn connect_ws(base: &str, token: &str) -> Option<Ws> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = format!("{}/ws", base.replacen("http", "ws", 1))
        .into_client_request()
        .ok()?;
    req.headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().ok()?);
    let (ws, _) = tokio_tungstenite::connect_async(req).await.ok()?;
    Some(ws)
}

async fn setup_user(c: &Client, name: &str, conversations: usize) -> Option<String> {
    let body = json!({"username": name, "password": "loadgen password"});
    let token = match c
        .call(
            "register",
            reqwest::Method::POST,
            "/api/users",
            None,
            Some(body.clone()),
        )
        .await
    {
        Some(v) => v["token"].as_str()?.to_string(),
        None => c
            .call("login", reqwest::Method::POST, "/api/login", None, Some(body))
            .await?["token"]
            .as_str()?
            .to_string(),
    };
    for i in 0..conversations {
        let messages: Vec<Value> = (0..10)
            .map(|j| json!({"role": if j % 2 == 0 { "user" } else { "assistant" }, "content": format!("seed {i}.{j} lorem ipsum dolor sit amet")}))
            .collect();
        c.call(
            "import",
            reqwest::Method::POST,
            "/api/conversations/import",
            Some(&token),
            Some(json!({"title": format!("seed {i}"), "messages": messages})),
        )
        .await?;
    }
    Some(token)
}

async fn virtual_user(c: Arc<Client>, name: String, args: Args, deadline: Instant) {
    let body = json!({"username": name, "password": "loadgen password"});
    let Some(token) = c
        .call("login", reqwest::Method::POST, "/api/login", None, Some(body))
        .await
        .and_then(|v| v["token"].as_str().map(str::to_string))
    else {
        return;
    };
    let started = Instant::now();
    let Some(mut ws) = connect_ws(&c.base, &token).await else {
        c.stats.error("ws connect".into()).await;
        return;
    };
    c.stats.record("ws connect", started).await;
    let mut n = 0u64;
    while Instant::now() < deadline {
        n += 1;
        let Some(list) = c
            .call(
                "list conversations",
                reqwest::Method::GET,
                "/api/conversations?limit=20",
                Some(&token),
                None,
            )
            .await
        else {
            continue;
        };
        let convs = list["conversations"].as_array().cloned().unwrap_or_default();
        let Some(conv) = convs
            .get((n as usize) % convs.len().max(1))
            .and_then(|c| c["id"].as_i64())
        else {
            continue;
        };
        if c.call(
            "open conversation",
            reqwest::Method::GET,
            &format!("/api/conversations/{conv}/messages?limit=20"),
            Some(&token),
            None,
        )
        .await
        .is_none()
        {
            continue;
        }
        let started = Instant::now();
        let Some(posted) = c
            .call(
                "post message",
                reqwest::Method::POST,
                &format!("/api/conversations/{conv}/messages"),
                Some(&token),
                Some(json!({"content": format!("load test message {n} from {name}")})),
            )
            .await
        else {
            continue;
        };
        let Some(id) = posted["message"]["id"].as_i64() else {
            continue;
        };
        // wait for the persisted reply
        let wait = async {
            while let Some(Ok(frame)) = ws.next().await {
                if let WsMsg::Text(t) = frame {
                    if let Ok(v) = serde_json::from_str::<Value>(t.as_str()) {
                        if v["type"] == "message" && v["message"]["reply_to"] == id {
                            return true;
                        }
                    }
                }
            }
            false
        };
        match tokio::time::timeout(Duration::from_secs(30), wait).await {
            Ok(true) => c.stats.record("post -> AI reply", started).await,
            Ok(false) => {
                c.stats.error("ws closed".into()).await;
                match connect_ws(&c.base, &token).await {
                    Some(w) => ws = w,
                    None => return,
                }
            }
            Err(_) => c.stats.error("AI reply timeout (30s)".into()).await,
        }
        if args.think_ms > 0 {
            tokio::time::sleep(Duration::from_millis(args.think_ms)).await;
        }
    }
    let _ = ws.send(WsMsg::Close(None)).await;
}

fn loopback_only(url: &str) {
    let u = reqwest::Url::parse(url).expect("--url must be a URL");
    let host = u.host_str().unwrap_or("");
    assert!(
        host == "127.0.0.1" || host == "localhost" || host == "[::1]" || host.starts_with("127."),
        "loadgen only targets loopback addresses, not {host}"
    );
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    let urls = bases(&args.url);
    urls.iter().for_each(|u| loopback_only(u));
    let stats = Arc::new(Stats::default());
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.users + 16)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    let clients: Vec<Arc<Client>> = urls
        .iter()
        .map(|u| {
            Arc::new(Client {
                http: http.clone(),
                base: u.clone(),
                stats: stats.clone(),
            })
        })
        .collect();
    let client = clients[0].clone();

    eprintln!("setup: {} users × {} conversations", args.users, args.conversations);
    let names: Vec<String> = (0..args.users).map(|i| format!("{}{i}", args.prefix)).collect();
    let tokens: Vec<Option<String>> = futures::stream::iter(names.clone())
        .map(|n| {
            let c = client.clone();
            let k = args.conversations;
            async move { setup_user(&c, &n, k).await }
        })
        .buffered(16)
        .collect()
        .await;
    let tokens: Vec<String> = tokens.into_iter().flatten().collect();
    assert!(!tokens.is_empty(), "setup failed: is the app running at {}?", args.url);
    // setup numbers are not part of the report
    stats.hist.lock().await.clear();
    stats.rest_ok.store(0, Ordering::Relaxed);

    let mut idle = Vec::new();
    if args.idle_sockets > 0 {
        eprintln!("opening {} idle WebSockets", args.idle_sockets);
        let started = Instant::now();
        let socks: Vec<Option<Ws>> = futures::stream::iter(0..args.idle_sockets)
            .map(|i| {
                let t = tokens[i % tokens.len()].clone();
                let base = clients[i % clients.len()].base.clone();
                async move { connect_ws(&base, &t).await }
            })
            .buffer_unordered(64)
            .collect()
            .await;
        idle = socks.into_iter().flatten().collect();
        eprintln!("{} idle sockets open in {:?}", idle.len(), started.elapsed());
    }

    let run_start = Instant::now();
    let deadline = run_start + Duration::from_secs(args.duration);
    eprintln!("running {} virtual users for {} s", args.users, args.duration);
    let mut tasks = tokio::task::JoinSet::new();
    for (i, name) in names.into_iter().enumerate() {
        tasks.spawn(virtual_user(
            clients[i % clients.len()].clone(),
            name,
            args.clone(),
            deadline,
        ));
    }
    while tasks.join_next().await.is_some() {}
    let elapsed = run_start.elapsed().as_secs_f64();

    // idle sockets still open after the run?
    let mut alive = 0;
    for ws in idle.iter_mut() {
        if ws
            .send(WsMsg::Text(json!({"type": "ping"}).to_string().into()))
            .await
            .is_ok()
        {
            alive += 1;
        }
    }

    let rest = stats.rest_ok.load(Ordering::Relaxed);
    println!(
        "\nwingman-app loadgen: {} users, {:.1} s, target {}",
        args.users, elapsed, args.url
    );
    println!("REST requests ok: {rest} ({:.0} req/s)", rest as f64 / elapsed);
    println!(
        "{:<22} {:>8} {:>9} {:>9} {:>9} {:>9}",
        "operation", "count", "p50 ms", "p95 ms", "p99 ms", "max ms"
    );
    let hist = stats.hist.lock().await;
    let mut names: Vec<_> = hist.keys().copied().collect();
    names.sort();
    for n in names {
        let h = &hist[n];
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        println!(
            "{:<22} {:>8} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
            n,
            h.len(),
            ms(0.5),
            ms(0.95),
            ms(0.99),
            h.max() as f64 / 1000.0
        );
    }
    let errors = stats.errors.lock().await;
    let total_errors: u64 = errors.values().sum();
    println!("errors: {total_errors}");
    for (k, v) in errors.iter() {
        println!("  {k}: {v}");
    }
    if args.idle_sockets > 0 {
        println!("idle WebSockets held to the end: {alive}/{}", args.idle_sockets);
    }
}
