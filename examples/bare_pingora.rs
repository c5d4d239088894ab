//! The floor for wingman-edge's per-request cost: pingora 0.9 with nothing but round
//! robin (no routing, header work, metrics, timeouts, buffering or compression).
//! `benches/instructions.sh` runs it beside nginx and the edge on the same origins, so
//! the edge's overhead splits into what pingora itself costs and what the edge adds.
//!
//! It follows the side-by-side harness's `--proxy-cmd` contract: it listens on
//! 127.0.0.1:$BENCH_PORT with $BENCH_WORKERS threads and proxies, with keep-alive, to
//! the comma-separated $BENCH_UPSTREAMS. Not a product: no config, no health checks.
//!
//! ```sh
//! BENCH_PORT=6190 BENCH_UPSTREAMS=127.0.0.1:9001 BENCH_WORKERS=1 \
//!     cargo run --release --example bare_pingora
//! ```

use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use pingora::prelude::*;
use pingora::server::configuration::ServerConf;

// the same allocator as the edge, so the comparison is about the request path
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

struct RoundRobin {
    upstreams: Vec<String>,
    next: AtomicUsize,
}

#[async_trait]
impl ProxyHttp for RoundRobin {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _: &mut Session, _: &mut ()) -> Result<Box<HttpPeer>> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.upstreams.len();
        Ok(Box::new(HttpPeer::new(
            self.upstreams[i].as_str(),
            false,
            String::new(),
        )))
    }
}

fn env(name: &str) -> Result<String, String> {
    std::env::var(name).map_err(|_| format!("bare_pingora: set {name} (see the file's docs)"))
}

fn main() -> ExitCode {
    let parsed = (|| -> Result<(String, Vec<String>, usize), String> {
        let port = env("BENCH_PORT")?;
        let upstreams: Vec<String> = env("BENCH_UPSTREAMS")?
            .split(',')
            .filter(|u| !u.is_empty())
            .map(|u| {
                u.parse::<std::net::SocketAddr>()
                    .map(|a| a.to_string())
                    .map_err(|e| format!("bare_pingora: BENCH_UPSTREAMS: {u}: {e}"))
            })
            .collect::<Result<_, _>>()?;
        if upstreams.is_empty() {
            return Err("bare_pingora: BENCH_UPSTREAMS is empty".into());
        }
        let workers = env("BENCH_WORKERS")?
            .parse::<usize>()
            .map_err(|e| format!("bare_pingora: BENCH_WORKERS: {e}"))?;
        Ok((port, upstreams, workers.max(1)))
    })();
    let (port, upstreams, workers) = match parsed {
        Ok(p) => p,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let conf = ServerConf {
        threads: workers,
        upstream_keepalive_pool_size: 1024,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut service = http_proxy_service(
        &server.configuration,
        RoundRobin {
            upstreams,
            next: AtomicUsize::new(0),
        },
    );
    service.add_tcp(&format!("127.0.0.1:{port}"));
    server.add_service(service);
    server.run_forever()
}
