//! Request and response buffering through a real edge: slow clients do not hold the
//! origin, slow uploads reach it only when complete, bodies over the limit get 413.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::{compressible, servers, single_pool, Edge, Origin};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BODY: usize = 8 << 20;

/// Opens a connection with a tiny receive window, so the client really reads slowly.
async fn slow_reader(edge: &Edge) -> tokio::net::TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(edge.addr()).await.unwrap()
}

/// Requests `path`, reads it at about 10 KB/s for up to `slow_for`, noting whether
/// the origin finished writing meanwhile; then reads the rest at full speed. Returns
/// (origin finished while the client was slow, bytes read while slow, whole answer).
async fn read_slowly(
    edge: &Edge,
    origin: &Origin,
    path: &str,
    slow_for: Duration,
) -> (bool, usize, Vec<u8>) {
    let mut s = slow_reader(edge).await;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    let started = Instant::now();
    let mut finished_while_slow = false;
    while started.elapsed() < slow_for {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("read within 5 s")
            .unwrap();
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buf[..n]);
        if origin.state.finished_writing.load(Ordering::SeqCst) {
            finished_while_slow = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let read_slowly = answer.len();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut answer))
        .await
        .expect("rest of the body within 30 s")
        .unwrap();
    (finished_while_slow, read_slowly, answer)
}

fn body_of(answer: &[u8]) -> &[u8] {
    let end = answer.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    &answer[end..]
}

#[tokio::test]
async fn a_slow_client_does_not_keep_the_origin_busy() {
    let origin = Origin::start("a").await;
    let edge = Edge::start(&single_pool(&origin, "")).await;
    let (finished, read, answer) = read_slowly(
        &edge,
        &origin,
        &format!("/bytes/{BODY}"),
        Duration::from_secs(5),
    )
    .await;
    assert!(
        finished,
        "the origin was still writing after the client had read {read} bytes slowly"
    );
    assert!(
        read < BODY / 8,
        "the client read {read} bytes before the origin finished"
    );
    assert_eq!(body_of(&answer), compressible(BODY).as_slice());
    // 8 MiB is above the 256 KiB memory limit: it went through a temporary file
    edge.wait_metric(
        "wingman_edge_buffered_responses_total{outcome=\"file\"}",
        1.0,
    )
    .await;
}

#[tokio::test]
async fn x_accel_buffering_no_streams_the_response_and_is_not_forwarded() {
    let origin = Origin::start("a").await;
    let edge = Edge::start(&single_pool(&origin, "")).await;
    let resp = reqwest::get(edge.url("/fixed?xab=no")).await.unwrap();
    assert!(resp.headers().get("x-accel-buffering").is_none());
    assert_eq!(resp.bytes().await.unwrap().len(), 4096);
    edge.wait_metric(
        "wingman_edge_requests_total{class=\"2xx\",route=\"all\"}",
        1.0,
    )
    .await;
    assert_eq!(
        edge.metric("wingman_edge_buffered_responses_total{outcome=\"memory\"}")
            .await,
        None
    );
}

#[tokio::test]
async fn a_response_past_the_buffer_limits_streams_intact() {
    let origin = Origin::start("a").await;
    let edge = Edge::start(&format!(
        "{}\n[routes.buffering]\nresponse_memory = \"64KiB\"\nresponse_max_temp_file = 0\n",
        single_pool(&origin, "")
    ))
    .await;
    let body = reqwest::get(edge.url("/bytes/1000000"))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(body.as_ref(), compressible(1_000_000).as_slice());
    edge.wait_metric(
        "wingman_edge_buffered_responses_total{outcome=\"streamed\"}",
        1.0,
    )
    .await;
}

fn limited(origin: &Origin) -> String {
    format!(
        "{}\n[routes.buffering]\nclient_max_body_size = \"1KiB\"\n",
        single_pool(origin, "")
    )
}

#[tokio::test]
async fn a_body_over_the_limit_gets_413_and_never_reaches_the_origin() {
    let origin = Origin::start("a").await;
    let edge = Edge::start(&limited(&origin)).await;
    let c = common::fresh_client();
    let resp = c
        .post(edge.url("/upload"))
        .body(vec![b'x'; 2048])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    // chunked, no Content-Length: cut off while reading
    let chunked = common::raw_exchange(
        edge.addr(),
        format!(
            "POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n800\r\n{}\r\n0\r\n\r\n",
            "y".repeat(0x800)
        )
        .as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    assert!(chunked.starts_with("HTTP/1.1 413"), "{chunked}");
    let ok = c
        .post(edge.url("/upload"))
        .body(vec![b'z'; 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(
        origin.requests(),
        1,
        "only the body within the limit arrived"
    );
    edge.wait_metric("wingman_edge_request_body_too_large_total", 2.0)
        .await;
}

#[tokio::test]
async fn a_slow_upload_reaches_the_origin_only_when_complete() {
    let origin = Origin::start("a").await;
    let edge = Edge::start(&single_pool(&origin, "")).await;
    let mut s = tokio::net::TcpStream::connect(edge.addr()).await.unwrap();
    let body = compressible(50_000);
    s.write_all(
        format!(
            "POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let pieces: Vec<&[u8]> = body.chunks(10_000).collect();
    for piece in &pieces[..pieces.len() - 1] {
        s.write_all(piece).await.unwrap();
        s.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(origin.requests(), 0, "the origin saw an incomplete upload");
    }
    s.write_all(pieces[pieces.len() - 1]).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(origin.state.uploads.lock().as_slice(), [body]);
}

#[tokio::test]
async fn without_request_buffering_the_upload_streams_to_the_origin() {
    let origin = Origin::start("a").await;
    let edge = Edge::start(&format!(
        "{}\n[routes.buffering]\nrequest = false\n",
        single_pool(&origin, "")
    ))
    .await;
    let mut s = tokio::net::TcpStream::connect(edge.addr()).await.unwrap();
    s.write_all(b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 20000\r\n\r\n")
        .await
        .unwrap();
    s.write_all(&[b'x'; 10_000]).await.unwrap();
    // the origin's handler starts (and records the request) only once the body is
    // read, so watch its connection instead: it is contacted before the body ends
    let probe = origin.addr;
    common::wait_until(Duration::from_secs(10), "origin contacted", || async {
        origin.connections() > 0 || tcp_established_to(probe)
    })
    .await;
    s.write_all(&[b'x'; 10_000]).await.unwrap();
    let mut answer = vec![0u8; 12];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&answer, b"HTTP/1.1 200");
}

/// Whether /proc shows an established TCP connection to `addr` (the edge's
/// upstream connection, before the origin's handler has run).
fn tcp_established_to(addr: std::net::SocketAddr) -> bool {
    let port = format!("{:04X}", addr.port());
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .any(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            cols.len() > 3 && cols[2].ends_with(&format!(":{port}")) && cols[3] == "01"
        })
}

#[tokio::test]
async fn a_large_upload_spools_to_a_file_and_arrives_intact() {
    let origin = Origin::start("a").await;
    let edge = Edge::start(&format!(
        "{}\n[routes.buffering]\nrequest_memory = \"64KiB\"\n",
        single_pool(&origin, "")
    ))
    .await;
    let body = compressible(3 << 20);
    let resp = common::fresh_client()
        .put(edge.url("/upload"))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(origin.state.uploads.lock().as_slice(), [body]);
    edge.wait_metric(
        "wingman_edge_buffered_requests_total{storage=\"file\"}",
        1.0,
    )
    .await;
}

#[tokio::test]
async fn expect_100_continue_is_answered_by_the_edge() {
    let origin = Origin::start("a").await;
    let edge = Edge::start(&single_pool(&origin, "")).await;
    let mut s = tokio::net::TcpStream::connect(edge.addr()).await.unwrap();
    s.write_all(
        b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut interim = [0u8; 25];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut interim))
        .await
        .expect("100 Continue before the body")
        .unwrap();
    assert!(
        interim.starts_with(b"HTTP/1.1 100"),
        "{:?}",
        String::from_utf8_lossy(&interim)
    );
    s.write_all(b"hello").await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&rest).contains("200 OK"));
    assert_eq!(origin.state.uploads.lock().as_slice(), [b"hello".to_vec()]);
    let seen = origin.last_seen().unwrap();
    assert!(!seen.headers.contains_key("expect"));
}

#[tokio::test]
async fn a_buffered_body_is_sent_again_when_the_first_server_refuses() {
    let origin = Origin::start("a").await;
    let dead = common::free_port();
    let body = format!(
        r#"
[[upstreams]]
name = "app"
servers = [{{ address = "127.0.0.1:{dead}" }}, {{ address = "{}" }}]
[upstreams.passive]
consecutive_failures = 0
[[routes]]
name = "all"
upstream = "app"
"#,
        origin.addr
    );
    let _ = servers;
    let edge = Edge::start(&body).await;
    let payload = compressible(200_000);
    let c = common::fresh_client();
    for _ in 0..4 {
        let resp = c
            .post(edge.url("/upload"))
            .body(payload.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.text().await.unwrap(), "200000");
    }
    assert!(origin.state.uploads.lock().iter().all(|b| *b == payload));
}
