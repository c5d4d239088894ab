//! The admin listener, like HAProxy's stats page:
//! - `/metrics` (Prometheus text), `/healthz` (liveness);
//! - `/status` (JSON: generation, pools, servers with health, admin state, weight,
//!   in-flight, queue, request and error counts and a latency histogram; cache
//!   lookups) and `/` (an HTML page without external assets that polls `/status`
//!   and shows rates and p50/p95/p99 from the deltas);
//! - actions: `POST /api/servers/{pool}/{server}/{drain|disable|enable}` and
//!   `POST /cache/purge?url=|prefix=`, allowed with `Authorization: Bearer <admin.token>`
//!   or, when no token is configured, from loopback clients sending
//!   `X-Wingman-Admin: 1` (a header no web page can send cross-origin without a
//!   CORS preflight, which this listener never grants).
//!
//! Every request must name this listener in Host (its address, localhost or an
//! `admin.hosts` name: a DNS-rebound name is refused) and carry no Origin but its
//! own, so a page in the operator's browser can neither act nor read `/status`.

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
        if let Err(refused) = same_site(session, &snap) {
            return refused;
        }
        if let Some(rest) = path.strip_prefix("/api/servers/") {
            if let Err(denied) = self.authorize(session, &snap) {
                return denied;
            }
            return self.server_action(session, rest, &snap);
        }
        if path == "/cache/purge" {
            if let Err(denied) = self.authorize(session, &snap) {
                return denied;
            }
        }
        match path.as_str() {
            "/" | "/status.html" => reply(
                200,
                "text/html; charset=utf-8",
                include_bytes!("status.html").to_vec(),
            ),
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
            "/status" => {
                let mut doc = status(&snap);
                let lookups = |r: &str| self.metrics.cache_lookups.with_label_values(&[r]).get();
                doc["cache"] = json!({
                    "hits": lookups("hit") + lookups("stale"),
                    "misses": lookups("miss") + lookups("expired") + lookups("uncacheable"),
                    "bypass": lookups("bypass"),
                });
                reply(
                    200,
                    "application/json",
                    serde_json::to_vec_pretty(&doc).unwrap_or_default(),
                )
            }
            _ => reply(404, "text/plain; charset=utf-8", b"not found\n".to_vec()),
        }
    }
}

impl Admin {
    /// Admin actions need the configured token, or a loopback client when none is set.
    #[allow(clippy::result_large_err)]
    fn authorize(&self, session: &ServerSession, snap: &Snapshot) -> Result<(), Response<Vec<u8>>> {
        let text = "text/plain; charset=utf-8";
        match &snap.admin_token {
            Some(token) => {
                let given = session
                    .req_header()
                    .headers
                    .get(http::header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "));
                if given.is_some_and(|g| constant_time_eq(g.as_bytes(), token.as_bytes())) {
                    Ok(())
                } else {
                    Err(reply(401, text, b"admin token required\n".to_vec()))
                }
            }
            None => {
                let loopback = session
                    .client_addr()
                    .and_then(|a| a.as_inet())
                    .is_some_and(|a| a.ip().is_loopback());
                let header = session
                    .req_header()
                    .headers
                    .get("x-wingman-admin")
                    .is_some_and(|v| v.as_bytes() == b"1");
                if !loopback {
                    Err(reply(
                        403,
                        text,
                        b"admin actions are loopback-only without a token\n".to_vec(),
                    ))
                } else if !header {
                    Err(reply(
                        403,
                        text,
                        b"admin actions need the header X-Wingman-Admin: 1 (or admin.token)\n"
                            .to_vec(),
                    ))
                } else {
                    Ok(())
                }
            }
        }
    }

    /// `{pool}/{server}/{action}`.
    fn server_action(
        &self,
        session: &ServerSession,
        rest: &str,
        snap: &Snapshot,
    ) -> Response<Vec<u8>> {
        let text = "text/plain; charset=utf-8";
        if session.req_header().method != http::Method::POST {
            return reply(405, text, b"use POST\n".to_vec());
        }
        let parts: Vec<String> = rest.split('/').map(percent_decode).collect();
        let [pool, server, action] = parts.as_slice() else {
            return reply(
                404,
                text,
                b"use /api/servers/{pool}/{server}/{drain|disable|enable}\n".to_vec(),
            );
        };
        let Some(p) = snap.pool(pool) else {
            return reply(404, text, format!("no pool {pool:?}\n").into_bytes());
        };
        let Some(s) = p
            .servers
            .iter()
            .find(|s| s.label == *server || s.addr.to_string() == *server)
        else {
            return reply(
                404,
                text,
                format!("no server {server:?} in pool {pool:?}\n").into_bytes(),
            );
        };
        let Some(state) = crate::upstream::AdminState::from_action(action) else {
            return reply(
                400,
                text,
                format!("unknown action {action:?}\n").into_bytes(),
            );
        };
        s.state.set_admin(state);
        log::warn!("admin: {action} {pool}/{server}");
        reply(
            200,
            "application/json",
            serde_json::to_vec(&json!({
                "pool": pool, "server": s.label, "state": s.state.admin_state()
            }))
            .unwrap_or_default(),
        )
    }

    /// `POST /cache/purge?url=http://host/path?query` removes one URL (every variant);
    /// `?prefix=http://host/path-prefix` removes everything under a prefix.
    async fn purge(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let snap = self.snapshots.load_full();
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
        let Some(key) = url_to_key(&target, exact, &snap) else {
            return reply(
                400,
                "text/plain; charset=utf-8",
                format!("{target:?} is not an absolute http(s) URL\n").into_bytes(),
            );
        };
        let removed = if exact {
            cache.invalidate_resource(&key).await
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

/// Refuses a request whose Host does not name this listener (DNS rebinding) or
/// whose Origin is another site's.
#[allow(clippy::result_large_err)]
fn same_site(session: &ServerSession, snap: &Snapshot) -> Result<(), Response<Vec<u8>>> {
    let req = session.req_header();
    let host = req
        .headers
        .get(http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| req.uri.authority().map(|a| a.as_str()));
    let local = session.server_addr().and_then(|a| a.as_inet()).copied();
    let refuse = |msg: String| Err(reply(403, "text/plain; charset=utf-8", msg.into_bytes()));
    if let Some(host) = host {
        if !host_allowed(host, local, snap) {
            return refuse(format!("Host {host:?} does not name this admin listener\n"));
        }
    }
    if let Some(origin) = req.headers.get(http::header::ORIGIN) {
        let same = host.is_some_and(|h| {
            origin
                .to_str()
                .is_ok_and(|o| o.eq_ignore_ascii_case(&format!("http://{h}")))
        });
        if !same {
            return refuse(format!("cross-origin request from {origin:?} refused\n"));
        }
    }
    Ok(())
}

/// Host is `name[:port]`: the name this listener's address or the connection's
/// local address, `localhost`, or an `admin.hosts` name; the port, if given,
/// the listener's.
fn host_allowed(host: &str, local: Option<std::net::SocketAddr>, snap: &Snapshot) -> bool {
    let (name, port) = match host.rsplit_once(':') {
        Some((n, p)) if !n.ends_with(':') && (n.starts_with('[') || !n.contains(':')) => {
            (n, Some(p))
        }
        _ => (host, None),
    };
    let port_ok = port.is_none_or(|p| {
        p.parse::<u16>()
            .is_ok_and(|p| local.map_or(snap.admin.port(), |l| l.port()) == p)
    });
    let name = name.trim_start_matches('[').trim_end_matches(']');
    let name_ok = name.eq_ignore_ascii_case("localhost")
        || snap
            .admin_hosts
            .iter()
            .any(|h| h.eq_ignore_ascii_case(name))
        || name.parse::<std::net::IpAddr>().is_ok_and(|ip| {
            local.is_some_and(|l| l.ip() == ip)
                || (!snap.admin.ip().is_unspecified() && snap.admin.ip() == ip)
        });
    port_ok && name_ok
}

/// `http://host/path?q` -> the resource key of that URL, built by the proxy's one
/// key function with the query parameters its route ignores (every variant by key
/// headers, cookies and Vary goes with it); or the prefix of every URL under it.
fn url_to_key(url: &str, exact: bool, snap: &Snapshot) -> Option<String> {
    let uri: http::Uri = url.parse().ok()?;
    let scheme = uri.scheme_str().filter(|s| *s == "http" || *s == "https")?;
    let host = uri.authority()?.as_str();
    if exact {
        let pq = uri.path_and_query().map_or("/", |p| p.as_str());
        let ignore = snap
            .router
            .find(Some(host), uri.path())
            .and_then(|i| snap.routes[i].cache.as_ref())
            .map_or(&[][..], |p| p.ignore_query.as_slice());
        Some(crate::cache::policy::resource_key(scheme, host, pq, ignore))
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
                        "disabled": !s.state.in_service(),
                        "admin_state": s.state.admin_state(),
                        "available": s.state.available(),
                        "in_flight": s.state.in_flight(),
                        "requests": s.state.requests.load(std::sync::atomic::Ordering::Relaxed),
                        "errors": s.state.errors.load(std::sync::atomic::Ordering::Relaxed),
                        "latency_counts": s.state.latency_counts(),
                    })
                })
                .collect();
            json!({
                "name": p.name,
                "algorithm": format!("{:?}", p.algorithm),
                "in_flight": p.in_flight(),
                "queued": p.state.queued(),
                "queue_size": p.queue_size,
                "panic": p.in_panic(),
                "panic_threshold": p.panic_threshold,
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
        "latency_bounds_ms": crate::upstream::state::LATENCY_BOUNDS_MS,
        "pools": pools,
        "routes": routes,
    })
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
