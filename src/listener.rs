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
//! a silent close if nothing was sent). Too large: 431.
//!
//! The per-address connection slot (`client.max_conns_per_ip`) is taken at accept.
//! TLS listeners reach pingora as plain TCP ones: the TLS handshake is done here,
//! under the same deadline as the first request head, and so is the HTTP/2
//! connection preface (the magic and the client's first SETTINGS frame, read here
//! and handed to pingora's HTTP/2 server ahead of the rest), for h2 over ALPN and
//! h2c with prior knowledge alike.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Buf, Bytes, BytesMut};
use pingora::apps::{HttpServerApp, ServerApp};
use pingora::listeners::tls::Acceptor;
use pingora::protocols::http::ServerSession;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType, ALPN,
};
use pingora::proxy::HttpProxy;
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
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
    /// TLS listeners of this service (bound as plain TCP) and their acceptors.
    pub tls: Vec<(SocketAddr, Arc<Acceptor>)>,
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
        let limits = self.snapshots.load().client;
        // the TLS handshake, an HTTP/2 preface and the first request head are due
        // within header_timeout of the accept
        let deadline = Instant::now() + limits.header_timeout;
        let acceptor = self.acceptor(&stream);
        // held for the whole connection; released on return
        let _conn_slot = match &self.conn_limit {
            None => None,
            Some(limiter) => {
                let peer = stream
                    .get_socket_digest()
                    .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()));
                match peer.map(|ip| limiter.acquire(ip)) {
                    // no HTTP answer before a TLS handshake: just close
                    Some(None) if acceptor.is_some() => {
                        self.count_rejected(429);
                        return None;
                    }
                    Some(None) => {
                        self.reject(&mut stream, 429, "Too Many Requests").await;
                        return None;
                    }
                    Some(Some(guard)) => Some(guard),
                    None => None,
                }
            }
        };
        if let Some(acceptor) = acceptor {
            // a TLS listener's connection reaches here as pingora's plain TCP stream
            let tcp = stream
                .into_any()
                .downcast::<pingora::protocols::l4::stream::Stream>()
                .ok()?;
            match tokio::time::timeout_at(deadline, acceptor.tls_handshake(*tcp)).await {
                Ok(Ok(tls)) => stream = Box::new(tls),
                Ok(Err(e)) => {
                    log::debug!("TLS handshake failed: {e}");
                    return None;
                }
                Err(_) => return None,
            }
        }
        let h2c = self.proxy.server_options.as_ref().is_some_and(|o| o.h2c);
        let tls = stream.get_ssl_digest().is_some();
        if matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
            return self.serve_h2(stream, deadline, shutdown).await;
        }
        if h2c && !tls {
            let mut buf = [0u8; H2_PREFACE.len()];
            // pingora's peek waits for 24 bytes without a deadline: give it one
            match tokio::time::timeout_at(deadline, stream.try_peek(&mut buf)).await {
                Ok(Ok(true)) if buf == H2_PREFACE => {
                    return self.serve_h2(stream, deadline, shutdown).await;
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
                first.then_some(deadline),
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
    /// The acceptor of the TLS listener this connection came in on.
    fn acceptor(&self, stream: &Stream) -> Option<Arc<Acceptor>> {
        if self.tls.is_empty() {
            return None;
        }
        let local = stream
            .get_socket_digest()
            .and_then(|d| d.local_addr().and_then(|a| a.as_inet()).copied())?;
        self.tls
            .iter()
            .find(|(l, _)| {
                l.port() == local.port() && (l.ip() == local.ip() || l.ip().is_unspecified())
            })
            .map(|(_, a)| a.clone())
    }

    /// Reads the HTTP/2 connection preface by the deadline, then hands the
    /// connection (those bytes first) to pingora's HTTP/2 server.
    async fn serve_h2(
        self: &Arc<Self>,
        mut stream: Stream,
        deadline: Instant,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let head = tokio::time::timeout_at(deadline, read_h2_preface(&mut stream))
            .await
            .ok()??;
        let stream: Stream = Box::new(Replay {
            head: head.freeze(),
            inner: stream,
        });
        ServerApp::process_new(&self.proxy, stream, shutdown).await
    }

    fn count_rejected(&self, status: u16) {
        self.metrics
            .rejected_requests
            .with_label_values(&[&status.to_string()])
            .inc();
    }

    async fn reject(&self, stream: &mut Stream, status: u16, reason: &str) {
        self.count_rejected(status);
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
/// reads. `first`: the deadline of the connection's first request (counted from the
/// accept); later requests may idle for `idle` before their first byte.
async fn read_head(
    stream: &mut Stream,
    first: Option<Instant>,
    header_timeout: Duration,
    idle: Duration,
    max_bytes: usize,
    shutdown: &ShutdownWatch,
) -> Result<BytesMut, HeadError> {
    let mut shutdown = shutdown.clone();
    let mut deadline = first.unwrap_or_else(|| Instant::now() + idle);
    let first = first.is_some();
    if *shutdown.borrow() && !first {
        return Err(HeadError::Closed);
    }
    let mut buf = BytesMut::with_capacity(4096);
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

/// The client's HTTP/2 connection preface: the magic, then a SETTINGS frame (RFC
/// 9113 3.4), with whatever else arrived in the same reads. None when the client
/// closed or sent something else.
async fn read_h2_preface(stream: &mut Stream) -> Option<BytesMut> {
    const SETTINGS: u8 = 0x4;
    const FRAME_HEADER: usize = 9;
    // SETTINGS carries 6 bytes per setting; no client sends more than a few
    const MAX_SETTINGS: usize = 16 * 1024;
    let mut buf = BytesMut::with_capacity(256);
    let mut need = H2_PREFACE.len() + FRAME_HEADER;
    while buf.len() < need {
        if stream.read_buf(&mut buf).await.ok()? == 0 {
            return None;
        }
        if need == H2_PREFACE.len() + FRAME_HEADER && buf.len() >= need {
            let frame = &buf[H2_PREFACE.len()..];
            let len =
                usize::from(frame[0]) << 16 | usize::from(frame[1]) << 8 | usize::from(frame[2]);
            if &buf[..H2_PREFACE.len()] != H2_PREFACE || frame[3] != SETTINGS || len > MAX_SETTINGS
            {
                return None;
            }
            need += len;
        }
    }
    Some(buf)
}

/// A connection whose first bytes were already read; they are read again first.
#[derive(Debug)]
struct Replay {
    head: Bytes,
    inner: Stream,
}

impl AsyncRead for Replay {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.head.is_empty() {
            return Pin::new(&mut self.inner).poll_read(cx, buf);
        }
        let n = self.head.len().min(buf.remaining());
        buf.put_slice(&self.head[..n]);
        self.head.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Replay {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[async_trait]
impl Shutdown for Replay {
    async fn shutdown(&mut self) {
        Shutdown::shutdown(&mut *self.inner).await
    }
}

impl UniqueID for Replay {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for Replay {
    fn get_ssl(&self) -> Option<&pingora::protocols::tls::TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<pingora::protocols::tls::SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for Replay {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for Replay {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for Replay {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

#[async_trait]
impl Peek for Replay {
    async fn try_peek(&mut self, buf: &mut [u8]) -> std::io::Result<bool> {
        if self.head.len() < buf.len() {
            return Ok(false);
        }
        buf.copy_from_slice(&self.head[..buf.len()]);
        Ok(true)
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
