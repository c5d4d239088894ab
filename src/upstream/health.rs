//! Active HTTP health checks: one long-lived task for the whole process.
//!
//! Every tick the checker walks the *current* snapshot's pools and starts a probe for
//! each server whose check is due. It never holds a snapshot across ticks, so a
//! reload changes what is checked at the next tick, and 1,000 reloads leave exactly
//! one checker task. A probe is `GET <path>` over a fresh connection with
//! `Connection: close`; it passes when the status is in `expected_status`, all within
//! `timeout`. A pool with `tls = true` is probed over TLS with the same SNI,
//! verification and CA file as its proxied requests (pingora's connector), so a
//! probe checks what traffic will meet.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::connectors::TransportConnector;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use pingora::upstreams::peer::HttpPeer;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::state::now_ms;
use super::HealthSpec;
use crate::metrics::Metrics;
use crate::snapshot::SnapshotHandle;

/// How often the checker looks for due probes.
const TICK: Duration = Duration::from_millis(100);

/// The background service that runs every active health check.
pub struct HealthChecker {
    pub snapshots: SnapshotHandle,
    pub metrics: Arc<Metrics>,
    /// Opens the TLS connections of probes to `tls = true` pools (built from the
    /// server's settings, so it trusts `upstream_ca_file` as the proxy does).
    pub connector: Arc<TransportConnector>,
}

/// How a probe reaches its server over TLS.
#[derive(Clone)]
pub struct TlsProbe {
    pub connector: Arc<TransportConnector>,
    /// SNI and the name verified.
    pub sni: String,
    pub verify: bool,
}

impl HealthChecker {
    /// Starts the probes that are due now. Returns how many were started.
    pub fn tick(&self) -> usize {
        let snap = self.snapshots.load_full();
        let now = now_ms();
        let mut started = 0;
        for pool in &snap.pools {
            let Some(spec) = &pool.health else { continue };
            for server in &pool.servers {
                let st = &server.state;
                if !st.probed() {
                    continue; // disabled by an operator: no probes
                }
                if st.next_check_at.load(Ordering::Relaxed) > now
                    || st.check_running.swap(true, Ordering::AcqRel)
                {
                    continue;
                }
                st.next_check_at
                    .store(now + spec.interval.as_millis() as u64, Ordering::Relaxed);
                let st = st.clone();
                let spec = spec.clone();
                let label = server.label.clone();
                let metrics = self.metrics.clone();
                let tls = pool.tls.enabled.then(|| TlsProbe {
                    connector: self.connector.clone(),
                    sni: pool.sni_for(server),
                    verify: pool.tls.verify,
                });
                started += 1;
                tokio::spawn(async move {
                    let passed = probe(st.addr, &label, &spec, tls.as_ref()).await;
                    if let Some(healthy) = st.record_check(passed, spec.rise, spec.fall) {
                        log::warn!(
                            "pool {} server {} is now {}",
                            st.pool,
                            label,
                            if healthy { "healthy" } else { "DOWN" }
                        );
                        metrics.health_transitions(&st.pool, &label, healthy);
                    }
                    st.check_running.store(false, Ordering::Release);
                });
            }
        }
        started
    }
}

#[async_trait]
impl BackgroundService for HealthChecker {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut every = tokio::time::interval(TICK);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = every.tick() => { self.tick(); }
            }
        }
    }
}

/// One probe. True when the server answered an expected status within the timeout.
pub async fn probe(
    addr: SocketAddr,
    label: &str,
    spec: &HealthSpec,
    tls: Option<&TlsProbe>,
) -> bool {
    let answer = async {
        match tls {
            None => exchange(TcpStream::connect(addr).await?, label, spec).await,
            Some(t) => {
                let mut peer = HttpPeer::new(addr, true, t.sni.clone());
                peer.options.verify_cert = t.verify;
                peer.options.verify_hostname = t.verify;
                let stream = t
                    .connector
                    .new_stream(&peer)
                    .await
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                exchange(stream, label, spec).await
            }
        }
    };
    match tokio::time::timeout(spec.timeout, answer).await {
        Ok(Ok(status)) => {
            let ok = spec.expected.contains(status);
            if !ok {
                log::debug!("health probe of {label}: status {status}");
            }
            ok
        }
        Ok(Err(e)) => {
            log::debug!("health probe of {label}: {e}");
            false
        }
        Err(_) => {
            log::debug!("health probe of {label}: timed out");
            false
        }
    }
}

/// Sends the probe request on an open connection and reads the status line.
async fn exchange<S>(mut stream: S, label: &str, spec: &HealthSpec) -> std::io::Result<u16>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let host = spec.host.as_deref().unwrap_or(label);
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: wingman-edge-health\r\nConnection: close\r\n\r\n",
        spec.path, host
    );
    stream.write_all(req.as_bytes()).await?;
    stream.flush().await?;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.contains(&b'\n') || buf.len() > 4096 {
            break;
        }
    }
    parse_status_line(&buf)
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "no HTTP status line"))
}

/// The status code of an `HTTP/1.x NNN ...` line.
fn parse_status_line(buf: &[u8]) -> Option<u16> {
    let line = buf.split(|&b| b == b'\n').next()?;
    let rest = line.strip_prefix(b"HTTP/1.")?;
    let code = rest.get(2..5)?;
    if rest.get(1) != Some(&b' ') {
        return None;
    }
    std::str::from_utf8(code).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::parse_status_line;

    #[test]
    fn status_lines_parse() {
        assert_eq!(parse_status_line(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(parse_status_line(b"HTTP/1.0 503 Busy\r\n"), Some(503));
        assert_eq!(parse_status_line(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(parse_status_line(b"HTTP/1.1 2"), None);
    }
}
