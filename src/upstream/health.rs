//! Active HTTP health checks: one long-lived task for the whole process.
//!
//! Every tick the checker walks the *current* snapshot's pools and starts a probe for
//! each server whose check is due. It never holds a snapshot across ticks, so a
//! reload changes what is checked at the next tick, and 1,000 reloads leave exactly
//! one checker task. A probe is `GET <path>` over a fresh connection with
//! `Connection: close`; it passes when the status is in `expected_status`, all within
//! `timeout`.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
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
                if st.maintenance.load(Ordering::Relaxed) {
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
                started += 1;
                tokio::spawn(async move {
                    let passed = probe(st.addr, &label, &spec).await;
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
pub async fn probe(addr: SocketAddr, label: &str, spec: &HealthSpec) -> bool {
    match tokio::time::timeout(spec.timeout, probe_inner(addr, label, spec)).await {
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

async fn probe_inner(addr: SocketAddr, label: &str, spec: &HealthSpec) -> std::io::Result<u16> {
    let mut stream = TcpStream::connect(addr).await?;
    let host = spec.host.as_deref().unwrap_or(label);
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: wingman-edge-health\r\nConnection: close\r\n\r\n",
        spec.path, host
    );
    stream.write_all(req.as_bytes()).await?;
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
