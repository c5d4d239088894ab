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
pub use state::{AdminState, Lease, PoolState, Registry, ServerState};

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
    /// Panic mode below this share (percent) of available servers; 0: never.
    pub panic_threshold: u8,
    weights: Vec<u32>,
    selector: Selector,
}

/// What a passive failure did ([`Pool::record_failure`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Counted toward the streak.
    Counted,
    /// The streak reached `consecutive_failures`: the server is ejected.
    Ejected,
    /// The streak reached `consecutive_failures`, but the server is the pool's last
    /// available one: it stays (nginx never marks a lone server unavailable either).
    KeptLast,
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
            panic_threshold: 0,
            weights,
            selector,
        }
    }

    /// Sets how the pool's servers are reached over TLS.
    pub fn with_tls(mut self, tls: UpstreamTls) -> Pool {
        self.tls = tls;
        self
    }

    /// Sets the panic threshold (percent of available servers; 0: never).
    pub fn with_panic_threshold(mut self, percent: u8) -> Pool {
        self.panic_threshold = percent.min(100);
        self
    }

    /// Servers that count toward the pool's size: pickable (weight above 0) and
    /// not taken out by an operator (drain, disable).
    fn in_service(&self, i: usize) -> bool {
        self.servers[i].weight > 0 && self.servers[i].state.in_service()
    }

    /// Panic mode: fewer than `panic_threshold` percent of the servers in service
    /// are available (healthy and not ejected). Then health and ejection are
    /// ignored and requests are balanced across every server in service, as
    /// Envoy does: a pool whose checks or outlier detection took most servers out
    /// is more likely misjudged than dead, and the survivors would be overloaded.
    pub fn in_panic(&self) -> bool {
        if self.panic_threshold == 0 {
            return false;
        }
        let (mut total, mut up) = (0usize, 0usize);
        for (i, s) in self.servers.iter().enumerate() {
            if self.in_service(i) {
                total += 1;
                up += s.state.available() as usize;
            }
        }
        total > 0 && up * 100 < total * self.panic_threshold as usize
    }

    /// Records a passive failure of server `index`: counts it and, at
    /// `consecutive_failures` in a row, ejects the server unless no other server of
    /// the pool is available (the last one is never ejected).
    pub fn record_failure(&self, index: usize) -> Failure {
        let server = &self.servers[index].state;
        if !server.count_failure(self.eject_after) {
            return Failure::Counted;
        }
        let _deciding = self.state.ejecting.lock();
        let another = (0..self.servers.len())
            .any(|j| j != index && self.in_service(j) && self.servers[j].state.available());
        if !another {
            return Failure::KeptLast;
        }
        server.eject(self.ejection_time);
        Failure::Ejected
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
        if !(0..self.servers.len()).any(untried) {
            return Err(Unavailable::AllTried);
        }
        let panic = self.in_panic();
        let up = |i: usize| {
            untried(i) && self.in_service(i) && (panic || self.servers[i].state.available())
        };
        if !(0..self.servers.len()).any(up) {
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
            if let Some(mut lease) = Lease::try_acquire(&s.state, i, &self.state, s.max_conns) {
                lease.panic = panic;
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
        assert_eq!(p.record_failure(0), Failure::Counted);
        assert_eq!(p.record_failure(0), Failure::Ejected);
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
    async fn the_last_available_server_is_never_ejected() {
        // panic mode off (the test pool's default): only the ejection rule protects
        // it; the test pool ejects at 2 failures in a row
        let (p, _reg) = pool(0, 4, 3);
        assert_eq!(p.record_failure(0), Failure::Counted);
        assert_eq!(p.record_failure(0), Failure::Ejected);
        assert_eq!(p.record_failure(1), Failure::Counted);
        assert_eq!(p.record_failure(1), Failure::Ejected);
        // 2 is the last one standing: its failures never take it out
        for _ in 0..10 {
            assert_eq!(p.record_failure(2), Failure::Counted);
            assert_eq!(p.record_failure(2), Failure::KeptLast);
        }
        assert!(p.servers[2].state.available());
        for _ in 0..4 {
            assert_eq!(p.acquire(b"", &[]).await.unwrap().index, 2);
        }
        // a drained server is not "available" for that rule
        let (p, _reg) = pool(0, 4, 2);
        p.servers[1].state.set_admin(state::AdminState::Draining);
        assert_eq!(p.record_failure(0), Failure::Counted);
        assert_eq!(p.record_failure(0), Failure::KeptLast);
    }

    #[tokio::test]
    async fn below_the_panic_threshold_every_server_in_service_is_used() {
        let (p, _reg) = pool(0, 4, 4);
        let p = p.with_panic_threshold(50);
        // two of four out (50 % available): not below the threshold
        p.servers[0].state.eject(Duration::from_secs(30));
        p.servers[1].state.record_check(false, 1, 1);
        assert!(!p.in_panic());
        let picks: Vec<usize> = (0..4)
            .map(|_| p.try_acquire(b"", &[]).unwrap().unwrap().index)
            .collect();
        assert!(picks.iter().all(|&i| i >= 2), "{picks:?}");
        // three of four out: panic, round robin over all four, leases say so
        p.servers[2].state.eject(Duration::from_secs(30));
        assert!(p.in_panic());
        let leases: Vec<Lease> = (0..8)
            .map(|_| p.try_acquire(b"", &[]).unwrap().unwrap())
            .collect();
        let mut counts = [0; 4];
        leases.iter().for_each(|l| counts[l.index] += 1);
        assert_eq!(counts, [2, 2, 2, 2]);
        assert!(leases.iter().all(|l| l.panic));
        // an operator's drain is honoured even in panic mode, and a drained server
        // does not count toward the pool's size: 1 of 3 available is still panic
        p.servers[0].state.set_admin(state::AdminState::Draining);
        assert!(p.in_panic());
        for _ in 0..6 {
            assert_ne!(p.try_acquire(b"", &[]).unwrap().unwrap().index, 0);
        }
        // every server tried: still AllTried
        assert_eq!(
            p.try_acquire(b"", &[1, 2, 3]).err(),
            Some(Unavailable::NoneAvailable)
        );
        assert_eq!(
            p.try_acquire(b"", &[0, 1, 2, 3]).err(),
            Some(Unavailable::AllTried)
        );
        // threshold 0: never panic
        let (p, _reg) = pool(0, 4, 2);
        p.servers[0].state.eject(Duration::from_secs(30));
        p.servers[1].state.eject(Duration::from_secs(30));
        assert!(!p.in_panic());
        assert_eq!(
            p.try_acquire(b"", &[]).err(),
            Some(Unavailable::NoneAvailable)
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
