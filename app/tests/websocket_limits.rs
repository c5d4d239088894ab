//! WebSocket heartbeats and the idle timeout, seen from a raw TCP client that never
//! answers pings (a real client library would answer them by itself).

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wingman_app::Options;

/// Reads one server frame (unmasked): (opcode, payload).
async fn read_frame(s: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut h = [0u8; 2];
    s.read_exact(&mut h).await.expect("frame header");
    let opcode = h[0] & 0x0f;
    let mut len = u64::from(h[1] & 0x7f);
    if len == 126 {
        let mut b = [0u8; 2];
        s.read_exact(&mut b).await.expect("len16");
        len = u64::from(u16::from_be_bytes(b));
    } else if len == 127 {
        let mut b = [0u8; 8];
        s.read_exact(&mut b).await.expect("len64");
        len = u64::from_be_bytes(b);
    }
    let mut payload = vec![0u8; len as usize];
    s.read_exact(&mut payload).await.expect("payload");
    (opcode, payload)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_clients_get_pings_then_an_idle_close() {
    let db = TestDb::new(Backend::Sqlite).await;
    let mut settings = test_settings(&db.url);
    settings.ws.heartbeat_interval = Duration::from_millis(100);
    settings.ws.idle_timeout = Duration::from_millis(350);
    let app = TestApp::start(settings, Options::default()).await;
    let (token, _) = app.register("silent").await;

    let mut s = TcpStream::connect(app.base.trim_start_matches("http://"))
        .await
        .expect("connect");
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.expect("handshake");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.expect("response head");
        head.push(b[0]);
    }
    assert!(
        String::from_utf8_lossy(&head).starts_with("HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );

    let mut pings = 0;
    let close = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match read_frame(&mut s).await {
                (0x9, _) => pings += 1,
                (0x8, payload) => return payload,
                _ => {} // the `ready` text frame
            }
        }
    })
    .await
    .expect("closed within 10s");
    assert!(pings >= 2, "expected heartbeats before the close, got {pings}");
    let code = u16::from_be_bytes([close[0], close[1]]);
    assert_eq!(code, 1000);
    assert_eq!(&close[2..], b"idle timeout");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_dropped_not_buffered() {
    let db = TestDb::new(Backend::Sqlite).await;
    let mut settings = test_settings(&db.url);
    settings.ws.outbox_capacity = 8;
    let app = TestApp::start(settings, Options::default()).await;
    let (token, _) = app.register("sloth").await;
    let conv = app.new_conversation(&token, "firehose").await;

    // a client with a tiny receive buffer that reads nothing after the handshake
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.set_recv_buffer_size(4096).expect("rcvbuf");
    let mut s = sock
        .connect(app.base.trim_start_matches("http://").parse().expect("addr"))
        .await
        .expect("connect");
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.expect("handshake");

    // ~16 KiB events until the server gives up on the socket (bounded: 1000 posts)
    let big = "z".repeat(15 * 1024);
    let mut evicted = false;
    for _ in 0..1000 {
        app.post_message(&token, conv, &big).await;
        if app
            .metrics()
            .await
            .lines()
            .any(|l| l.starts_with("ws_send_dropped_total") && !l.ends_with(" 0"))
        {
            evicted = true;
            break;
        }
    }
    assert!(evicted, "the slow socket was never dropped");
    // what the socket got ends with a 1013 close frame
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.expect("response head");
        head.push(b[0]);
    }
    let close = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let (0x8, payload) = read_frame(&mut s).await {
                return payload;
            }
        }
    })
    .await
    .expect("a close frame after the buffered events");
    assert_eq!(u16::from_be_bytes([close[0], close[1]]), 1013);
    app.stop().await;
}
