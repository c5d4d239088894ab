//! Rate limits, per-client connection caps, trusted proxies and the access log
//! through a real edge.

mod common;

use std::time::Duration;

use common::{single_pool, wait_until, Edge, Origin};

fn limited(origin: &Origin, limit: &str) -> String {
    format!(
        "{}\n[routes.rate_limit]\n{limit}\n",
        single_pool(origin, "")
    )
}

async fn status_with(edge: &Edge, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut req = common::fresh_client().get(edge.url("/"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.unwrap()
}

#[tokio::test]
async fn a_burst_beyond_rate_and_burst_gets_429_while_another_client_is_unaffected() {
    let origin = Origin::start("a").await;
    let edge = Edge::start(&limited(
        &origin,
        "key = \"header:X-Client\"\nrate = 0.5\nburst = 3",
    ))
    .await;
    let mut statuses = Vec::new();
    for _ in 0..6 {
        statuses.push(status_with(&edge, &[("x-client", "greedy")]).await);
    }
    let codes: Vec<u16> = statuses.iter().map(|r| r.status().as_u16()).collect();
    assert_eq!(codes, [200, 200, 200, 200, 429, 429], "1 + burst allowed");
    let retry: u64 = statuses[4].headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry), "retry-after {retry}");
    assert_eq!(
        status_with(&edge, &[("x-client", "polite")]).await.status(),
        200
    );
    assert_eq!(origin.requests(), 5);
    edge.wait_metric("wingman_edge_rate_limited_total{route=\"all\"}", 2.0)
        .await;
}

#[tokio::test]
async fn behind_a_trusted_proxy_the_forwarded_client_is_limited() {
    let origin = Origin::start("a").await;
    let body = format!(
        "[client]\ntrusted_proxies = [\"127.0.0.0/8\"]\n{}",
        limited(&origin, "rate = 0.1\nburst = 0")
    );
    let edge = Edge::start(&body).await;
    let a = [("x-forwarded-for", "198.51.100.7")];
    let b = [("x-forwarded-for", "198.51.100.8")];
    assert_eq!(status_with(&edge, &a).await.status(), 200);
    assert_eq!(status_with(&edge, &a).await.status(), 429);
    assert_eq!(
        status_with(&edge, &b).await.status(),
        200,
        "another client behind the proxy"
    );
}

#[tokio::test]
async fn connections_per_client_ip_are_capped() {
    let origin = Origin::start("a").await;
    let edge = Edge::start(&format!(
        "[client]\nmax_conns_per_ip = 2\n{}",
        single_pool(&origin, "")
    ))
    .await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut held = Vec::new();
    for _ in 0..2 {
        // a served keep-alive request proves the edge holds the connection
        let mut s = tokio::net::TcpStream::connect(edge.addr()).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 12];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"HTTP/1.1 200");
        held.push(s);
    }
    let answer = common::raw_exchange(
        edge.addr(),
        b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
    drop(held);
    let edge_ref = &edge;
    wait_until(Duration::from_secs(5), "slot released", || async move {
        common::raw_exchange(
            edge_ref.addr(),
            b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
            Duration::from_secs(5),
        )
        .await
        .starts_with("HTTP/1.1 200")
    })
    .await;
}

#[tokio::test]
async fn access_log_lines_parse_in_both_formats_and_the_file_is_reopened_after_rename() {
    let origin = Origin::start("a").await;
    let dir = tempfile::tempdir().unwrap();
    let json_path = dir.path().join("access.json.log");
    let combined_path = dir.path().join("access.log");
    // JSON
    let edge = Edge::start(&format!(
        "[access_log]\npath = \"{}\"\nformat = \"json\"\n{}",
        json_path.display(),
        single_pool(&origin, "")
    ))
    .await;
    common::fresh_client()
        .get(edge.url("/first?x=1"))
        .header("user-agent", "agent \"quoted\"")
        .header("x-request-id", "rid-1")
        .send()
        .await
        .unwrap();
    let path_ref = &json_path;
    wait_until(Duration::from_secs(10), "json line", || async move {
        std::fs::read_to_string(path_ref)
            .unwrap_or_default()
            .lines()
            .count()
            == 1
    })
    .await;
    let line = std::fs::read_to_string(&json_path).unwrap();
    let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    assert_eq!(v["status"], 200);
    assert_eq!(v["uri"], "/first?x=1");
    assert_eq!(v["request_id"], "rid-1");
    assert_eq!(v["route"], "all");
    assert_eq!(v["user_agent"], "agent \"quoted\"");
    // logrotate: rename, then SIGHUP
    let rotated = dir.path().join("access.json.log.1");
    std::fs::rename(&json_path, &rotated).unwrap();
    edge.sighup();
    edge.wait_reloads(2.0).await;
    common::fresh_client()
        .get(edge.url("/second"))
        .send()
        .await
        .unwrap();
    wait_until(
        Duration::from_secs(10),
        "line in the new file",
        || async move {
            std::fs::read_to_string(path_ref)
                .unwrap_or_default()
                .contains("/second")
        },
    )
    .await;
    assert!(!std::fs::read_to_string(&rotated)
        .unwrap()
        .contains("/second"));
    assert_eq!(
        edge.metric("wingman_edge_access_log_reopens_total{result=\"ok\"}")
            .await,
        Some(1.0)
    );
    drop(edge);
    // combined
    let edge = Edge::start(&format!(
        "[access_log]\npath = \"{}\"\n{}",
        combined_path.display(),
        single_pool(&origin, "")
    ))
    .await;
    common::fresh_client()
        .get(edge.url("/c"))
        .header("referer", "http://ref/")
        .header("user-agent", "curl/8")
        .send()
        .await
        .unwrap();
    let cpath = &combined_path;
    wait_until(Duration::from_secs(10), "combined line", || async move {
        std::fs::read_to_string(cpath)
            .unwrap_or_default()
            .lines()
            .count()
            == 1
    })
    .await;
    let line = std::fs::read_to_string(&combined_path).unwrap();
    assert!(line.starts_with("127.0.0.1 - - ["), "{line}");
    assert!(
        line.contains("\"GET /c HTTP/1.1\" 200 1 \"http://ref/\" \"curl/8\""),
        "{line}"
    );
}

/// Secrets stay out of the access log: a WebSocket handshake's query (where tokens
/// travel) is not logged by default, a route can drop every query with
/// `log_query = false`, and Authorization and Cookie values never appear.
#[tokio::test]
async fn access_log_keeps_websocket_query_tokens_and_credentials_out() {
    let origin = Origin::start("a").await;
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("access.log");
    let body = format!(
        r#"
[access_log]
path = "{}"
format = "json"

[[upstreams]]
name = "app"
servers = [{{ address = "{}" }}]

[[routes]]
name = "quiet"
path_prefix = "/quiet"
upstream = "app"
log_query = false

[[routes]]
name = "all"
upstream = "app"
"#,
        log_path.display(),
        origin.addr
    );
    let edge = Edge::start(&body).await;
    let handshake = "GET /ws?token=s3cret-ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    let mut s = tokio::net::TcpStream::connect(edge.addr()).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(handshake.as_bytes()).await.unwrap();
    let mut buf = [0u8; 12];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"HTTP/1.1 101");
    drop(s);
    let client = common::fresh_client();
    for path in ["/plain?page=2", "/quiet/x?key=s3cret-q"] {
        client
            .get(edge.url(path))
            .header("authorization", "Bearer s3cret-auth")
            .header("cookie", "sid=s3cret-cookie")
            .send()
            .await
            .unwrap();
    }
    let p = &log_path;
    wait_until(Duration::from_secs(10), "three lines", || async move {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .lines()
            .count()
            == 3
    })
    .await;
    let text = std::fs::read_to_string(&log_path).unwrap();
    assert!(!text.contains("s3cret"), "{text}");
    let uris: Vec<String> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["uri"].to_string())
        .collect();
    assert!(uris.contains(&"\"/ws\"".to_owned()), "{uris:?}");
    assert!(uris.contains(&"\"/plain?page=2\"".to_owned()), "{uris:?}");
    assert!(uris.contains(&"\"/quiet/x\"".to_owned()), "{uris:?}");
    // the upstream time is filled in for proxied requests
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(v["upstream_time_ms"].as_f64().is_some(), "{line}");
    }
    // and the log's own counters are metrics
    assert_eq!(
        edge.metric("wingman_edge_access_log_lines_total{result=\"written\"}")
            .await,
        Some(3.0)
    );
    assert_eq!(
        edge.metric("wingman_edge_access_log_lines_total{result=\"dropped\"}")
            .await,
        Some(0.0)
    );
}

/// Resident memory of a process, in bytes (Linux).
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kb * 1024
}

#[tokio::test]
async fn rate_limit_keys_cost_the_same_memory_however_long_the_header_value() {
    let origin = Origin::start("a").await;
    let edge = Edge::start(&limited(
        &origin,
        "key = \"header:X-Client\"\nrate = 100.0\nmax_keys = 100000",
    ))
    .await;
    let client = reqwest::Client::new();
    let long = "k".repeat(30_000);
    let send = |i: usize| {
        let req = client
            .get(edge.url("/"))
            .header("x-client", format!("{i:08}{long}"));
        async move { req.send().await.unwrap().status() }
    };
    // warm up the allocator and the connection pools
    for i in 0..200 {
        assert_eq!(send(i).await, 200);
    }
    let before = rss_bytes(edge.pid());
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let n = 2_000;
    for i in 200..200 + n {
        assert_eq!(send(i).await, 200, "request {i}");
        assert!(std::time::Instant::now() < deadline, "too slow at {i}");
    }
    let grew = rss_bytes(edge.pid()).saturating_sub(before);
    // 2,000 keys of 30 KB would be 60 MB if the values themselves were kept
    assert!(
        grew < 16 << 20,
        "resident memory grew by {} KiB for {n} distinct keys",
        grew >> 10
    );
}
