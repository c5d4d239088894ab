//! Upstream pools: server selection, health, passive ejection and the wait queue.
//!
//! A [`Pool`] is part of a config snapshot (immutable); the state it points to
//! ([`ServerState`], [`PoolState`]) is runtime state from the [`Registry`] and
//! survives reloads. [`Pool::acquire`] is the one entry point the proxy uses: it
//! picks an available server under its `max_conns`, or waits in the pool's bounded
//! queue, or says at once why it cannot.

pub mod health;
pub mod select;
pub mod state;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{Algorithm, HashOn, StatusSet};
pub use state::{Lease, PoolState, Registry, ServerState};

/// A server as the snapshot sees it.
#[derive(Debug)]
pub struct PoolServer {
    /// As written in the config (`app1.internal:8000`).
    pub label: String,
    pub addr: SocketAddr,
    pub weight: u32,
    pub max_conns: u32,
    pub state: Arc<ServerState>,
}

/// Active health check settings of a pool.
#[derive(Debug, Clone)]
pub struct HealthSpec {
    pub path: String,
    pub host: Option<String>,
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
    pub expected: StatusSet,
}

/// TLS toward a pool's servers.
#[derive(Debug, Clone, Default)]
pub struct UpstreamTls {
    pub enabled: bool,
    /// SNI and verified name; `None`: the host of the server's configured address.
    pub sni: Option<String>,
    pub verify: bool,
}

/// Upstream timeouts.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    pub read: Duration,
    pub write: Duration,
    pub idle: Duration,
}

#[derive(Debug)]
enum Selector {
    RoundRobin(select::SmoothWrr),
    LeastConn(select::LeastConn),
    Hash(select::HashRing),
}

/// One pool of a snapshot.
#[derive(Debug)]
pub struct Pool {
    pub name: String,
    pub algorithm: Algorithm,
    pub hash_on: HashOn,
    pub servers: Vec<PoolServer>,
    pub retries: u32,
    pub queue_size: usize,
    pub queue_timeout: Duration,
    pub timeouts: Timeouts,
    pub health: Option<HealthSpec>,
    pub eject_after: u32,
    pub ejection_time: Duration,
    pub state: Arc<PoolState>,
    pub tls: UpstreamTls,
    weights: Vec<u32>,
    selector: Selector,
}

/// Why [`Pool::acquire`] gave no server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unavailable {
    /// Every server not yet tried is down, ejected or disabled.
    NoneAvailable,
    /// Every server was already tried by this request.
    AllTried,
    /// Every available server is at max_conns and the queue is full.
    QueueFull,
    /// Waited `queue_timeout` in the queue without a free server.
    QueueTimeout,
}

#[allow(clippy::too_many_arguments)]
impl Pool {
    pub fn new(
        name: String,
        algorithm: Algorithm,
        hash_on: HashOn,
        servers: Vec<PoolServer>,
        retries: u32,
        queue_size: usize,
        queue_timeout: Duration,
        timeouts: Timeouts,
        health: Option<HealthSpec>,
        eject_after: u32,
        ejection_time: Duration,
        state: Arc<PoolState>,
    ) -> Pool {
        let weights: Vec<u32> = servers.iter().map(|s| s.weight).collect();
        let selector = match algorithm {
            Algorithm::RoundRobin => Selector::RoundRobin(select::SmoothWrr::new(servers.len())),
            Algorithm::LeastConn => Selector::LeastConn(select::LeastConn::default()),
            Algorithm::Hash => {
                let labels: Vec<String> = servers.iter().map(|s| s.label.clone()).collect();
                Selector::Hash(select::HashRing::new(&labels, &weights))
            }
        };
        Pool {
            name,
            algorithm,
            hash_on,
            servers,
            retries,
            queue_size,
            queue_timeout,
            timeouts,
            health,
            eject_after,
            ejection_time,
            state,
            tls: UpstreamTls::default(),
            weights,
            selector,
        }
    }

    /// Sets how the pool's servers are reached over TLS.
    pub fn with_tls(mut self, tls: UpstreamTls) -> Pool {
        self.tls = tls;
        self
    }

    /// The SNI for a server of this pool.
    pub fn sni_for(&self, server: &PoolServer) -> String {
        if let Some(s) = &self.tls.sni {
            return s.clone();
        }
        let host = server.label.split('#').next().unwrap_or("");
        match host.rsplit_once(':') {
            Some((h, _)) if h.parse::<std::net::IpAddr>().is_err() && !h.starts_with('[') => {
                h.to_owned()
            }
            _ => String::new(),
        }
    }

    fn pick(&self, key: &[u8], eligible: impl Fn(usize) -> bool) -> Option<usize> {
        match &self.selector {
            Selector::RoundRobin(s) => s.pick(&self.weights, eligible),
            Selector::LeastConn(s) => s.pick(
                &self.weights,
                |i| self.servers[i].state.in_flight(),
                eligible,
            ),
            Selector::Hash(s) => s.pick(key, eligible),
        }
    }

    /// One non-waiting attempt: a lease, or why there is none (`None` = all busy).
    fn try_acquire(&self, key: &[u8], tried: &[usize]) -> Result<Option<Lease>, Unavailable> {
        let untried = |i: usize| !tried.contains(&i);
        let up = |i: usize| untried(i) && self.servers[i].state.available();
        if !(0..self.servers.len()).any(untried) {
            return Err(Unavailable::AllTried);
        }
        if !(0..self.servers.len()).any(|i| up(i) && self.servers[i].weight > 0) {
            return Err(Unavailable::NoneAvailable);
        }
        let has_room = |i: usize| {
            let s = &self.servers[i];
            s.max_conns == 0 || s.state.in_flight() < s.max_conns
        };
        // a pick can lose a race for the last slot: try a few times before queueing
        for _ in 0..4 {
            let Some(i) = self.pick(key, |i| up(i) && has_room(i)) else {
                return Ok(None);
            };
            let s = &self.servers[i];
            if let Some(lease) = Lease::try_acquire(&s.state, i, &self.state, s.max_conns) {
                return Ok(Some(lease));
            }
        }
        Ok(None)
    }

    /// Claims a server for one attempt of a request, skipping the servers in `tried`.
    /// Waits in the pool's queue (bounded in size and time) only when every available
    /// server is at its `max_conns`.
    pub async fn acquire(&self, key: &[u8], tried: &[usize]) -> Result<Lease, Unavailable> {
        if let Some(lease) = self.try_acquire(key, tried)? {
            return Ok(lease);
        }
        let Some(_ticket) = self.state.try_enqueue(self.queue_size) else {
            return Err(Unavailable::QueueFull);
        };
        let deadline = tokio::time::Instant::now() + self.queue_timeout;
        loop {
            let notified = self.state.slot_freed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(lease) = self.try_acquire(key, tried)? {
                return Ok(lease);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(Unavailable::QueueTimeout);
            }
        }
    }

    pub fn in_flight(&self) -> u32 {
        self.servers.iter().map(|s| s.state.in_flight()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(max_conns: u32, queue_size: usize, n: usize) -> (Pool, Arc<Registry>) {
        let reg = Registry::new();
        let servers = (0..n)
            .map(|i| {
                let addr: SocketAddr = format!("127.0.0.1:{}", 9000 + i).parse().unwrap();
                PoolServer {
                    label: addr.to_string(),
                    addr,
                    weight: 1,
                    max_conns,
                    state: reg.server("p", addr),
                }
            })
            .collect();
        let t = Duration::from_secs(1);
        let p = Pool::new(
            "p".into(),
            Algorithm::RoundRobin,
            HashOn::ClientIp,
            servers,
            1,
            queue_size,
            Duration::from_millis(200),
            Timeouts {
                connect: t,
                read: t,
                write: t,
                idle: t,
            },
            None,
            2,
            Duration::from_secs(30),
            reg.pool("p"),
        );
        (p, reg)
    }

    #[tokio::test]
    async fn a_full_server_queues_and_a_freed_slot_wakes_the_waiter() {
        let (p, _reg) = pool(1, 4, 1);
        let p = Arc::new(p);
        let first = p.acquire(b"", &[]).await.expect("free slot");
        let p2 = p.clone();
        let waiter = tokio::spawn(async move { p2.acquire(b"", &[]).await.map(|l| l.index) });
        while p.state.queued() == 0 {
            tokio::task::yield_now().await;
        }
        drop(first);
        assert_eq!(waiter.await.unwrap(), Ok(0));
        assert_eq!(p.state.queued(), 0);
    }

    #[tokio::test]
    async fn queue_times_out_and_rejects_when_full() {
        let (p, _reg) = pool(1, 1, 1);
        let p = Arc::new(p);
        let _held = p.acquire(b"", &[]).await.unwrap();
        let p2 = p.clone();
        let waiter = tokio::spawn(async move { p2.acquire(b"", &[]).await.map(|l| l.index) });
        while p.state.queued() == 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            p.acquire(b"", &[]).await.err(),
            Some(Unavailable::QueueFull)
        );
        assert_eq!(waiter.await.unwrap(), Err(Unavailable::QueueTimeout));
    }

    #[tokio::test]
    async fn ejected_servers_are_skipped_and_all_down_fails_at_once() {
        let (p, _reg) = pool(0, 4, 2);
        assert!(p.servers[0]
            .state
            .record_failure(1, Duration::from_secs(30)));
        for _ in 0..4 {
            assert_eq!(p.acquire(b"", &[]).await.unwrap().index, 1);
        }
        p.servers[1].state.record_check(false, 1, 1);
        assert_eq!(
            p.acquire(b"", &[]).await.err(),
            Some(Unavailable::NoneAvailable)
        );
        assert_eq!(
            p.acquire(b"", &[0, 1]).await.err(),
            Some(Unavailable::AllTried)
        );
    }

    #[tokio::test]
    async fn server_state_survives_in_the_registry_while_referenced() {
        let (p, reg) = pool(0, 0, 1);
        let addr = p.servers[0].addr;
        p.servers[0].state.record_check(false, 1, 1);
        assert!(
            !reg.server("p", addr).healthy(),
            "same state handed out again"
        );
        drop(p);
        assert!(
            reg.server("p", addr).healthy(),
            "forgotten once unreferenced"
        );
    }
}
