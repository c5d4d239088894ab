//! The downstream connection loop: pingora's own, plus a whole-header deadline and a
//! header size limit that pingora lacks.
//!
//! pingora times out each `read()` of a request header separately (60 s), so a client
//! trickling one byte at a time holds a connection forever (slowloris), and it accepts
//! about 1 MiB of header. [`EdgeApp`] reads each HTTP/1 request head itself, under
//! one deadline (`client.header_timeout`, counted from accept for the first request
//! and from the first byte for later ones) and one size cap
//! (`client.max_header_bytes`), then hands the bytes to pingora as the session's
//! pipelined prefix, so pingora parses them without another read. Too slow: 408 (or
//! a silent close if nothing was sent). Too large: 431. HTTP/2 connections (h2c
//! prior knowledge or ALPN) go to pingora unchanged.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::BytesMut;
use pingora::apps::{HttpServerApp, ServerApp};
use pingora::protocols::http::ServerSession;
use pingora::protocols::{Stream, ALPN};
use pingora::proxy::HttpProxy;
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use crate::metrics::Metrics;
use crate::proxy::Edge;
use crate::snapshot::SnapshotHandle;

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// pingora's HTTP proxy behind the edge's own connection loop.
pub struct EdgeApp {
    pub proxy: Arc<HttpProxy<Edge>>,
    pub snapshots: SnapshotHandle,
    pub metrics: Arc<Metrics>,
    /// Open connections per client address (`client.max_conns_per_ip`).
    pub conn_limit: Option<crate::ratelimit::ConnLimiter>,
}

/// Why no request head could be read.
#[derive(Debug, PartialEq, Eq)]
enum HeadError {
    /// The client closed, sent nothing in time, or the server is shutting down.
    Closed,
    /// Part of a head arrived but not all of it before the deadline.
    Timeout,
    /// The head is larger than allowed.
    TooLarge,
}

#[async_trait]
impl ServerApp for EdgeApp {
    async fn process_new(
        self: &Arc<Self>,
        mut stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        // held for the whole connection; released on return
        let _conn_slot = match &self.conn_limit {
            None => None,
            Some(limiter) => {
                let peer = stream
                    .get_socket_digest()
                    .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()));
                match peer.map(|ip| limiter.acquire(ip)) {
                    Some(None) => {
                        self.reject(&mut stream, 429, "Too Many Requests").await;
                        return None;
                    }
                    Some(Some(guard)) => Some(guard),
                    None => None,
                }
            }
        };
        let limits = self.snapshots.load().client;
        let h2c = self.proxy.server_options.as_ref().is_some_and(|o| o.h2c);
        let tls = stream.get_ssl_digest().is_some();
        if matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
            return ServerApp::process_new(&self.proxy, stream, shutdown).await;
        }
        if h2c && !tls {
            let mut buf = [0u8; H2_PREFACE.len()];
            // pingora's peek waits for 24 bytes without a deadline: give it one
            match tokio::time::timeout(limits.header_timeout, stream.try_peek(&mut buf)).await {
                Ok(Ok(true)) if buf == H2_PREFACE => {
                    return ServerApp::process_new(&self.proxy, stream, shutdown).await;
                }
                Ok(Ok(_)) => {}
                Ok(Err(_)) | Err(_) => return None,
            }
        }

        let keepalive_secs = limits.keepalive_timeout.as_secs().max(1);
        let reuse_limit = self
            .proxy
            .server_options
            .as_ref()
            .and_then(|o| o.keepalive_request_limit);
        let mut settings = None;
        let mut first = true;
        loop {
            let limits = self.snapshots.load().client;
            let head = match read_head(
                &mut stream,
                first,
                limits.header_timeout,
                limits.keepalive_timeout,
                limits.max_header_bytes,
                shutdown,
            )
            .await
            {
                Ok(head) => head,
                Err(HeadError::Closed) => return None,
                Err(HeadError::Timeout) => {
                    self.reject(&mut stream, 408, "Request Timeout").await;
                    return None;
                }
                Err(HeadError::TooLarge) => {
                    self.reject(&mut stream, 431, "Request Header Fields Too Large")
                        .await;
                    return None;
                }
            };
            let mut session = ServerSession::new_http1(stream);
            match settings.take() {
                Some(s) => pingora::apps::HttpPersistentSettings::apply_to_session(s, &mut session),
                None => {
                    session.set_keepalive(Some(keepalive_secs));
                    session.set_keepalive_reuses_remaining(reuse_limit);
                }
            }
            if *shutdown.borrow() {
                session.set_keepalive(None);
            }
            session.set_pipelined_prefix(head);
            let reused = self.proxy.serve_http(session, shutdown).await?;
            let (s, persistent) = reused.consume();
            stream = s;
            settings = persistent;
            first = false;
        }
    }

    async fn cleanup(&self) {
        self.proxy.http_cleanup().await;
    }
}

impl EdgeApp {
    async fn reject(&self, stream: &mut Stream, status: u16, reason: &str) {
        self.metrics
            .rejected_requests
            .with_label_values(&[&status.to_string()])
            .inc();
        let id = crate::proxy::headers::new_request_id();
        let body = format!("{status} {reason}\n");
        let resp = format!(
            "HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nx-request-id: {id}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
        let write = async {
            stream.write_all(resp.as_bytes()).await?;
            stream.flush().await?;
            stream.shutdown().await
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), write).await;
    }
}

/// Reads one request head (through its blank line) plus whatever follows in the same
/// reads. `first`: the first request of the connection, whose deadline counts from
/// now; later requests may idle for `idle` before their first byte.
async fn read_head(
    stream: &mut Stream,
    first: bool,
    header_timeout: Duration,
    idle: Duration,
    max_bytes: usize,
    shutdown: &ShutdownWatch,
) -> Result<BytesMut, HeadError> {
    let mut shutdown = shutdown.clone();
    if *shutdown.borrow() && !first {
        return Err(HeadError::Closed);
    }
    let mut buf = BytesMut::with_capacity(4096);
    let mut deadline = Instant::now() + if first { header_timeout } else { idle };
    let mut started = first;
    loop {
        let read = tokio::select! {
            biased;
            r = tokio::time::timeout_at(deadline, stream.read_buf(&mut buf)) => r,
            _ = shutdown.changed(), if buf.is_empty() && !first => return Err(HeadError::Closed),
        };
        match read {
            Err(_) if buf.is_empty() => return Err(HeadError::Closed),
            Err(_) => return Err(HeadError::Timeout),
            Ok(Err(_)) | Ok(Ok(0)) => return Err(HeadError::Closed),
            Ok(Ok(_)) => {}
        }
        if !started {
            started = true;
            deadline = Instant::now() + header_timeout;
        }
        match head_end(&buf) {
            Some(end) if end <= max_bytes => return Ok(buf),
            Some(_) => return Err(HeadError::TooLarge),
            None if buf.len() > max_bytes => return Err(HeadError::TooLarge),
            None => {}
        }
    }
}

/// Where the head ends (just past its blank line), ignoring leading empty lines.
fn head_end(buf: &[u8]) -> Option<usize> {
    let start = buf
        .iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .unwrap_or(buf.len());
    let rest = &buf[start..];
    let mut i = 0;
    while i < rest.len() {
        if rest[i] == b'\n' {
            if rest.get(i + 1) == Some(&b'\n') {
                return Some(start + i + 2);
            }
            if rest.get(i + 1) == Some(&b'\r') && rest.get(i + 2) == Some(&b'\n') {
                return Some(start + i + 3);
            }
        }
        i += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::head_end;

    #[test]
    fn head_end_finds_the_blank_line() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nbody"), Some(27));
        assert_eq!(head_end(b"GET / HTTP/1.1\nHost: a\n\n"), Some(24));
        assert_eq!(head_end(b"\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n"), None);
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: a\r\n"), None);
    }
}
