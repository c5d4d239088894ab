//! Request framing the edge refuses, and what an upgrade is: malformed chunked
//! bodies are the client's fault (400 and close, RFC 9112 §7.1), a repeated
//! `chunked` coding is refused (RFC 9112 §6.1), only a WebSocket handshake is an
//! upgrade (any other `Upgrade:` value is an ordinary request under every limit),
//! and the edge's own error answers never name an upstream address.

mod common;

use std::time::{Duration, Instant};

use common::{raw_exchange, Edge, Origin};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn config(origin: &Origin, extra: &str) -> String {
    common::single_pool(origin, extra)
}

/// One pool of `origin`, one route with `[routes.buffering]` set to `buffering`, and
/// `body_read_timeout`.
fn buffered(origin: &Origin, body_read_timeout: &str, buffering: &str) -> String {
    format!(
        r#"
[client]
body_read_timeout = "{body_read_timeout}"

[[upstreams]]
name = "app"
servers = [{{ address = "{}" }}]

[[routes]]
name = "all"
upstream = "app"
[routes.buffering]
{buffering}
"#,
        origin.addr
    )
}

/// Sends `head` and `body` on a fresh connection; returns the answer and how long
/// the edge took to close.
async fn exchange_timed(edge: &Edge, bytes: &[u8], limit: Duration) -> (String, Duration) {
    let t = Instant::now();
    let answer = raw_exchange(edge.addr(), bytes, limit).await;
    (answer, t.elapsed())
}

fn status_of(answer: &str) -> &str {
    answer.get(9..12).unwrap_or("")
}

/// RFC 9112 §7.1: chunk-size is 1*HEXDIG; a size line and chunk data end with CRLF;
/// recipients guard against overflow. Each malformed body gets 400 with
/// `Connection: close` at once, on both the buffered and the streamed request path.
#[tokio::test]
async fn malformed_chunked_bodies_get_400_and_close_at_once() {
    let origin = Origin::start("a").await;
    for buffering in ["request = true", "request = false"] {
        let edge = Edge::start(&buffered(&origin, "20s", buffering)).await;
        let cases: &[(&str, &[u8])] = &[
            ("hex prefix", b"0x5\r\nhello\r\n0\r\n\r\n"),
            ("plus sign", b"+5\r\nhello\r\n0\r\n\r\n"),
            (
                "overflowing size",
                b"fffffffffffffffffff\r\nhello\r\n0\r\n\r\n",
            ),
            ("size line ended by bare LF", b"5\nhello\r\n0\r\n\r\n"),
            ("chunk data ended by bare LF", b"5\r\nhello\n0\r\n\r\n"),
            ("extra bytes after chunk data", b"5\r\nhelloXX\r\n0\r\n\r\n"),
            (
                "chunk extension ended by bare LF",
                b"5;ext=1\nhello\r\n0\r\n\r\n",
            ),
            (
                "bare CR inside a chunk extension",
                b"5;e\rx\r\nhello\r\n0\r\n\r\n",
            ),
            (
                "non-token chunk extension name",
                b"5;e(x)\r\nhello\r\n0\r\n\r\n",
            ),
        ];
        for (what, chunks) in cases {
            let mut req =
                b"POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
            req.extend_from_slice(chunks);
            // the client keeps its side open: the edge must answer and close by itself
            let mut s = tokio::net::TcpStream::connect(edge.addr())
                .await
                .expect("connect");
            s.write_all(&req).await.expect("write");
            let t = Instant::now();
            let mut out = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
            let answer = String::from_utf8_lossy(&out).into_owned();
            assert_eq!(status_of(&answer), "400", "{buffering}, {what}: {answer:?}");
            assert!(
                answer.to_ascii_lowercase().contains("connection: close"),
                "{buffering}, {what}: {answer:?}"
            );
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "{buffering}, {what}: took {:?} (waited for more body?)",
                t.elapsed()
            );
        }
        let m = edge.metrics_text().await;
        assert!(
            !m.lines()
                .any(|l| l.starts_with("wingman_edge_requests_total") && l.contains("5xx")),
            "{buffering}: a malformed body was counted as a 5xx:\n{m}"
        );
    }
    // the origin never received a complete upload from any of them
    assert!(origin.state.uploads.lock().is_empty());
}

/// A well-formed chunked body with extensions still goes through (the strict check
/// does not refuse valid `chunk-ext`, RFC 9112 §7.1.1).
#[tokio::test]
async fn valid_chunked_body_with_extensions_is_forwarded() {
    let origin = Origin::start("a").await;
    let edge = Edge::start(&config(&origin, "")).await;
    let answer = raw_exchange(
        edge.addr(),
        b"POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5;name=\"quoted value\";flag\r\nhello\r\n6 ; x = y\r\n world\r\nA\r\n0123456789\r\n0\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(status_of(&answer), "200", "{answer}");
    assert_eq!(
        origin.state.uploads.lock().last().map(|b| b.as_slice()),
        Some(&b"hello world0123456789"[..])
    );
}

/// RFC 9112 §6.1: a sender MUST NOT apply chunked more than once; the policy is 400
/// (as HAProxy does), in one field or across field lines.
#[tokio::test]
async fn chunked_listed_twice_gets_400() {
    let origin = Origin::start("a").await;
    let edge = Edge::start(&config(&origin, "")).await;
    for te in [
        "Transfer-Encoding: chunked, chunked\r\n",
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
    ] {
        let req = format!("POST /upload HTTP/1.1\r\nHost: a\r\n{te}\r\n5\r\nhello\r\n0\r\n\r\n");
        let answer = raw_exchange(edge.addr(), req.as_bytes(), Duration::from_secs(5)).await;
        assert_eq!(status_of(&answer), "400", "{te:?}: {answer}");
    }
    assert_eq!(origin.requests(), 0);
}

/// Only `Upgrade: websocket` with `Connection: upgrade` on a GET is an upgrade. A
/// POST with another `Upgrade:` value is an ordinary request: it is held to
/// `client_max_body_size` (413) and to `body_read_timeout`.
#[tokio::test]
async fn a_non_websocket_upgrade_header_does_not_lift_upload_limits() {
    let origin = Origin::start("a").await;
    let edge = Edge::start(&buffered(&origin, "1s", "client_max_body_size = \"1KiB\"")).await;

    // too large by Content-Length: 413 at once, the origin never sees it
    for upgrade in ["foo", "websocket"] {
        let req = format!(
            "POST /upload HTTP/1.1\r\nHost: a\r\nUpgrade: {upgrade}\r\nConnection: upgrade\r\nContent-Length: 5000\r\n\r\n"
        );
        let (answer, _) = exchange_timed(&edge, req.as_bytes(), Duration::from_secs(5)).await;
        assert_eq!(status_of(&answer), "413", "Upgrade: {upgrade}: {answer}");
    }
    // too large as a chunked stream
    let mut req = b"POST /upload HTTP/1.1\r\nHost: a\r\nUpgrade: foo\r\nConnection: upgrade\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..3 {
        req.extend_from_slice(b"200\r\n");
        req.extend_from_slice(&[b'x'; 0x200]);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    let (answer, _) = exchange_timed(&edge, &req, Duration::from_secs(5)).await;
    assert_eq!(status_of(&answer), "413", "{answer}");

    // a slow upload: cut at body_read_timeout (1 s), not kept for an hour
    let mut s = tokio::net::TcpStream::connect(edge.addr())
        .await
        .expect("connect");
    s.write_all(
        b"POST /upload HTTP/1.1\r\nHost: a\r\nUpgrade: foo\r\nConnection: upgrade\r\nContent-Length: 100\r\n\r\nabc",
    )
    .await
    .expect("write");
    let t = Instant::now();
    let mut out = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    assert!(r.is_ok(), "a stalled upload with Upgrade: foo was not cut");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(origin.state.uploads.lock().is_empty());

    // the Upgrade header of a non-WebSocket request is not passed on
    let answer = raw_exchange(
        edge.addr(),
        b"GET /plain HTTP/1.1\r\nHost: a\r\nUpgrade: foo\r\nConnection: upgrade\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(status_of(&answer), "200", "{answer}");
    let seen = origin.last_seen().expect("origin saw the GET");
    assert_eq!(seen.path, "/plain");
    assert!(!seen.headers.contains_key("upgrade"), "{:?}", seen.headers);
}

/// The edge's own error answers say what happened, never where: no upstream
/// address, no pingora error context.
#[tokio::test]
async fn error_answers_never_name_an_upstream_address() {
    // a server that accepts and resets: every attempt fails mid-request
    let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead_addr = dead.local_addr().expect("addr");
    drop(dead);
    let origin = Origin::start("a").await;
    let body = format!(
        r#"
[[upstreams]]
name = "app"
servers = [{{ address = "{dead_addr}" }}]

[[upstreams]]
name = "live"
servers = [{{ address = "{live}" }}]

[[routes]]
name = "slow"
path_prefix = "/slow"
upstream = "live"
[routes.timeouts]
read = "200ms"
[routes.buffering]
request = false

[[routes]]
name = "all"
upstream = "app"
"#,
        live = origin.addr
    );
    let edge = Edge::start(&body).await;
    // streamed to the upstream (no request buffering), then broken: the failure
    // happens while proxying, where pingora's error carries the peer's address
    let bad_chunk = b"POST /slow/10 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n".to_vec();
    let requests: Vec<Vec<u8>> = vec![
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".to_vec(),
        b"GET /slow/2000 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".to_vec(),
        bad_chunk,
    ];
    for req in requests {
        let answer = raw_exchange(edge.addr(), &req, Duration::from_secs(10)).await;
        assert!(answer.starts_with("HTTP/1.1 "), "{answer}");
        for leak in [
            dead_addr.to_string(),
            origin.addr.to_string(),
            "Peer".to_owned(),
            "addr:".to_owned(),
            "127.0.0.1".to_owned(),
        ] {
            assert!(!answer.contains(&leak), "answer leaks {leak:?}: {answer}");
        }
    }
}
