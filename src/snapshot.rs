//! The immutable, ready-to-serve form of a configuration.
//!
//! A [`Snapshot`] is built completely (host names resolved, pools and router made)
//! before it is published through a [`SnapshotHandle`]; a request loads one snapshot
//! in `new_ctx` and keeps it to its end, so a reload never changes the rules under a
//! request in flight. Long-lived state is not owned here: pools point into the
//! [`Registry`], keyed by (pool name, address), so it carries over reloads.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http::{HeaderName, HeaderValue};

use crate::buffer::{ResponseBuffering, SpoolLimits};
use crate::cache::policy::CachePolicy;
use crate::compress::{Coding, Levels, TypeSet};
use crate::config::{self, Config, ServerAddress};
use crate::route::Router;
use crate::tls::{CertFiles, CertStore};
use crate::upstream::{HealthSpec, Pool, PoolServer, Registry, Timeouts};

/// The published snapshot, swapped atomically on reload.
pub type SnapshotHandle = Arc<ArcSwap<Snapshot>>;

/// How long the resolution of one server name may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Header edits of a route, parsed once.
#[derive(Debug, Default, Clone)]
pub struct HeaderEdits {
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

/// Compression policy of a route.
#[derive(Debug, Clone)]
pub struct CompressionPolicy {
    /// In server preference order.
    pub offered: Vec<Coding>,
    pub levels: Levels,
    pub min_length: u64,
    pub types: TypeSet,
    pub event_streams: bool,
}

/// Request buffering of a route.
#[derive(Debug, Clone)]
pub struct RequestBuffering {
    /// Read the whole body before choosing an upstream.
    pub enabled: bool,
    pub max_body: u64,
    pub memory: usize,
}

/// One route, ready to use.
#[derive(Debug)]
pub struct RouteSnap {
    pub name: String,
    pub pool: usize,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub write_timeout: Duration,
    pub websocket_idle_timeout: Duration,
    pub request_headers: HeaderEdits,
    pub response_headers: HeaderEdits,
    pub compression: Option<CompressionPolicy>,
    pub request_buffering: RequestBuffering,
    pub response_buffering: Option<ResponseBuffering>,
    pub cache: Option<CachePolicy>,
    /// Strict-Transport-Security for TLS responses.
    pub hsts: Option<HeaderValue>,
    pub rate_limit: Option<RouteLimit>,
    /// `log_query`: Some(true) always, Some(false) never, None all but WebSocket
    /// handshakes.
    pub log_query: Option<bool>,
}

/// A route's rate limit, with its long-lived buckets.
#[derive(Debug, Clone)]
pub struct RouteLimit {
    pub limiter: Arc<crate::ratelimit::RateLimiter>,
    pub key: config::HashOn,
    pub ipv6_prefix: u8,
}

/// Client-side limits.
#[derive(Debug, Clone, Copy)]
pub struct ClientLimits {
    pub header_timeout: Duration,
    pub keepalive_timeout: Duration,
    pub max_header_bytes: usize,
    pub body_read_timeout: Duration,
    pub send_timeout: Duration,
    /// Bytes per second; 0: no minimum.
    pub min_send_rate: u64,
}

/// One listener as configured.
#[derive(Debug, Clone)]
pub struct ListenerSnap {
    pub addr: SocketAddr,
    pub h2c: bool,
    /// Certificates of a TLS listener (loaded and checked with the config).
    pub certs: Option<Arc<CertStore>>,
    /// `Some(port)`: answer requests with a 308 to https on that port.
    pub redirect_https: Option<u16>,
}

/// What of a listener needs a restart to change: its socket and its protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketIdentity {
    pub addr: SocketAddr,
    pub h2c: bool,
    pub tls: bool,
}

impl ListenerSnap {
    pub fn socket_identity(&self) -> SocketIdentity {
        SocketIdentity {
            addr: self.addr,
            h2c: self.h2c,
            tls: self.certs.is_some(),
        }
    }
}

/// The sockets bound at start, which a reload cannot change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundSockets {
    pub listeners: Vec<SocketIdentity>,
    pub admin: SocketAddr,
}

impl BoundSockets {
    pub fn of(snap: &Snapshot) -> BoundSockets {
        BoundSockets {
            listeners: snap.listeners.iter().map(|l| l.socket_identity()).collect(),
            admin: snap.admin,
        }
    }
}

/// Everything a request needs to know, as of one configuration generation.
#[derive(Debug)]
pub struct Snapshot {
    pub generation: u64,
    pub router: Router,
    pub routes: Vec<RouteSnap>,
    pub pools: Vec<Pool>,
    pub client: ClientLimits,
    /// The listeners this config asks for (their sockets cannot change in-process).
    pub listeners: Vec<ListenerSnap>,
    pub admin: SocketAddr,
    /// Where spooled bodies go.
    pub temp_dir: std::path::PathBuf,
    /// Process-wide memory and disk budgets of buffered bodies.
    pub buffers: crate::buffer::Budgets,
    /// Token for admin actions (none: loopback only).
    pub admin_token: Option<String>,
    /// Names the admin may be addressed by (Host), lowercase.
    pub admin_hosts: Vec<String>,
    /// Proxies whose X-Forwarded-For names the client.
    pub trusted_proxies: Vec<crate::ratelimit::IpNet>,
}

/// Why a validated config could not be turned into a snapshot.
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.join("\n"))]
pub struct BuildError(pub Vec<String>);

impl Snapshot {
    /// Builds a snapshot: resolves server names (asynchronously, never blocking a
    /// runtime thread) and binds runtime state from `registry`.
    pub async fn build(
        cfg: &Config,
        file: &str,
        generation: u64,
        registry: &Registry,
    ) -> Result<Snapshot, BuildError> {
        let mut errors = Vec::new();
        let mut pools = Vec::new();
        for (pi, u) in cfg.upstreams.iter().enumerate() {
            let mut servers = Vec::new();
            for (si, s) in u.servers.iter().enumerate() {
                let addrs = match resolve(&s.address).await {
                    Ok(a) => a,
                    Err(e) => {
                        errors.push(format!(
                            "{file}: upstreams[{pi}].servers[{si}].address: {e}"
                        ));
                        continue;
                    }
                };
                let many = addrs.len() > 1;
                for addr in addrs {
                    if servers.iter().any(|p: &PoolServer| p.addr == addr) {
                        continue;
                    }
                    servers.push(PoolServer {
                        label: if many {
                            format!("{}#{}", s.address, addr)
                        } else {
                            s.address.clone()
                        },
                        addr,
                        weight: s.weight,
                        max_conns: s.max_conns,
                        state: registry.server(&u.name, addr),
                    });
                }
            }
            let health = match u.health_check.as_ref().map(|h| {
                config::parse_status_set(&h.expected_status).map(|expected| HealthSpec {
                    path: h.path.clone(),
                    host: h.host.clone(),
                    interval: h.interval.get(),
                    timeout: h.timeout.get(),
                    rise: h.rise,
                    fall: h.fall,
                    expected,
                })
            }) {
                None => None,
                Some(Ok(spec)) => Some(spec),
                Some(Err(e)) => {
                    errors.push(format!("{file}: upstreams[{pi}].health_check: {e}"));
                    None
                }
            };
            let upstream_tls = crate::upstream::UpstreamTls {
                enabled: u.tls,
                sni: u.sni.clone(),
                verify: u.verify_cert,
            };
            pools.push(
                Pool::new(
                    u.name.clone(),
                    u.algorithm,
                    config::parse_hash_on(&u.hash_on).unwrap_or(config::HashOn::ClientIp),
                    servers,
                    u.retries,
                    u.queue_size,
                    u.queue_timeout.get(),
                    Timeouts {
                        connect: u.timeouts.connect.get(),
                        read: u.timeouts.read.get(),
                        write: u.timeouts.write.get(),
                        idle: u.timeouts.idle.get(),
                    },
                    health,
                    u.passive.consecutive_failures,
                    u.passive.ejection_time.get(),
                    registry.pool(&u.name),
                )
                .with_tls(upstream_tls)
                .with_panic_threshold(u.panic_threshold),
            );
        }
        let mut routes = Vec::new();
        for r in &cfg.routes {
            let Some(pool) = pools.iter().position(|p| p.name == r.upstream) else {
                errors.push(format!(
                    "{file}: route {:?}: no pool {:?}",
                    r.name, r.upstream
                ));
                continue;
            };
            let t = &pools[pool].timeouts;
            routes.push(RouteSnap {
                name: r.name.clone(),
                pool,
                connect_timeout: r.timeouts.connect.map_or(t.connect, |d| d.get()),
                read_timeout: r.timeouts.read.map_or(t.read, |d| d.get()),
                write_timeout: r.timeouts.write.map_or(t.write, |d| d.get()),
                websocket_idle_timeout: r.websocket_idle_timeout.get(),
                log_query: r.log_query,
                request_headers: edits(&r.request_headers),
                response_headers: edits(&r.response_headers),
                compression: compression_policy(&r.compression),
                request_buffering: RequestBuffering {
                    enabled: r.buffering.request,
                    max_body: r.buffering.client_max_body_size.get(),
                    memory: r.buffering.request_memory.get() as usize,
                },
                cache: cache_policy(&r.cache),
                hsts: r
                    .hsts
                    .as_deref()
                    .and_then(|h| HeaderValue::from_str(h).ok()),
                rate_limit: match &r.rate_limit {
                    None => None,
                    Some(rl) => match registry.limiter(&r.name, rl.rate, rl.burst, rl.max_keys) {
                        Ok(limiter) => Some(RouteLimit {
                            limiter,
                            key: config::parse_hash_on(&rl.key).unwrap_or(config::HashOn::ClientIp),
                            ipv6_prefix: rl.ipv6_prefix,
                        }),
                        Err(e) => {
                            errors.push(format!("{file}: route {:?}: rate_limit: {e}", r.name));
                            None
                        }
                    },
                },
                response_buffering: r.buffering.response.then(|| ResponseBuffering {
                    limits: SpoolLimits {
                        memory: r.buffering.response_memory.get() as usize,
                        file: r.buffering.response_max_temp_file.get(),
                        dir: cfg.server.temp_dir.clone(),
                    },
                }),
            });
        }
        let mut listeners = Vec::new();
        for (i, l) in cfg.listeners.iter().enumerate() {
            let Ok(addr) = l.address.parse::<SocketAddr>() else {
                continue;
            };
            let certs = match &l.tls {
                None => None,
                Some(tls) => {
                    let files: Vec<CertFiles> = tls
                        .certificates
                        .iter()
                        .map(|c| CertFiles {
                            cert: c.cert.clone(),
                            key: c.key.clone(),
                        })
                        .collect();
                    match CertStore::load(&files) {
                        Ok(store) => Some(Arc::new(store)),
                        Err(es) => {
                            for e in es {
                                errors
                                    .push(format!("{file}: listeners[{i}].tls.certificates: {e}"));
                            }
                            None
                        }
                    }
                }
            };
            listeners.push(ListenerSnap {
                addr,
                h2c: l.h2c,
                certs,
                redirect_https: l.redirect_to_https.then_some(l.https_port),
            });
        }
        if !errors.is_empty() {
            return Err(BuildError(errors));
        }
        let router = Router::new(
            cfg.routes
                .iter()
                .map(|r| (r.host.as_deref(), r.path_prefix.as_str())),
        );
        let parse_addr = |s: &str| s.parse::<SocketAddr>().ok();
        Ok(Snapshot {
            generation,
            router,
            routes,
            pools,
            client: ClientLimits {
                header_timeout: cfg.client.header_timeout.get(),
                keepalive_timeout: cfg.client.keepalive_timeout.get(),
                max_header_bytes: cfg.client.max_header_bytes,
                body_read_timeout: cfg.client.body_read_timeout.get(),
                send_timeout: cfg.client.send_timeout.get(),
                min_send_rate: cfg.client.min_send_rate.get(),
            },
            temp_dir: cfg.server.temp_dir.clone(),
            buffers: crate::buffer::Budgets {
                used: registry.buffers.clone(),
                memory: cfg.server.buffer_memory.get(),
                disk: cfg.server.buffer_disk.get(),
            },
            admin_token: cfg.admin.token.clone().filter(|t| !t.is_empty()),
            admin_hosts: cfg
                .admin
                .hosts
                .iter()
                .map(|h| h.to_ascii_lowercase())
                .collect(),
            trusted_proxies: crate::ratelimit::parse_trusted_list(&cfg.client.trusted_proxies)
                .unwrap_or_default(),
            listeners,
            admin: parse_addr(&cfg.admin.address)
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9901))),
        })
    }

    pub fn pool(&self, name: &str) -> Option<&Pool> {
        self.pools.iter().find(|p| p.name == name)
    }
}

fn cache_policy(c: &config::RouteCache) -> Option<CachePolicy> {
    if !c.enabled {
        return None;
    }
    let names = |v: &[String]| -> Vec<HeaderName> {
        v.iter()
            .filter_map(|h| HeaderName::from_bytes(h.as_bytes()).ok())
            .collect()
    };
    let secs = |d: Option<config::HumanDuration>| d.map_or(0, |d| d.get().as_secs() as u32);
    Some(CachePolicy {
        key_headers: names(&c.key_headers),
        key_cookies: c.key_cookies.clone(),
        ignore_query: c.ignore_query_params.clone(),
        max_ttl: c.max_ttl.map(|d| d.get()),
        default_ttl: c.default_ttl.map(|d| d.get()).filter(|d| !d.is_zero()),
        stale_while_revalidate: secs(c.stale_while_revalidate),
        stale_if_error: secs(c.stale_if_error),
        store_set_cookie: c.store_set_cookie,
        bypass_cookies: c.bypass_cookies.clone(),
        bypass_headers: names(&c.bypass_headers),
        lock_timeout: c
            .lock_timeout
            .map_or(config::DEFAULT_CACHE_LOCK_TIMEOUT, |d| d.get()),
        heuristic_freshness: c.heuristic_freshness,
        heuristic_max: c.heuristic_max.get(),
        targeted: names(&c.targeted_cache_control),
        strip_targeted: c.strip_targeted_cache_control,
        status_key: c.cache_status_key,
    })
}

fn compression_policy(c: &config::Compression) -> Option<CompressionPolicy> {
    if !c.enabled {
        return None;
    }
    let offered: Vec<Coding> = c
        .algorithms
        .iter()
        .filter_map(|a| Coding::from_token(a))
        .collect();
    if offered.is_empty() {
        return None;
    }
    Some(CompressionPolicy {
        offered,
        levels: Levels {
            gzip: c.gzip_level,
            brotli: c.brotli_level,
            zstd: c.zstd_level,
        },
        min_length: c.min_length.get(),
        types: TypeSet::new(&c.types),
        event_streams: c.event_streams,
    })
}

fn edits(rules: &config::HeaderRules) -> HeaderEdits {
    HeaderEdits {
        set: rules
            .set
            .iter()
            .filter_map(|(k, v)| {
                Some((
                    HeaderName::from_bytes(k.as_bytes()).ok()?,
                    HeaderValue::from_str(v).ok()?,
                ))
            })
            .collect(),
        remove: rules
            .remove
            .iter()
            .filter_map(|k| HeaderName::from_bytes(k.as_bytes()).ok())
            .collect(),
    }
}

/// Resolves a server address without blocking the runtime (pingora's own
/// `HttpPeer::new` resolves synchronously and panics on failure).
pub async fn resolve(address: &str) -> Result<Vec<SocketAddr>, String> {
    match config::parse_server_address(address)? {
        ServerAddress::Ip(a) => Ok(vec![a]),
        ServerAddress::Name { host, port } => {
            let lookup = tokio::net::lookup_host((host.as_str(), port));
            match tokio::time::timeout(RESOLVE_TIMEOUT, lookup).await {
                Err(_) => Err(format!("resolving {address} timed out")),
                Ok(Err(e)) => Err(format!("cannot resolve {address}: {e}")),
                Ok(Ok(addrs)) => {
                    let v: Vec<SocketAddr> = addrs.collect();
                    if v.is_empty() {
                        Err(format!("{address} resolved to no address"))
                    } else {
                        Ok(v)
                    }
                }
            }
        }
    }
}
