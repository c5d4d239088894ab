//! Load balancing: weighted round robin, least connections, consistent hashing,
//! retries on another server, passive ejection, active health checks, the pool
//! queue under `max_conns`, and upstream read timeouts.

mod common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{servers, wait_until, Edge, Origin};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A pool `app` with `servers` (a TOML inline array) and `extra` lines (keys and
/// sub-tables of the pool), and one route `all` to it.
fn pool_with(servers: &str, extra: &str) -> String {
    format!(
        r#"
[[upstreams]]
name = "app"
servers = {servers}
{extra}

[[routes]]
name = "all"
upstream = "app"
"#
    )
}

/// The origin name an answer came from (`x-origin`).
fn origin_of(resp: &reqwest::Response) -> String {
    resp.headers()
        .get("x-origin")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

/// What a [`RawOrigin`] does with the requests it reads.
#[derive(Clone, Copy, PartialEq, Eq)]
enum RawMode {
    /// Reads one whole request, then closes the connection without answering.
    DropAfterRequest,
    /// Answers every request with an empty 500 (keep-alive).
    Always500,
    /// Reads requests and never answers; the connection stays open.
    BlackHole,
}

/// An origin on a raw TCP listener, for misbehaviour axum would not produce.
struct RawOrigin {
    addr: SocketAddr,
    /// Connections accepted.
    connections: Arc<AtomicUsize>,
    /// Whole requests (header and body) read.
    requests: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl RawOrigin {
    async fn start(mode: RawMode) -> RawOrigin {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let (c, r) = (connections.clone(), requests.clone());
        let task = tokio::spawn(async move {
            let mut handlers = tokio::task::JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                handlers.spawn(raw_connection(stream, mode, r.clone()));
            }
        });
        RawOrigin {
            addr,
            connections,
            requests,
            task,
        }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for RawOrigin {
    fn drop(&mut self) {
        // aborting the accept loop drops its JoinSet, which aborts every handler
        self.task.abort();
    }
}

async fn raw_connection(mut stream: TcpStream, mode: RawMode, requests: Arc<AtomicUsize>) {
    let mut buf = Vec::new();
    while read_request(&mut stream, &mut buf).await {
        requests.fetch_add(1, Ordering::SeqCst);
        match mode {
            RawMode::DropAfterRequest => return,
            RawMode::Always500 => {
                let answer = b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\r\n";
                if stream.write_all(answer).await.is_err() {
                    return;
                }
            }
            RawMode::BlackHole => {}
        }
    }
}

/// Reads one request (header, then a `content-length` body) from `stream`, keeping
/// bytes of a following request in `buf`. False on EOF or error.
async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let body_len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + body_len {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    buf.drain(..head_end + body_len);
    true
}

#[tokio::test]
async fn weighted_round_robin_follows_the_weights_and_interleaves() {
    let heavy = Origin::start("heavy").await;
    let light = Origin::start("light").await;
    let list = format!(
        r#"[{{ address = "{}", weight = 3 }}, {{ address = "{}", weight = 1 }}]"#,
        heavy.addr, light.addr
    );
    let edge = Edge::start(&pool_with(&list, "")).await;
    let client = reqwest::Client::new();
    let mut picks = Vec::new();
    for i in 0..40 {
        let resp = client
            .get(edge.url(&format!("/r{i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        picks.push(origin_of(&resp));
    }
    let heavy_count = picks.iter().filter(|p| *p == "heavy").count();
    let light_count = picks.iter().filter(|p| *p == "light").count();
    assert_eq!((heavy_count, light_count), (30, 10), "picks: {picks:?}");
    // smooth: every cycle of 4 has the light server once, never a burst of it
    for cycle in picks.chunks(4) {
        assert_eq!(
            cycle.iter().filter(|p| *p == "light").count(),
            1,
            "picks: {picks:?}"
        );
    }
    assert_eq!((heavy.requests(), light.requests()), (30, 10));
}

#[tokio::test]
async fn least_conn_sends_new_requests_to_the_idle_server() {
    let a = Origin::start("a").await;
    let b = Origin::start("b").await;
    let edge = Edge::start(&pool_with(
        &servers(&[&a, &b]),
        r#"algorithm = "least_conn""#,
    ))
    .await;
    let slow_url = edge.url("/slow/20000");
    let slow = tokio::spawn(async move { common::fresh_client().get(slow_url).send().await });
    let (a_st, b_st) = (a.state.clone(), b.state.clone());
    wait_until(Duration::from_secs(10), "slow request in flight", || {
        let (a_st, b_st) = (a_st.clone(), b_st.clone());
        async move {
            a_st.in_flight.load(Ordering::SeqCst) + b_st.in_flight.load(Ordering::SeqCst) == 1
        }
    })
    .await;
    let (busy, idle) = if a.state.in_flight.load(Ordering::SeqCst) == 1 {
        (&a, &b)
    } else {
        (&b, &a)
    };
    let busy_before = busy.requests();
    let client = reqwest::Client::new();
    for i in 0..10 {
        let resp = client
            .get(edge.url(&format!("/quick{i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(origin_of(&resp), idle.state.name, "request {i}");
    }
    assert_eq!(busy.requests(), busy_before);
    assert_eq!(idle.requests(), 10);
    // the busy server really was busy the whole time
    assert_eq!(busy.state.in_flight.load(Ordering::SeqCst), 1);
    slow.abort();
}

/// Sends `per_key` requests for each of `keys` with `header(key)` set; returns the
/// origin each key went to, after checking it was the same every time.
async fn stickiness(
    edge: &Edge,
    keys: &[String],
    per_key: usize,
    header: impl Fn(&str) -> (&'static str, String),
) -> HashMap<String, String> {
    let client = reqwest::Client::new();
    let mut placed = HashMap::new();
    for key in keys {
        let mut seen = HashSet::new();
        for _ in 0..per_key {
            let (name, value) = header(key);
            let resp = client
                .get(edge.url("/sticky"))
                .header(name, value)
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
            seen.insert(origin_of(&resp));
        }
        assert_eq!(seen.len(), 1, "key {key} went to {seen:?}");
        placed.insert(key.clone(), seen.into_iter().next().unwrap());
    }
    placed
}

#[tokio::test]
async fn hash_on_a_header_is_sticky_and_spreads_keys() {
    let a = Origin::start("a").await;
    let b = Origin::start("b").await;
    let edge = Edge::start(&pool_with(
        &servers(&[&a, &b]),
        "algorithm = \"hash\"\nhash_on = \"header:X-User\"",
    ))
    .await;
    let keys: Vec<String> = (0..20).map(|i| format!("user-{i}")).collect();
    let placed = stickiness(&edge, &keys, 5, |k| ("x-user", k.to_owned())).await;
    let used: HashSet<&String> = placed.values().collect();
    assert_eq!(used.len(), 2, "all keys on one server: {placed:?}");
    assert_eq!(a.requests() + b.requests(), 100);
}

#[tokio::test]
async fn hash_on_a_cookie_is_sticky_and_spreads_keys() {
    let a = Origin::start("a").await;
    let b = Origin::start("b").await;
    let edge = Edge::start(&pool_with(
        &servers(&[&a, &b]),
        "algorithm = \"hash\"\nhash_on = \"cookie:sid\"",
    ))
    .await;
    let keys: Vec<String> = (0..20).map(|i| format!("session-{i}")).collect();
    // other cookies around it, in varying order, do not matter
    let placed = stickiness(&edge, &keys, 5, |k| {
        ("cookie", format!("theme=dark; sid={k}; lang=en"))
    })
    .await;
    let again = stickiness(&edge, &keys, 1, |k| ("cookie", format!("sid={k}"))).await;
    assert_eq!(placed, again);
    let used: HashSet<&String> = placed.values().collect();
    assert_eq!(used.len(), 2, "all keys on one server: {placed:?}");
}

#[tokio::test]
async fn a_failed_connect_is_retried_on_another_server() {
    let live = Origin::start("live").await;
    let dead = format!("127.0.0.1:{}", common::free_port());
    let list = format!(
        r#"[{{ address = "{}" }}, {{ address = "{dead}" }}]"#,
        live.addr
    );
    let edge = Edge::start(&pool_with(&list, "")).await;
    let client = reqwest::Client::new();
    for i in 0..20 {
        let req = if i % 2 == 0 {
            client.get(edge.url(&format!("/get{i}")))
        } else {
            client.post(edge.url(&format!("/post{i}"))).body("payload")
        };
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 200, "request {i}");
        assert_eq!(resp.text().await.unwrap(), "live");
    }
    assert_eq!(live.requests(), 20);
    let failures = edge
        .metric(&format!(
            "wingman_edge_upstream_connect_failures_total{{pool=\"app\",server=\"{dead}\"}}"
        ))
        .await
        .unwrap_or(0.0);
    assert!(failures > 0.0, "no connect failure counted");
    let retries = edge
        .metric("wingman_edge_upstream_retries_total{pool=\"app\"}")
        .await
        .unwrap_or(0.0);
    assert!(retries > 0.0, "no retry counted");
}

/// A pool of a normal origin and one that drops every connection after reading the
/// request, round robin, without passive ejection.
async fn good_and_dropping() -> (Origin, RawOrigin, Edge) {
    let good = Origin::start("good").await;
    let bad = RawOrigin::start(RawMode::DropAfterRequest).await;
    let list = format!(
        r#"[{{ address = "{}" }}, {{ address = "{}" }}]"#,
        good.addr, bad.addr
    );
    let extra = "algorithm = \"round_robin\"\n[upstreams.passive]\nconsecutive_failures = 0";
    let edge = Edge::start(&pool_with(&list, extra)).await;
    (good, bad, edge)
}

#[tokio::test]
async fn a_post_is_not_retried_once_it_reached_an_upstream() {
    let (good, bad, edge) = good_and_dropping().await;
    let client = common::fresh_client();
    let mut failed = 0;
    for i in 0..10 {
        let resp = client
            .post(edge.url(&format!("/post{i}")))
            .body(format!("message {i}"))
            .send()
            .await
            .unwrap();
        match resp.status().as_u16() {
            200 => assert_eq!(resp.text().await.unwrap(), "good"),
            502 => failed += 1,
            other => panic!("request {i}: unexpected status {other}"),
        }
    }
    // every POST that reached the dropping origin failed there, once: none was sent
    // again, neither to it nor to the good origin
    assert!(bad.requests() > 0, "no POST landed on the dropping origin");
    assert_eq!(
        bad.requests(),
        failed,
        "POSTs resent after reaching an upstream"
    );
    assert_eq!(bad.connections(), failed);
    assert_eq!(good.requests(), 10 - failed);
    assert_eq!(
        edge.metric("wingman_edge_upstream_retries_total{pool=\"app\"}")
            .await
            .unwrap_or(0.0),
        0.0
    );
}

#[tokio::test]
async fn an_idempotent_get_that_reached_an_upstream_is_retried_elsewhere() {
    let (good, bad, edge) = good_and_dropping().await;
    let client = common::fresh_client();
    for i in 0..10 {
        let resp = client
            .get(edge.url(&format!("/get{i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "request {i}");
        assert_eq!(resp.text().await.unwrap(), "good");
    }
    assert_eq!(good.requests(), 10);
    assert!(bad.requests() > 0, "no GET landed on the dropping origin");
    let retries = edge
        .metric("wingman_edge_upstream_retries_total{pool=\"app\"}")
        .await
        .unwrap_or(0.0);
    assert_eq!(retries, bad.requests() as f64);
}

#[tokio::test]
async fn consecutive_5xx_eject_a_server_for_the_ejection_time() {
    let good = Origin::start("good").await;
    let bad = RawOrigin::start(RawMode::Always500).await;
    let list = format!(
        r#"[{{ address = "{}" }}, {{ address = "{}" }}]"#,
        good.addr, bad.addr
    );
    let extra = "[upstreams.passive]\nconsecutive_failures = 2\nejection_time = \"30s\"";
    let edge = Edge::start(&pool_with(&list, extra)).await;
    let client = reqwest::Client::new();
    let mut sent = 0;
    while bad.requests() < 2 {
        assert!(sent < 20, "the 500 origin got {} requests", bad.requests());
        let resp = client.get(edge.url("/p")).send().await.unwrap();
        assert!(
            [200, 500].contains(&resp.status().as_u16()),
            "{}",
            resp.status()
        );
        sent += 1;
    }
    for i in 0..20 {
        let resp = client.get(edge.url("/after")).send().await.unwrap();
        assert_eq!(resp.status(), 200, "request {i} after the ejection");
        assert_eq!(origin_of(&resp), "good");
    }
    assert_eq!(bad.requests(), 2);
    edge.wait_metric(
        &format!(
            "wingman_edge_upstream_ejections_total{{pool=\"app\",server=\"{}\"}}",
            bad.addr
        ),
        1.0,
    )
    .await;
    let st = edge.server_status("app", &bad.addr.to_string()).await;
    assert_eq!(st["ejected"], true, "{st}");
    assert_eq!(st["available"], false, "{st}");
    assert_eq!(
        st["healthy"], true,
        "ejection is not a health verdict: {st}"
    );
    let good_st = edge.server_status("app", &good.addr.to_string()).await;
    assert_eq!(good_st["ejected"], false, "{good_st}");
}

const FAST_HEALTH_CHECKS: &str = r#"
[upstreams.health_check]
interval = "100ms"
timeout = "500ms"
rise = 2
fall = 2
"#;

async fn wait_healthy(edge: &Edge, origin: &Origin, healthy: bool) {
    let addr = origin.addr.to_string();
    wait_until(
        Duration::from_secs(10),
        &format!("{addr} healthy == {healthy}"),
        || {
            let addr = addr.clone();
            async move { edge.server_status("app", &addr).await["healthy"] == healthy }
        },
    )
    .await;
}

#[tokio::test]
async fn active_health_checks_take_a_server_out_and_bring_it_back() {
    let a = Origin::start("a").await;
    let b = Origin::start("b").await;
    let edge = Edge::start(&pool_with(&servers(&[&a, &b]), FAST_HEALTH_CHECKS)).await;
    let up = |o: &Origin| {
        format!(
            "wingman_edge_upstream_server_up{{pool=\"app\",server=\"{}\"}}",
            o.addr
        )
    };
    edge.wait_metric(&up(&a), 1.0).await;
    wait_until(Duration::from_secs(10), "probes reach a", || async {
        a.state.probes.load(Ordering::SeqCst) >= 2
    })
    .await;

    a.set_healthy(false);
    wait_healthy(&edge, &a, false).await;
    edge.wait_metric(&up(&a), 0.0).await;
    assert_eq!(edge.metric(&up(&b)).await, Some(1.0));
    let client = reqwest::Client::new();
    let a_before = a.requests();
    for i in 0..10 {
        let resp = client.get(edge.url("/down")).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(origin_of(&resp), "b", "request {i} while a is down");
    }
    assert_eq!(a.requests(), a_before);
    edge.wait_metric(
        &format!(
            "wingman_edge_upstream_health_changes_total{{pool=\"app\",server=\"{}\",state=\"down\"}}",
            a.addr
        ),
        1.0,
    )
    .await;

    a.set_healthy(true);
    wait_healthy(&edge, &a, true).await;
    edge.wait_metric(&up(&a), 1.0).await;
    let mut to_a = 0;
    for _ in 0..10 {
        let resp = client.get(edge.url("/back")).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        if origin_of(&resp) == "a" {
            to_a += 1;
        }
    }
    assert_eq!(to_a, 5, "a should take its round robin share again");
}

#[tokio::test]
async fn with_panic_mode_off_every_server_down_answers_503_at_once_with_retry_after() {
    let a = Origin::start("a").await;
    let b = Origin::start("b").await;
    a.set_healthy(false);
    b.set_healthy(false);
    // (with panic mode on, the default, they would get the requests anyway)
    let extra = format!("queue_timeout = \"30s\"\npanic_threshold = 0\n{FAST_HEALTH_CHECKS}");
    let edge = Edge::start(&pool_with(&servers(&[&a, &b]), &extra)).await;
    wait_healthy(&edge, &a, false).await;
    wait_healthy(&edge, &b, false).await;
    let started = Instant::now();
    let resp = common::fresh_client()
        .get(edge.url("/anything"))
        .send()
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().contains_key("retry-after"), "{resp:?}");
    assert!(
        took < Duration::from_secs(5),
        "503 took {took:?}: it waited in the queue (queue_timeout is 30s)"
    );
    assert_eq!(a.requests() + b.requests(), 0);
}

fn one_limited_server(origin: &Origin, queue_size: usize, queue_timeout: &str) -> String {
    pool_with(
        &format!(r#"[{{ address = "{}", max_conns = 1 }}]"#, origin.addr),
        &format!("queue_size = {queue_size}\nqueue_timeout = \"{queue_timeout}\""),
    )
}

/// Starts a GET in the background on a connection of its own.
fn spawn_get(url: String) -> tokio::task::JoinHandle<reqwest::Result<reqwest::Response>> {
    tokio::spawn(async move { common::fresh_client().get(url).send().await })
}

async fn wait_in_flight(origin: &Origin, n: usize) {
    let st = origin.state.clone();
    wait_until(
        Duration::from_secs(10),
        &format!("{n} in flight at the origin"),
        || {
            let st = st.clone();
            async move { st.in_flight.load(Ordering::SeqCst) == n }
        },
    )
    .await;
}

#[tokio::test]
async fn a_full_queue_answers_503_at_once() {
    let origin = Origin::start("a").await;
    let edge = Edge::start(&one_limited_server(&origin, 1, "30s")).await;
    let first = spawn_get(edge.url("/slow/3000"));
    wait_in_flight(&origin, 1).await;
    let queued = spawn_get(edge.url("/queued"));
    edge.wait_metric("wingman_edge_upstream_pool_queued{pool=\"app\"}", 1.0)
        .await;

    let resp = common::fresh_client()
        .get(edge.url("/third"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().contains_key("retry-after"), "{resp:?}");
    // answered while the first request still held the only slot
    assert_eq!(origin.state.in_flight.load(Ordering::SeqCst), 1);
    edge.wait_metric(
        "wingman_edge_upstream_queue_rejections_total{pool=\"app\",reason=\"full\"}",
        1.0,
    )
    .await;

    assert_eq!(first.await.unwrap().unwrap().status(), 200);
    assert_eq!(queued.await.unwrap().unwrap().status(), 200);
    assert_eq!(origin.state.max_in_flight.load(Ordering::SeqCst), 1);
    assert!(!origin.state.seen.lock().iter().any(|s| s.path == "/third"));
}

#[tokio::test]
async fn a_queued_request_is_served_when_the_slot_frees() {
    let origin = Origin::start("a").await;
    let edge = Edge::start(&one_limited_server(&origin, 4, "5s")).await;
    let first = spawn_get(edge.url("/slow/1000"));
    wait_in_flight(&origin, 1).await;
    let queued = spawn_get(edge.url("/slow/10"));
    edge.wait_metric("wingman_edge_upstream_pool_queued{pool=\"app\"}", 1.0)
        .await;
    assert_eq!(first.await.unwrap().unwrap().status(), 200);
    let resp = queued.await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "a");
    assert_eq!(origin.requests(), 2);
    // max_conns = 1 held: the queued request never ran beside the first
    assert_eq!(origin.state.max_in_flight.load(Ordering::SeqCst), 1);
    edge.wait_metric("wingman_edge_upstream_pool_queued{pool=\"app\"}", 0.0)
        .await;
}

#[tokio::test]
async fn a_queued_request_gets_503_after_the_queue_timeout() {
    let origin = Origin::start("a").await;
    let edge = Edge::start(&one_limited_server(&origin, 4, "200ms")).await;
    let first = spawn_get(edge.url("/slow/2000"));
    wait_in_flight(&origin, 1).await;
    let resp = common::fresh_client()
        .get(edge.url("/waits"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().contains_key("retry-after"), "{resp:?}");
    // it gave up while the first request was still running
    assert_eq!(origin.state.in_flight.load(Ordering::SeqCst), 1);
    edge.wait_metric(
        "wingman_edge_upstream_queue_rejections_total{pool=\"app\",reason=\"timeout\"}",
        1.0,
    )
    .await;
    assert_eq!(first.await.unwrap().unwrap().status(), 200);
    assert_eq!(origin.requests(), 1);
}

#[tokio::test]
async fn a_black_holed_upstream_gets_504_after_the_read_timeout() {
    let hole = RawOrigin::start(RawMode::BlackHole).await;
    let list = format!(r#"[{{ address = "{}" }}]"#, hole.addr);
    let extra = "retries = 0\n[upstreams.timeouts]\nread = \"300ms\"";
    let edge = Edge::start(&pool_with(&list, extra)).await;
    let started = Instant::now();
    let resp = common::fresh_client()
        .get(edge.url("/never"))
        .send()
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(resp.status(), 504);
    assert!(took < Duration::from_secs(10), "504 took {took:?}");
    assert_eq!(hole.requests(), 1);
    assert_eq!(hole.connections(), 1);
}

#[tokio::test]
async fn every_server_refusing_connections_answers_502_after_trying_each_once() {
    let dead: Vec<String> = (0..2)
        .map(|_| format!("127.0.0.1:{}", common::free_port()))
        .collect();
    let list = format!(
        r#"[{{ address = "{}" }}, {{ address = "{}" }}]"#,
        dead[0], dead[1]
    );
    let edge = Edge::start(&pool_with(&list, "retries = 5")).await;
    let resp = common::fresh_client()
        .post(edge.url("/nowhere"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 502);
    for d in &dead {
        let series =
            format!("wingman_edge_upstream_connect_failures_total{{pool=\"app\",server=\"{d}\"}}");
        assert_eq!(edge.metric(&series).await, Some(1.0), "{series}");
    }
}

#[tokio::test]
async fn the_retry_counter_counts_only_retries_that_happen() {
    let dead: Vec<String> = (0..2)
        .map(|_| format!("127.0.0.1:{}", common::free_port()))
        .collect();
    let list = format!(
        r#"[{{ address = "{}" }}, {{ address = "{}" }}]"#,
        dead[0], dead[1]
    );
    let edge = Edge::start(&pool_with(&list, "retries = 5")).await;
    let resp = common::fresh_client()
        .get(edge.url("/"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 502);
    edge.wait_metric("wingman_edge_upstream_attempts_total", 2.0)
        .await;
    // two attempts: the first one and one retry
    assert_eq!(
        edge.metric("wingman_edge_upstream_retries_total{pool=\"app\"}")
            .await,
        Some(1.0)
    );
}

/// A front for a real [`Origin`] whose first `resets` connections are reset (RST)
/// after the request arrives; later connections are passed through to the origin.
/// Stands for an origin that drops a burst of sockets (a deploy, a restart).
struct ResettingFront {
    addr: SocketAddr,
    /// Connections reset so far.
    reset: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl ResettingFront {
    async fn start(behind: SocketAddr, resets: usize) -> ResettingFront {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let reset = Arc::new(AtomicUsize::new(0));
        let counter = reset.clone();
        let task = tokio::spawn(async move {
            let mut handlers = tokio::task::JoinSet::new();
            let mut accepted = 0;
            while let Ok((mut stream, _)) = listener.accept().await {
                accepted += 1;
                if accepted <= resets {
                    let counter = counter.clone();
                    handlers.spawn(async move {
                        let mut buf = Vec::new();
                        read_request(&mut stream, &mut buf).await;
                        let _ = stream.set_zero_linger();
                        drop(stream);
                        counter.fetch_add(1, Ordering::SeqCst);
                    });
                } else {
                    handlers.spawn(async move {
                        if let Ok(mut up) = TcpStream::connect(behind).await {
                            let _ = tokio::io::copy_bidirectional(&mut stream, &mut up).await;
                        }
                    });
                }
            }
        });
        ResettingFront { addr, reset, task }
    }

    fn resets(&self) -> usize {
        self.reset.load(Ordering::SeqCst)
    }
}

impl Drop for ResettingFront {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A pool whose only server resets 20 connections in a row, then works again.
/// Every reset answer is a 502 (the origin's failure, passed on); once the origin
/// works, every request succeeds: the lone server was never ejected.
async fn lone_server_survives_a_burst_of_resets(extra: &str) {
    let origin = Origin::start("lone").await;
    let front = ResettingFront::start(origin.addr, 20).await;
    let list = format!(r#"[{{ address = "{}" }}]"#, front.addr);
    let passive = "[upstreams.passive]\nconsecutive_failures = 3\nejection_time = \"60s\"";
    let edge = Edge::start(&pool_with(&list, &format!("{extra}\n{passive}"))).await;
    let client = common::fresh_client();
    for i in 0..20 {
        let resp = client
            .get(edge.url(&format!("/r{i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(
            resp.status(),
            502,
            "request {i} while the origin resets ({} resets so far)",
            front.resets()
        );
    }
    assert_eq!(front.resets(), 20);
    for i in 0..10 {
        let resp = client
            .get(edge.url(&format!("/ok{i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(
            resp.status(),
            200,
            "request {i} once the origin works again"
        );
        assert_eq!(origin_of(&resp), "lone");
    }
    assert_eq!(origin.requests(), 10);
    let st = edge.server_status("app", &front.addr.to_string()).await;
    assert_eq!(st["ejected"], false, "{st}");
    let series = format!(
        "wingman_edge_upstream_ejections_total{{pool=\"app\",server=\"{}\"}}",
        front.addr
    );
    assert_eq!(edge.metric(&series).await.unwrap_or(0.0), 0.0, "{series}");
    let kept = format!(
        "wingman_edge_upstream_ejections_refused_total{{pool=\"app\",server=\"{}\"}}",
        front.addr
    );
    // 20 failures in a row reach the threshold (3) six times
    assert_eq!(edge.metric(&kept).await, Some(6.0), "{kept}");
}

#[tokio::test]
async fn a_lone_server_that_resets_connections_is_never_ejected() {
    lone_server_survives_a_burst_of_resets("").await;
}

#[tokio::test]
async fn a_lone_server_is_never_ejected_even_with_panic_mode_off() {
    lone_server_survives_a_burst_of_resets("panic_threshold = 0").await;
}

/// Four servers with fast health checks; returns them and the edge.
async fn four_checked_servers() -> (Vec<Origin>, Edge) {
    let mut origins = Vec::new();
    for name in ["a", "b", "c", "d"] {
        origins.push(Origin::start(name).await);
    }
    let refs: Vec<&Origin> = origins.iter().collect();
    let edge = Edge::start(&pool_with(&servers(&refs), FAST_HEALTH_CHECKS)).await;
    (origins, edge)
}

/// Sends `n` requests; returns how many each origin name answered.
async fn spread(edge: &Edge, n: usize) -> HashMap<String, usize> {
    let client = reqwest::Client::new();
    let mut seen = HashMap::new();
    for i in 0..n {
        let resp = client
            .get(edge.url(&format!("/s{i}")))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "request {i}");
        *seen.entry(origin_of(&resp)).or_insert(0) += 1;
    }
    seen
}

async fn pool_panic(edge: &Edge) -> serde_json::Value {
    let s = edge.status().await;
    s["pools"][0]["panic"].clone()
}

#[tokio::test]
async fn with_most_servers_down_the_pool_balances_across_all_of_them() {
    let (o, edge) = four_checked_servers().await;
    let panic_series = "wingman_edge_upstream_panic_total{pool=\"app\"}";
    // one of four down: 75 % available, above the 50 % threshold: it is avoided
    o[0].set_healthy(false);
    wait_healthy(&edge, &o[0], false).await;
    let seen = spread(&edge, 12).await;
    assert_eq!(seen.get("a"), None, "a down server got requests: {seen:?}");
    assert_eq!(edge.metric(panic_series).await.unwrap_or(0.0), 0.0);
    // three of four down: 25 % available: panic mode, every server gets its share
    o[1].set_healthy(false);
    o[2].set_healthy(false);
    wait_healthy(&edge, &o[1], false).await;
    wait_healthy(&edge, &o[2], false).await;
    let seen = spread(&edge, 20).await;
    for name in ["a", "b", "c", "d"] {
        assert_eq!(seen.get(name), Some(&5), "round robin over all: {seen:?}");
    }
    assert_eq!(pool_panic(&edge).await, true);
    assert_eq!(edge.metric(panic_series).await, Some(20.0));
    assert_eq!(
        edge.metric("wingman_edge_upstream_pool_panic{pool=\"app\"}")
            .await,
        Some(1.0)
    );
    // servers back: panic mode ends by itself
    o[1].set_healthy(true);
    wait_healthy(&edge, &o[1], true).await;
    assert_eq!(pool_panic(&edge).await, false);
    let seen = spread(&edge, 12).await;
    assert_eq!(seen.get("a").or(seen.get("c")), None, "{seen:?}");
}
