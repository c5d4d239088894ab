//! The admin listener: `/metrics` (Prometheus text), `/healthz` (liveness) and
//! `/status` (JSON: generation, pools, servers, health, in-flight, queue).
//! It only reads: the snapshot handle and the metrics registry.

use std::sync::Arc;

use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde_json::json;

use crate::metrics::Metrics;
use crate::snapshot::{Snapshot, SnapshotHandle};

pub struct Admin {
    pub snapshots: SnapshotHandle,
    pub metrics: Arc<Metrics>,
}

fn reply(status: u16, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .header("content-length", body.len())
        .header("cache-control", "no-store")
        .body(body)
        .unwrap_or_else(|_| Response::new(Vec::new()))
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path().to_owned();
        let snap = self.snapshots.load_full();
        match path.as_str() {
            "/metrics" => reply(
                200,
                "text/plain; version=0.0.4; charset=utf-8",
                self.metrics.render(&snap),
            ),
            "/healthz" => reply(200, "text/plain; charset=utf-8", b"ok\n".to_vec()),
            "/status" => reply(
                200,
                "application/json",
                serde_json::to_vec_pretty(&status(&snap)).unwrap_or_default(),
            ),
            _ => reply(404, "text/plain; charset=utf-8", b"not found\n".to_vec()),
        }
    }
}

/// The `/status` document.
pub fn status(snap: &Snapshot) -> serde_json::Value {
    let pools: Vec<_> = snap
        .pools
        .iter()
        .map(|p| {
            let servers: Vec<_> = p
                .servers
                .iter()
                .map(|s| {
                    json!({
                        "address": s.label,
                        "resolved": s.addr.to_string(),
                        "weight": s.weight,
                        "max_conns": s.max_conns,
                        "healthy": s.state.healthy(),
                        "ejected": s.state.ejected(),
                        "disabled": s.state.disabled.load(std::sync::atomic::Ordering::Relaxed),
                        "available": s.state.available(),
                        "in_flight": s.state.in_flight(),
                    })
                })
                .collect();
            json!({
                "name": p.name,
                "algorithm": format!("{:?}", p.algorithm),
                "in_flight": p.in_flight(),
                "queued": p.state.queued(),
                "queue_size": p.queue_size,
                "servers": servers,
            })
        })
        .collect();
    let routes: Vec<_> = snap
        .routes
        .iter()
        .map(|r| json!({"name": r.name, "upstream": snap.pools[r.pool].name}))
        .collect();
    json!({
        "generation": snap.generation,
        "pools": pools,
        "routes": routes,
    })
}
