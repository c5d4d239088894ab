//! What the edge refuses and when it gives up on a client: the checks pingora's
//! lenient parser lacks (Host, Content-Length, header size, whole-header deadline).

mod common;

use std::time::{Duration, Instant};

use common::{raw_exchange, Edge, Origin};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn config(origin: &Origin, client: &str) -> String {
    common::single_pool(origin, &format!("[client]\n{client}"))
}

#[tokio::test]
async fn http11_request_without_host_gets_400_and_never_reaches_the_origin() {
    let origin = Origin::start("a").await;
    let edge = Edge::start(&config(&origin, "")).await;
    let answer = raw_exchange(
        edge.addr(),
        b"GET / HTTP/1.1\r\nUser-Agent: t\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("x-request-id:"),
        "{answer}"
    );
    assert_eq!(origin.requests(), 0);
}

#[tokio::test]
async fn http10_request_without_host_is_served() {
    let origin = Origin::start("a").await;
    let edge = Edge::start(&config(&origin, "")).await;
    let answer = raw_exchange(
        edge.addr(),
        b"GET /old HTTP/1.0\r\nUser-Agent: t\r\nX: y\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(
        answer.starts_with("HTTP/1.1 200") || answer.starts_with("HTTP/1.0 200"),
        "{answer}"
    );
}

#[tokio::test]
async fn duplicate_or_list_valued_content_length_gets_400() {
    let origin = Origin::start("a").await;
    let edge = Edge::start(&config(&origin, "")).await;
    for head in [
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nContent-Length: 4\r\n\r\nabcd",
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4, 4\r\n\r\nabcd",
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
    ] {
        let answer = raw_exchange(edge.addr(), head.as_bytes(), Duration::from_secs(5)).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{head:?} -> {answer}");
    }
    assert_eq!(origin.requests(), 0);
}

#[tokio::test]
async fn header_above_the_limit_gets_431_and_never_reaches_the_origin() {
    let origin = Origin::start("a").await;
    let edge = Edge::start(&config(&origin, "max_header_bytes = 4096")).await;
    let big = format!(
        "GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
        "b".repeat(5000)
    );
    let answer = raw_exchange(edge.addr(), big.as_bytes(), Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    // just under the limit passes
    let fits = format!(
        "GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\nX-Big: {}\r\n\r\n",
        "b".repeat(3900)
    );
    let answer = raw_exchange(edge.addr(), fits.as_bytes(), Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(origin.requests(), 1);
    edge.wait_metric("wingman_edge_rejected_requests_total{status=\"431\"}", 1.0)
        .await;
}

#[tokio::test]
async fn default_header_limit_is_32_kib() {
    let origin = Origin::start("a").await;
    let edge = Edge::start(&config(&origin, "")).await;
    let big = format!(
        "GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
        "b".repeat(33 * 1024)
    );
    let answer = raw_exchange(edge.addr(), big.as_bytes(), Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    assert_eq!(origin.requests(), 0);
}

#[tokio::test]
async fn a_header_trickled_byte_by_byte_gets_408_at_the_header_deadline() {
    let origin = Origin::start("a").await;
    let edge = Edge::start(&config(&origin, "header_timeout = \"1s\"")).await;
    let mut s = tokio::net::TcpStream::connect(edge.addr()).await.unwrap();
    let started = Instant::now();
    let head = b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: ";
    s.write_all(head).await.unwrap();
    // keep trickling (each byte well within pingora's per-read timeout) until the
    // edge answers; bounded at 10 s
    let mut answer = Vec::new();
    let mut buf = [0u8; 512];
    while started.elapsed() < Duration::from_secs(10) {
        match tokio::time::timeout(Duration::from_millis(100), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => answer.extend_from_slice(&buf[..n]),
            Err(_) => {
                if s.write_all(b"x").await.is_err() {
                    break;
                }
            }
        }
    }
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "408 after {took:?}"
    );
    assert_eq!(origin.requests(), 0);
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed_at_the_header_deadline() {
    let origin = Origin::start("a").await;
    let edge = Edge::start(&config(&origin, "header_timeout = \"1s\"")).await;
    let mut s = tokio::net::TcpStream::connect(edge.addr()).await.unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "connection still open after 10 s");
    assert!(
        buf.is_empty(),
        "unexpected answer {:?}",
        String::from_utf8_lossy(&buf)
    );
    assert!(started.elapsed() >= Duration::from_millis(900));
}

#[tokio::test]
async fn keepalive_connection_serves_several_requests_then_idles_out() {
    let origin = Origin::start("a").await;
    let edge = Edge::start(&config(&origin, "keepalive_timeout = \"1s\"")).await;
    let mut s = tokio::net::TcpStream::connect(edge.addr()).await.unwrap();
    for i in 0..3 {
        s.write_all(format!("GET /{i} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !String::from_utf8_lossy(&got).ends_with("\r\n\r\na") {
            let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
                .await
                .expect("answer in time")
                .unwrap();
            assert!(n > 0, "closed early: {:?}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
        assert!(got.starts_with(b"HTTP/1.1 200"));
    }
    assert_eq!(origin.requests(), 3);
    // idle past keepalive_timeout: the edge closes
    let mut rest = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest)).await;
    assert!(r.is_ok(), "idle keep-alive connection was not closed");
}

#[tokio::test]
async fn a_body_larger_than_its_content_length_does_not_smuggle_a_second_request() {
    let origin = Origin::start("a").await;
    let edge = Edge::start(&config(&origin, "")).await;
    let answer = raw_exchange(
        edge.addr(),
        b"POST /first HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhelloGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let seen: Vec<String> = origin
        .state
        .seen
        .lock()
        .iter()
        .map(|s| s.path.clone())
        .collect();
    assert_eq!(seen, vec!["/first".to_owned()]);
}
