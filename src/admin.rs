//! The admin listener: `/metrics` (Prometheus text), `/healthz` (liveness) and
//! `/status` (JSON: generation, pools, servers, health, in-flight, queue).
//! It only reads: the snapshot handle and the metrics registry.

use std::sync::Arc;

use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde_json::json;

use crate::cache::policy::key_prefix;
use crate::cache::store::CacheStore;
use crate::metrics::Metrics;
use crate::snapshot::{Snapshot, SnapshotHandle};

pub struct Admin {
    pub snapshots: SnapshotHandle,
    pub metrics: Arc<Metrics>,
    pub cache: Option<&'static CacheStore>,
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
            "/metrics" => {
                if let Some(cache) = self.cache {
                    let st = cache.stats();
                    self.metrics.cache_bytes.set(st.bytes as i64);
                    self.metrics.cache_objects.set(st.objects as i64);
                    self.metrics.cache_evictions.set(st.evictions as i64);
                }
                reply(
                    200,
                    "text/plain; version=0.0.4; charset=utf-8",
                    self.metrics.render(&snap),
                )
            }
            "/cache/purge" => self.purge(session).await,
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

impl Admin {
    /// `POST /cache/purge?url=http://host/path?query` removes one URL (every variant);
    /// `?prefix=http://host/path-prefix` removes everything under a prefix.
    async fn purge(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        if req.method != http::Method::POST && req.method.as_str() != "PURGE" {
            return reply(405, "text/plain; charset=utf-8", b"use POST\n".to_vec());
        }
        let Some(cache) = self.cache else {
            return reply(404, "text/plain; charset=utf-8", b"no cache\n".to_vec());
        };
        let query = req.uri.query().unwrap_or("").to_owned();
        let param = |name: &str| {
            query
                .split('&')
                .filter_map(|kv| kv.split_once('='))
                .find(|(k, _)| *k == name)
                .map(|(_, v)| percent_decode(v))
        };
        let (target, exact) = match (param("url"), param("prefix")) {
            (Some(u), None) => (u, true),
            (None, Some(p)) => (p, false),
            _ => {
                return reply(
                    400,
                    "text/plain; charset=utf-8",
                    b"give exactly one of url= or prefix=\n".to_vec(),
                )
            }
        };
        let Some(key) = url_to_key(&target, exact) else {
            return reply(
                400,
                "text/plain; charset=utf-8",
                format!("{target:?} is not an absolute http(s) URL\n").into_bytes(),
            );
        };
        let removed = if exact {
            cache.invalidate(&key).await
        } else {
            cache.purge_prefix(&key).await
        };
        self.metrics
            .cache_purges
            .with_label_values(&["admin"])
            .inc_by(removed as u64);
        reply(
            200,
            "application/json",
            serde_json::to_vec(&json!({ "purged": removed })).unwrap_or_default(),
        )
    }
}

/// `http://host/path?q` -> the cache key of that URL (or of every URL under it).
fn url_to_key(url: &str, exact: bool) -> Option<String> {
    let uri: http::Uri = url.parse().ok()?;
    let scheme = uri.scheme_str().filter(|s| *s == "http" || *s == "https")?;
    let host = uri.authority()?.as_str();
    if exact {
        let req = pingora::http::RequestHeader::build(
            "GET",
            uri.path_and_query().map_or("/", |p| p.as_str()).as_bytes(),
            None,
        )
        .ok()?;
        Some(format!(
            "{scheme}\n{}\n{}",
            host.to_ascii_lowercase(),
            req.uri
        ))
    } else {
        Some(key_prefix(scheme, host, uri.path()))
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
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
