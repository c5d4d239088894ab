//! Real parts for the integration tests: origins on ephemeral ports and a real
//! `wingman-edge` process in front of them. Readiness is awaited, never slept on;
//! every wait is bounded.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::Router;
use futures_util::StreamExt;
use parking_lot::Mutex;
use tokio::net::TcpListener;

/// What an origin saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: BTreeMap<String, String>,
    pub peer: SocketAddr,
}

/// Shared state of one origin.
#[derive(Debug)]
pub struct OriginState {
    pub name: String,
    /// Requests seen, `/healthz` excluded.
    pub requests: AtomicUsize,
    pub seen: Mutex<Vec<Seen>>,
    /// What `/healthz` answers: 200 when true, 503 when false.
    pub healthy: AtomicBool,
    /// Health probes seen.
    pub probes: AtomicUsize,
    pub in_flight: AtomicUsize,
    pub max_in_flight: AtomicUsize,
    /// Set when a streamed body (`/bytes`, `/sse`) has been fully handed to the
    /// connection: the origin finished writing.
    pub finished_writing: AtomicBool,
    /// Bodies received by `/upload`, in order.
    pub uploads: Mutex<Vec<Vec<u8>>>,
    /// When not 0, `/fixed` answers this status (an origin failing with 5xx).
    pub force_status: std::sync::atomic::AtomicU16,
}

/// A real HTTP origin (axum) on 127.0.0.1, port chosen by the OS.
///
/// - any path: 200, body = origin name, header `x-origin: NAME`
/// - `/status/{code}`: that status
/// - `/slow/{ms}`: waits, then 200
/// - `/healthz`: 200 or 503 per [`OriginState::healthy`]
/// - `/ws`: WebSocket echo (text and binary)
/// - `/bytes/{n}`: `n` bytes of [`compressible`] text streamed in 16 KiB chunks;
///   query `type=` sets Content-Type (default application/json), `cl=0` omits
///   Content-Length; sets `finished_writing` when the last chunk is taken
/// - `/sse/{count}/{ms}`: text/event-stream, `count` events `ms` apart
/// - `/upload`: reads the body and records it in `uploads`
/// - `/fixed`: a 4 KiB JSON body whose headers come from the query (`x304`: a field
///   only its 304s carry; `cc304`: their Cache-Control, default `cc`):
///   `etag`, `vary`, `cc` (Cache-Control), `ce` (Content-Encoding), `xab`
///   (X-Accel-Buffering)
pub struct Origin {
    pub addr: SocketAddr,
    pub state: Arc<OriginState>,
    task: tokio::task::JoinHandle<()>,
}

impl Origin {
    pub async fn start(name: &str) -> Origin {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind origin");
        Self::serve(name, listener).await
    }

    /// Serves on a given listener (to restart an origin on the same port).
    pub async fn serve(name: &str, listener: TcpListener) -> Origin {
        let addr = listener.local_addr().expect("origin addr");
        let state = Arc::new(OriginState {
            name: name.to_owned(),
            requests: AtomicUsize::new(0),
            seen: Mutex::new(Vec::new()),
            healthy: AtomicBool::new(true),
            probes: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
            finished_writing: AtomicBool::new(false),
            uploads: Mutex::new(Vec::new()),
            force_status: std::sync::atomic::AtomicU16::new(0),
        });
        let app = Router::new()
            .route("/healthz", get(healthz))
            .route("/ws", get(ws))
            .route("/status/{code}", any(status))
            .route("/slow/{ms}", any(slow))
            .route("/bytes/{n}", any(bytes_body))
            .route("/sse/{count}/{ms}", get(sse))
            .route("/upload", any(upload))
            .route("/fixed", any(fixed))
            .fallback(any(echo))
            .layer(axum::extract::DefaultBodyLimit::disable())
            .with_state(state.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(
                listener,
                app.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .await;
        });
        Origin { addr, state, task }
    }

    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }

    pub fn set_healthy(&self, up: bool) {
        self.state.healthy.store(up, Ordering::SeqCst);
    }

    pub fn last_seen(&self) -> Option<Seen> {
        self.state.seen.lock().last().cloned()
    }

    /// Distinct client connections (peer addresses) the origin saw.
    pub fn connections(&self) -> usize {
        let seen = self.state.seen.lock();
        seen.iter().map(|s| s.peer).collect::<HashSet<_>>().len()
    }

    /// Stops serving: new connections are refused.
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn record(st: &OriginState, method: &Method, uri: &Uri, headers: &HeaderMap, peer: SocketAddr) {
    st.requests.fetch_add(1, Ordering::SeqCst);
    st.seen.lock().push(Seen {
        method: method.to_string(),
        path: uri.to_string(),
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into()))
            .collect(),
        peer,
    });
}

async fn echo(
    State(st): State<Arc<OriginState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    record(&st, &method, &uri, &headers, peer);
    ([("x-origin", st.name.clone())], st.name.clone()).into_response()
}

async fn status(
    State(st): State<Arc<OriginState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(code): Path<u16>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    record(&st, &method, &uri, &headers, peer);
    let code = StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST);
    (code, [("x-origin", st.name.clone())], st.name.clone()).into_response()
}

async fn slow(
    State(st): State<Arc<OriginState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(ms): Path<u64>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    record(&st, &method, &uri, &headers, peer);
    let now = st.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    st.max_in_flight.fetch_max(now, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(ms)).await;
    st.in_flight.fetch_sub(1, Ordering::SeqCst);
    ([("x-origin", st.name.clone())], st.name.clone()).into_response()
}

async fn healthz(State(st): State<Arc<OriginState>>) -> StatusCode {
    st.probes.fetch_add(1, Ordering::SeqCst);
    if st.healthy.load(Ordering::SeqCst) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

async fn ws(up: WebSocketUpgrade) -> Response {
    up.on_upgrade(echo_socket)
}

async fn echo_socket(mut socket: WebSocket) {
    while let Some(Ok(msg)) = socket.recv().await {
        let reply = match msg {
            Message::Text(t) => Message::Text(t),
            Message::Binary(b) => Message::Binary(b),
            Message::Close(_) => return,
            _ => continue,
        };
        if socket.send(reply).await.is_err() {
            return;
        }
    }
}

/// A TCP port that was free a moment ago.
///
/// Never the same port twice in one test process: the kernel may hand a just-released
/// ephemeral port out again, and two listeners of one config then collide (seen in CI:
/// "listeners[1].address ... is already used by listeners[0].address").
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    for _ in 0..1000 {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port");
        if GIVEN.lock().unwrap_or_else(|e| e.into_inner()).insert(port) {
            return port;
        }
    }
    panic!("no unused ephemeral port in 1000 tries");
}

/// A running `wingman-edge run` process, killed on drop.
pub struct Edge {
    child: Child,
    pub port: u16,
    pub admin_port: u16,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    header: String,
}

/// The `[server]`, `[[listeners]]` and `[admin]` part tests use, for given ports.
pub fn preamble(dir: &std::path::Path, port: u16, admin_port: u16) -> String {
    preamble_with(dir, port, admin_port, "", "")
}

/// [`preamble`] with extra `[server]` and `[admin]` keys.
pub fn preamble_with(
    dir: &std::path::Path,
    port: u16,
    admin_port: u16,
    server_extra: &str,
    admin_extra: &str,
) -> String {
    format!(
        r#"
[server]
{server_extra}
threads = 2
{grace}
graceful_shutdown_timeout = "1s"
pid_file = "{dir}/edge.pid"
upgrade_sock = "{dir}/upgrade.sock"

[[listeners]]
address = "127.0.0.1:{port}"

[admin]
address = "127.0.0.1:{admin_port}"
{admin_extra}
"#,
        dir = dir.display(),
        grace = if server_extra.contains("grace_period") {
            ""
        } else {
            "grace_period = \"0s\""
        }
    )
}

impl Edge {
    /// Starts the edge with `body` (pools, routes, client limits) after the test
    /// preamble, and waits until both listeners answer.
    pub async fn start(body: &str) -> Edge {
        Self::start_with_server_extra("", body).await
    }

    /// Like [`Edge::start`], with extra keys in `[server]`.
    pub async fn start_with_server_extra(server_extra: &str, body: &str) -> Edge {
        Self::start_with(server_extra, "", body).await
    }

    /// Like [`Edge::start`], with extra keys in `[server]` and in `[admin]`.
    pub async fn start_with(server_extra: &str, admin_extra: &str, body: &str) -> Edge {
        Self::start_full(server_extra, admin_extra, body, &[]).await
    }

    /// The most general start: extra config keys and environment variables.
    pub async fn start_full(
        server_extra: &str,
        admin_extra: &str,
        body: &str,
        env: &[(&str, &str)],
    ) -> Edge {
        let exe = std::path::Path::new(env!("CARGO_BIN_EXE_wingman-edge"));
        Self::start_exe(exe, server_extra, admin_extra, body, env).await
    }

    /// [`Edge::start_full`] with another binary (a copy a test may replace).
    pub async fn start_exe(
        exe: &std::path::Path,
        server_extra: &str,
        admin_extra: &str,
        body: &str,
        env: &[(&str, &str)],
    ) -> Edge {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let admin_port = free_port();
        let header = preamble_with(dir.path(), port, admin_port, server_extra, admin_extra);
        let config_path = dir.path().join("edge.toml");
        std::fs::write(&config_path, format!("{header}\n{body}")).expect("write config");
        let log = std::fs::File::create(dir.path().join("edge.log")).expect("log file");
        let child = Command::new(exe)
            .args(["run", "-c"])
            .arg(&config_path)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn wingman-edge");
        let mut edge = Edge {
            child,
            port,
            admin_port,
            dir,
            config_path,
            header,
        };
        edge.wait_ready().await;
        edge
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let client = reqwest::Client::new();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("wingman-edge exited with {status}:\n{}", self.log());
            }
            let admin_ok = client
                .get(self.admin_url("/healthz"))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200);
            let proxy_ok = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok();
            if admin_ok && proxy_ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "wingman-edge not ready after 20s:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits (bounded) for the process to exit; its status, or None on timeout.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("edge.log")).unwrap_or_default()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.admin_port, path)
    }

    /// Writes a new body (same preamble) to the config file without signalling.
    pub fn write_config(&self, body: &str) {
        std::fs::write(&self.config_path, format!("{}\n{body}", self.header)).expect("write");
    }

    /// Writes the raw text as the whole config file.
    pub fn write_raw_config(&self, text: &str) {
        std::fs::write(&self.config_path, text).expect("write");
    }

    pub fn sighup(&self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).expect("SIGHUP");
    }

    /// Writes `body`, sends SIGHUP and waits until the reload counter moves; returns
    /// the new generation.
    pub async fn reload(&self, body: &str) -> u64 {
        let before = self.reload_count().await;
        self.write_config(body);
        self.sighup();
        self.wait_reloads(before + 1.0).await;
        self.metric("wingman_edge_config_generation")
            .await
            .unwrap_or(0.0) as u64
    }

    /// Total reloads so far (ok and error).
    pub async fn reload_count(&self) -> f64 {
        self.metric("wingman_edge_config_reloads_total{result=\"ok\"}")
            .await
            .unwrap_or(0.0)
            + self
                .metric("wingman_edge_config_reloads_total{result=\"error\"}")
                .await
                .unwrap_or(0.0)
    }

    pub async fn wait_reloads(&self, at_least: f64) {
        let edge = self;
        wait_until(Duration::from_secs(10), "reload", || async move {
            edge.reload_count().await >= at_least
        })
        .await;
    }

    pub async fn metrics_text(&self) -> String {
        match reqwest::get(self.admin_url("/metrics")).await {
            Ok(r) => r.text().await.expect("metrics body"),
            // the edge is gone or its admin listener is: show why
            Err(e) => panic!("metrics: {e}\nedge log:\n{}", self.log()),
        }
    }

    /// The value of one series, written as in the exposition (`name{a="b"}`).
    pub async fn metric(&self, series: &str) -> Option<f64> {
        let text = self.metrics_text().await;
        text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok()).flatten()
        })
    }

    /// Waits until a series reaches `value` (metrics are recorded just after the
    /// response is sent, so a client can see its answer before the count moves).
    pub async fn wait_metric(&self, series: &str, value: f64) {
        let edge = self;
        let what = format!("{series} == {value}");
        wait_until(Duration::from_secs(10), &what, || async move {
            edge.metric(series).await == Some(value)
        })
        .await;
    }

    pub async fn status(&self) -> serde_json::Value {
        reqwest::get(self.admin_url("/status"))
            .await
            .expect("status")
            .json()
            .await
            .expect("status json")
    }

    /// The `/status` entry of one server.
    pub async fn server_status(&self, pool: &str, addr: &str) -> serde_json::Value {
        let s = self.status().await;
        s["pools"]
            .as_array()
            .and_then(|pools| pools.iter().find(|p| p["name"] == pool))
            .and_then(|p| p["servers"].as_array())
            .and_then(|servers| servers.iter().find(|x| x["address"] == addr))
            .cloned()
            .unwrap_or(serde_json::Value::Null)
    }
}

impl Drop for Edge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `check` every 20 ms until it holds; panics after `limit`.
pub async fn wait_until<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if check().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A client without connection reuse surprises: one fresh connection per request.
pub fn fresh_client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client")
}

/// GET `path` from the edge with extra request headers (a fresh client per call,
/// so no connection is shared between tests' requests).
pub async fn get_with(edge: &Edge, path: &str, headers: &[(&str, &str)]) -> reqwest::Response {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client");
    let mut req = client.get(edge.url(path));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.expect("request to the edge")
}

/// A response's `Cache-Status` (empty when absent).
pub fn cache_status(resp: &reqwest::Response) -> String {
    resp.headers()
        .get("cache-status")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .unwrap_or_default()
}

/// Sends raw bytes on a new connection and reads the whole answer (until close or
/// `limit`).
pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8], limit: Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(bytes).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(limit, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// A pool of servers as a TOML inline array.
pub fn servers(origins: &[&Origin]) -> String {
    let list: Vec<String> = origins
        .iter()
        .map(|o| format!("{{ address = \"{}\" }}", o.addr))
        .collect();
    format!("[{}]", list.join(", "))
}

/// A config body with `extra` first, then one pool `app` of `origin` and one route
/// `all` to it.
pub fn single_pool(origin: &Origin, extra: &str) -> String {
    format!(
        r#"
{extra}

[[upstreams]]
name = "app"
servers = {}

[[routes]]
name = "all"
upstream = "app"
"#,
        servers(&[origin])
    )
}

/// Deterministic, compressible text: `n` bytes of JSON-like chat lines.
pub fn compressible(n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n + 64);
    let mut i = 0u64;
    while out.len() < n {
        out.extend_from_slice(
            format!(
                "{{\"id\":{i},\"role\":\"assistant\",\"text\":\"token {}\"}},\n",
                i % 113
            )
            .as_bytes(),
        );
        i += 1;
    }
    out.truncate(n);
    out
}

fn query_param<'a>(uri: &'a Uri, key: &str) -> Option<&'a str> {
    uri.query()?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

async fn bytes_body(
    State(st): State<Arc<OriginState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(n): Path<usize>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    record(&st, &method, &uri, &headers, peer);
    st.finished_writing.store(false, Ordering::SeqCst);
    let ctype = query_param(&uri, "type")
        .unwrap_or("application/json")
        .replace("%2F", "/");
    let with_length = query_param(&uri, "cl") != Some("0");
    let data = bytes::Bytes::from(compressible(n));
    let chunks: Vec<bytes::Bytes> = (0..n)
        .step_by(16 * 1024)
        .map(|off| data.slice(off..(off + 16 * 1024).min(n)))
        .collect();
    let last = chunks.len().saturating_sub(1);
    let state = st.clone();
    // hyper stops polling a body once Content-Length bytes went out, so the flag is
    // set when the last chunk is taken: everything before it was already written
    let stream = futures_util::stream::iter(chunks.into_iter().enumerate().map(move |(i, c)| {
        if i == last {
            state.finished_writing.store(true, Ordering::SeqCst);
        }
        Ok::<_, std::io::Error>(c)
    }));
    let mut builder = Response::builder()
        .header("content-type", ctype)
        .header("x-origin", st.name.clone());
    if with_length {
        builder = builder.header("content-length", n);
    }
    builder
        .body(axum::body::Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

async fn sse(
    State(st): State<Arc<OriginState>>,
    Path((count, ms)): Path<(usize, u64)>,
) -> Response {
    st.finished_writing.store(false, Ordering::SeqCst);
    let state = st.clone();
    let events = futures_util::stream::unfold(0usize, move |i| async move {
        if i == count {
            return None;
        }
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        Some((
            Ok::<_, std::io::Error>(bytes::Bytes::from(format!("data: token {i}\n\n"))),
            i + 1,
        ))
    })
    .chain(futures_util::stream::once(async move {
        state.finished_writing.store(true, Ordering::SeqCst);
        Ok(bytes::Bytes::new())
    }));
    Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(axum::body::Body::from_stream(events))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

async fn upload(
    State(st): State<Arc<OriginState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    record(&st, &method, &uri, &headers, peer);
    st.uploads.lock().push(body.to_vec());
    format!("{}", body.len()).into_response()
}

async fn fixed(
    State(st): State<Arc<OriginState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    record(&st, &method, &uri, &headers, peer);
    let n = st.requests.load(Ordering::SeqCst);
    if let Some(ms) = query_param(&uri, "delay").and_then(|v| v.parse::<u64>().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let forced = st.force_status.load(Ordering::SeqCst);
    if forced != 0 {
        return (
            StatusCode::from_u16(forced).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            "origin failure",
        )
            .into_response();
    }
    let decode = |v: &str| {
        v.replace("%22", "\"")
            .replace("%20", " ")
            .replace("%2C", ",")
            .replace("%3D", "=")
            .replace("%3B", ";")
    };
    let etag = query_param(&uri, "etag").map(decode);
    if let (Some(tag), Some(inm)) = (&etag, headers.get("if-none-match")) {
        if inm.to_str().ok() == Some(tag.as_str()) {
            let mut b = Response::builder().status(304).header("etag", tag.as_str());
            if let Some(cc) = query_param(&uri, "cc304").or(query_param(&uri, "cc")) {
                b = b.header("cache-control", decode(cc));
            }
            // `x304`: a field only 304s carry (a stored response updated from it)
            if let Some(x) = query_param(&uri, "x304") {
                b = b.header("x-updated", decode(x));
            }
            b = b.header("x-origin-n", n);
            return b
                .body(axum::body::Body::empty())
                .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response());
        }
    }
    let status = query_param(&uri, "status")
        .and_then(|v| v.parse::<u16>().ok())
        .unwrap_or(200);
    let mut b = Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("x-origin-n", n);
    for (param, header) in [
        ("etag", "etag"),
        ("vary", "vary"),
        ("cc", "cache-control"),
        ("ce", "content-encoding"),
        ("xab", "x-accel-buffering"),
        ("sc", "set-cookie"),
        ("age", "age"),
        ("lm", "last-modified"),
        ("loc", "location"),
        ("cdn", "cdn-cache-control"),
        ("wcc", "wingman-cache-control"),
    ] {
        if let Some(v) = query_param(&uri, param) {
            b = b.header(header, decode(v));
        }
    }
    b.body(axum::body::Body::from(compressible(4096)))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}
