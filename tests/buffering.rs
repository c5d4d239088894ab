//! Request and response buffering through a real edge: slow clients do not hold the
//! origin, slow uploads reach it only when complete, bodies over the limit get 413.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::{compressible, single_pool, Edge, Origin};
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

/// Four POSTs of 200 kB, round robin over [`refusing_then`]: each arrives whole.
async fn posts_arrive_whole(edge: &Edge, origin: &Origin) {
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

/// A pool of a refusing server, then `origin`, without passive ejection.
fn refusing_then(origin: &Origin) -> String {
    let dead = common::free_port();
    format!(
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
    )
}

#[tokio::test]
async fn a_partly_buffered_body_is_sent_whole_after_a_refused_connect() {
    let origin = Origin::start("a").await;
    // 16 KiB of memory budget and no disk: every upload is buffered only in part
    let edge = Edge::start_with_server_extra(
        "buffer_memory = \"16KiB\"\nbuffer_disk = 0",
        &refusing_then(&origin),
    )
    .await;
    posts_arrive_whole(&edge, &origin).await;
    edge.wait_metric(
        "wingman_edge_buffered_requests_total{storage=\"streamed\"}",
        4.0,
    )
    .await;
    edge.wait_metric(MEMORY_USE, 0.0).await;
}

#[tokio::test]
async fn a_buffered_body_is_sent_again_when_the_first_server_refuses() {
    let origin = Origin::start("a").await;
    let edge = Edge::start(&refusing_then(&origin)).await;
    posts_arrive_whole(&edge, &origin).await;
}

/// Waits until a gauge of the edge reaches at least `at_least`.
async fn wait_gauge_at_least(edge: &Edge, series: &str, at_least: f64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = edge.metric(series).await.unwrap_or(0.0);
        if now >= at_least {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{series} is {now}, not yet {at_least}:\n{}",
            edge.metrics_text().await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const MEMORY_USE: &str = "wingman_edge_buffer_bytes{storage=\"memory\"}";
const DISK_USE: &str = "wingman_edge_buffer_bytes{storage=\"disk\"}";

#[tokio::test]
async fn uploads_past_the_global_buffer_budgets_stream_and_arrive_intact() {
    let origin = Origin::start("a").await;
    let edge = Edge::start_with_server_extra(
        "buffer_memory = \"64KiB\"\nbuffer_disk = \"256KiB\"",
        &format!(
            "{}\n[routes.buffering]\nrequest_memory = \"32KiB\"\n",
            single_pool(&origin, "")
        ),
    )
    .await;
    // four uploads at once with a Content-Length, one chunked: each is larger than
    // both budgets together, so each is read into the budgets and then streamed
    let bodies: Vec<Vec<u8>> = (0..5)
        .map(|i| {
            let mut b = compressible(1 << 20);
            b[0] = b'0' + i as u8;
            b
        })
        .collect();
    let mut uploads = Vec::new();
    for (i, body) in bodies.iter().enumerate() {
        let req = common::fresh_client().put(edge.url("/upload"));
        let req = if i == 4 {
            let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
                body.chunks(8192).map(|c| Ok(c.to_vec())).collect();
            req.body(reqwest::Body::wrap_stream(futures_util::stream::iter(
                chunks,
            )))
        } else {
            req.body(body.clone())
        };
        uploads.push(tokio::spawn(req.send()));
    }
    for (i, u) in uploads.into_iter().enumerate() {
        let resp = tokio::time::timeout(Duration::from_secs(30), u)
            .await
            .expect("upload within 30 s")
            .unwrap()
            .unwrap();
        assert_eq!(resp.status(), 200, "upload {i}");
        assert_eq!(resp.text().await.unwrap(), (1 << 20).to_string());
    }
    let mut got = origin.state.uploads.lock().clone();
    got.sort();
    assert_eq!(got, bodies, "every upload arrived intact");
    edge.wait_metric(
        "wingman_edge_buffer_budget_refusals_total{kind=\"request\",storage=\"disk\"}",
        5.0,
    )
    .await;
    edge.wait_metric(MEMORY_USE, 0.0).await;
    edge.wait_metric(DISK_USE, 0.0).await;
    assert_eq!(
        edge.metric("wingman_edge_buffer_limit_bytes{storage=\"disk\"}")
            .await,
        Some(262144.0)
    );
}

/// Sends a GET on a connection with a tiny receive window and reads nothing yet.
async fn held_get(edge: &Edge, path: &str) -> tokio::net::TcpStream {
    let mut s = slow_reader(edge).await;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    s
}

async fn read_all(mut s: tokio::net::TcpStream) -> Vec<u8> {
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut answer))
        .await
        .expect("the whole answer within 30 s")
        .unwrap();
    answer
}

#[tokio::test]
async fn responses_past_the_disk_budget_stream_and_a_spilled_one_is_served_from_its_file() {
    let origin = Origin::start("a").await;
    let edge = Edge::start_with_server_extra(
        "buffer_memory = \"1MiB\"\nbuffer_disk = \"12MiB\"",
        &format!(
            "{}\n[routes.buffering]\nresponse_memory = \"32KiB\"\n",
            single_pool(&origin, "")
        ),
    )
    .await;
    // larger than what the kernel's socket buffers absorb
    let n = BODY;
    let path = format!("/bytes/{n}");
    // A is read in full from the origin while its client reads nothing: 32 KiB in
    // memory, the rest in a temporary file (claimed until all of it is sent)
    let a = held_get(&edge, &path).await;
    wait_gauge_at_least(&edge, DISK_USE, (n - (32 << 10)) as f64).await;
    // B finds the disk budget mostly spent: what does not fit streams
    let b = held_get(&edge, &path).await;
    wait_gauge_at_least(&edge, DISK_USE, ((12 << 20) - (256 << 10)) as f64).await;
    let disk = edge.metric(DISK_USE).await.unwrap();
    assert!(disk <= (12 << 20) as f64, "disk use {disk} past the budget");
    let (a, b) = tokio::join!(read_all(a), read_all(b));
    let want = compressible(n);
    assert_eq!(body_of(&a), want.as_slice(), "the spilled response");
    assert_eq!(body_of(&b), want.as_slice(), "the streamed response");
    edge.wait_metric(
        "wingman_edge_buffered_responses_total{outcome=\"file\"}",
        1.0,
    )
    .await;
    edge.wait_metric(
        "wingman_edge_buffered_responses_total{outcome=\"streamed\"}",
        1.0,
    )
    .await;
    edge.wait_metric(
        "wingman_edge_buffer_budget_refusals_total{kind=\"response\",storage=\"disk\"}",
        1.0,
    )
    .await;
    edge.wait_metric(MEMORY_USE, 0.0).await;
    edge.wait_metric(DISK_USE, 0.0).await;
}
