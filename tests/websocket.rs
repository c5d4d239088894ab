//! WebSocket pass-through: byte-exact echo of text and binary messages across frame
//! length boundaries, idle timeouts, the active-sockets gauge, and hash stickiness.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::{servers, wait_until, Edge, Origin};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A pool `app` of `origins`, `pool_extra` lines in the pool, and one route `all`
/// to it with `route_extra` lines.
fn config(origins: &[&Origin], pool_extra: &str, route_extra: &str) -> String {
    format!(
        r#"
[[upstreams]]
name = "app"
servers = {}
{pool_extra}

[[routes]]
name = "all"
upstream = "app"
{route_extra}
"#,
        servers(origins)
    )
}

/// Opens `/ws` through the edge (the handshake only), with an optional `Cookie`.
async fn handshake(edge: &Edge, cookie: Option<&str>) -> Ws {
    let mut req = format!("ws://127.0.0.1:{}/ws", edge.port)
        .into_client_request()
        .unwrap();
    if let Some(c) = cookie {
        req.headers_mut().insert("cookie", c.parse().unwrap());
    }
    let (ws, resp) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async(req),
    )
    .await
    .expect("WebSocket handshake timed out")
    .expect("WebSocket handshake");
    assert_eq!(resp.status(), 101);
    ws
}

/// Opens `/ws` through the edge and checks the tunnel with one echo. No retry: a
/// tunnel that ends right after its 101 (cloudflare/pingora#946, patched in
/// vendor/pingora-proxy) fails the test.
async fn connect(edge: &Edge, cookie: Option<&str>) -> Ws {
    let mut ws = handshake(edge, cookie).await;
    ws.send(Message::text("probe")).await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("no answer to the probe within 10s");
    match first {
        Some(Ok(Message::Text(t))) if t.as_str() == "probe" => ws,
        other => panic!("the tunnel did not echo the probe: {other:?}"),
    }
}

/// The next data message (pings and pongs skipped), within 10 s.
async fn next_data(ws: &mut Ws) -> Message {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let msg = tokio::time::timeout(left, ws.next())
            .await
            .expect("no message within 10s")
            .expect("stream ended")
            .expect("WebSocket error");
        match msg {
            Message::Ping(_) | Message::Pong(_) => continue,
            other => return other,
        }
    }
}

async fn echo_text(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text.to_owned())).await.unwrap();
    match next_data(ws).await {
        Message::Text(t) => assert!(
            t.as_str() == text,
            "text echo of {} bytes differs ({} bytes back)",
            text.len(),
            t.len()
        ),
        other => panic!("expected text, got {other:?}"),
    }
}

async fn echo_binary(ws: &mut Ws, bytes: &[u8]) {
    ws.send(Message::binary(bytes.to_vec())).await.unwrap();
    match next_data(ws).await {
        Message::Binary(b) => assert!(
            b.as_ref() == bytes,
            "binary echo of {} bytes differs ({} bytes back)",
            bytes.len(),
            b.len()
        ),
        other => panic!("expected binary, got {:?}", other.len()),
    }
}

/// Closes from the client side and waits for the end of the stream.
async fn close(mut ws: Ws) {
    ws.close(None).await.unwrap();
    let drained = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
    assert!(drained.is_ok(), "the close handshake did not finish");
}

#[tokio::test]
async fn text_and_binary_messages_echo_byte_exact_across_frame_sizes() {
    let origin = Origin::start("a").await;
    let edge = Edge::start(&config(&[&origin], "", "")).await;
    let mut ws = connect(&edge, None).await;
    // 7-bit, 16-bit and 64-bit payload lengths and their edges
    let sizes = [0usize, 1, 125, 126, 127, 65535, 65536, 65537, 1 << 20];
    for &n in &sizes {
        let bytes: Vec<u8> = (0..n).map(|i| (i * 31 % 251) as u8).collect();
        echo_binary(&mut ws, &bytes).await;
        let text: String = (0..n).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
        echo_text(&mut ws, &text).await;
    }
    // multi-byte UTF-8 survives as well
    echo_text(&mut ws, &"héllo wörld ✓ 🚀 ".repeat(1000)).await;
    close(ws).await;
}

#[tokio::test]
async fn an_idle_websocket_outlives_the_route_read_timeout() {
    let origin = Origin::start("a").await;
    let route = "websocket_idle_timeout = \"30s\"\n[routes.timeouts]\nread = \"300ms\"";
    let edge = Edge::start(&config(&[&origin], "", route)).await;
    // the 300 ms read timeout is in force for plain requests on this route
    let resp = common::fresh_client()
        .get(edge.url("/slow/1500"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 504);

    let mut ws = connect(&edge, None).await;
    echo_text(&mut ws, "before").await;
    // idle for more than three read timeouts: the idleness is what is tested
    tokio::time::sleep(Duration::from_millis(1000)).await;
    echo_text(&mut ws, "after a second of silence").await;
    echo_binary(&mut ws, &[1, 2, 3]).await;
    close(ws).await;
}

#[tokio::test]
async fn an_idle_websocket_is_closed_after_the_idle_timeout() {
    let origin = Origin::start("a").await;
    let edge = Edge::start(&config(&[&origin], "", "websocket_idle_timeout = \"1s\"")).await;
    let mut ws = connect(&edge, None).await;
    echo_text(&mut ws, "hello").await;
    let idle_since = Instant::now();
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match ws.next().await {
                None => return "end of stream".to_owned(),
                Some(Err(e)) => return format!("error: {e}"),
                Some(Ok(Message::Close(c))) => return format!("close frame {c:?}"),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(other)) => panic!("unexpected message {other:?}"),
            }
        }
    })
    .await;
    let waited = idle_since.elapsed();
    assert!(
        end.is_ok(),
        "the idle socket was still open after {waited:?} (idle timeout 1s)"
    );
    assert!(
        waited >= Duration::from_millis(800),
        "closed after {waited:?}, before the 1s idle timeout ({end:?})"
    );
}

#[tokio::test]
async fn the_active_websockets_gauge_follows_open_sockets() {
    let origin = Origin::start("a").await;
    let edge = Edge::start(&config(&[&origin], "", "")).await;
    let gauge = "wingman_edge_websockets_active";
    edge.wait_metric(gauge, 0.0).await;

    let mut first = connect(&edge, None).await;
    echo_text(&mut first, "one").await;
    edge.wait_metric(gauge, 1.0).await;
    let mut second = connect(&edge, None).await;
    echo_text(&mut second, "two").await;
    edge.wait_metric(gauge, 2.0).await;

    // a clean close handshake
    close(first).await;
    edge.wait_metric(gauge, 1.0).await;
    // the client vanishing without a close frame counts down too
    drop(second);
    edge.wait_metric(gauge, 0.0).await;
    // and plain requests never count
    let resp = reqwest::get(edge.url("/plain")).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(edge.metric(gauge).await, Some(0.0));
}

/// The address of the one server with a request in flight (a WebSocket holds its
/// server for as long as it is open); waits up to 10 s for exactly one.
async fn busy_server(edge: &Edge) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = edge.status().await;
        let servers = status["pools"][0]["servers"].as_array().unwrap().clone();
        let total: u64 = servers
            .iter()
            .map(|s| s["in_flight"].as_u64().unwrap())
            .sum();
        if total == 1 {
            let busy = servers.iter().find(|s| s["in_flight"] == 1).unwrap();
            return busy["address"].as_str().unwrap().to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "not exactly one server in flight: {status}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn hash_on_a_cookie_keeps_websockets_of_a_session_on_one_origin() {
    let a = Origin::start("a").await;
    let b = Origin::start("b").await;
    let pool = "algorithm = \"hash\"\nhash_on = \"cookie:sid\"";
    let edge = Edge::start(&config(&[&a, &b], pool, "")).await;
    let name_of = |addr: &str| {
        if addr == a.addr.to_string() {
            "a"
        } else {
            assert_eq!(addr, b.addr.to_string());
            "b"
        }
    };
    let cookie = |i: usize| format!("theme=dark; sid=session-{i}");
    // WebSockets first: plain requests before them would leave pooled upstream
    // connections, and an upgrade on one of those trips a pingora race (see
    // `a_websocket_upgrade_on_a_reused_upstream_connection_stays_open`)
    let mut ws_origin = Vec::new();
    for i in 0..12 {
        let mut seen = HashSet::new();
        for round in 0..3 {
            let mut ws = connect(&edge, Some(&cookie(i))).await;
            echo_text(&mut ws, &format!("{i}/{round}")).await;
            seen.insert(name_of(&busy_server(&edge).await));
            close(ws).await;
            wait_until(Duration::from_secs(10), "socket released", || async {
                edge.status().await["pools"][0]["in_flight"] == 0
            })
            .await;
        }
        assert_eq!(seen.len(), 1, "session-{i}: WebSockets on {seen:?}");
        ws_origin.push(seen.into_iter().next().unwrap());
    }
    let used: HashSet<&str> = ws_origin.iter().copied().collect();
    assert_eq!(used.len(), 2, "every session hashed to one origin");
    // plain HTTP with the same cookie goes to the same origin
    let client = reqwest::Client::new();
    for (i, expected) in ws_origin.iter().enumerate() {
        let resp = client
            .get(edge.url("/who"))
            .header("cookie", cookie(i))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.headers()["x-origin"], *expected, "session-{i}");
    }
}

#[tokio::test]
async fn a_websocket_upgrade_on_a_reused_upstream_connection_stays_open() {
    let origin = Origin::start("a").await;
    let edge = Edge::start(&config(&[&origin], "", "")).await;
    let client = reqwest::Client::new();
    for i in 0..50 {
        // leaves an idle upstream connection in the edge's pool for the upgrade
        let resp = client.get(edge.url("/warm")).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        resp.bytes().await.unwrap();
        let mut ws = handshake(&edge, None).await;
        ws.send(Message::text(format!("m{i}"))).await.unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(10), ws.next()).await;
        assert!(
            matches!(&answer, Ok(Some(Ok(Message::Text(t)))) if t.as_str() == format!("m{i}")),
            "upgrade {i}: the tunnel ended after the 101: {answer:?}"
        );
        close(ws).await;
    }
}
