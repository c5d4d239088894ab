//! The local stack: the edge on 127.0.0.1:8080 in front of two sample origins, on
//! embedded defaults. `cargo run --release --example local_stack`; Ctrl-C stops it.
//!
//! Until the app server exists the origins are small built-in HTTP servers that say
//! which one answered; `/status` and `/metrics` are on the admin port 9901.

use std::net::SocketAddr;
use std::time::Duration;

use axum::routing::get;
use axum::Router;

const EDGE: &str = "127.0.0.1:8080";
const ADMIN: &str = "127.0.0.1:9901";

fn main() {
    let origins: Vec<SocketAddr> = {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("origin runtime");
            rt.block_on(async move {
                let mut addrs = Vec::new();
                for n in 1..=2 {
                    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
                        .await
                        .expect("bind origin");
                    addrs.push(l.local_addr().expect("origin address"));
                    let page = format!("Hello from origin {n}, through wingman-edge\n");
                    let app = Router::new()
                        .route("/healthz", get(|| async { "ok\n" }))
                        .fallback(move || {
                            let page = page.clone();
                            async move { page }
                        });
                    tokio::spawn(async move {
                        let _ = axum::serve(l, app).await;
                    });
                }
                let _ = tx.send(addrs);
                std::future::pending::<()>().await;
            });
        });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("origins started")
    };

    let dir = std::env::temp_dir().join(format!("wingman-local-stack-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("state directory");
    let config = dir.join("edge.toml");
    let servers: Vec<String> = origins
        .iter()
        .map(|a| format!("{{ address = \"{a}\" }}"))
        .collect();
    std::fs::write(
        &config,
        format!(
            r#"[server]
grace_period = "1s"
graceful_shutdown_timeout = "1s"
pid_file = "{dir}/edge.pid"
upgrade_sock = "{dir}/upgrade.sock"

[[listeners]]
address = "{EDGE}"

[admin]
address = "{ADMIN}"

[[upstreams]]
name = "app"
servers = [{servers}]
[upstreams.health_check]
path = "/healthz"
interval = "1s"

[[routes]]
name = "app"
upstream = "app"
"#,
            dir = dir.display(),
            servers = servers.join(", ")
        ),
    )
    .expect("write config");

    println!("wingman-edge local stack");
    println!("  open      http://{EDGE}/");
    println!("  status    http://{ADMIN}/status");
    println!("  metrics   http://{ADMIN}/metrics");
    println!("  config    {}", config.display());
    println!("  Ctrl-C to stop");
    if let Err(e) = wingman_edge::app::run(wingman_edge::app::RunOptions {
        config,
        upgrade: false,
        daemon: false,
    }) {
        eprintln!("local stack failed: {e}");
        std::process::exit(1);
    }
}
