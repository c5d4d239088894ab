//! The edge's `ProxyHttp`: one config snapshot per request, route match, server
//! selection with queueing, retries on another server, passive failure marking,
//! forwarding headers, WebSocket pass-through, and the answers the edge makes itself.
//!
//! Hook by hook (see pingora's hook order):
//! - `new_ctx` loads the snapshot once; the request keeps it to the end.
//! - `request_filter` validates what pingora lets through (Host, Content-Length,
//!   header size on h2), matches the route (404 without one) and sets client timeouts.
//! - `upstream_peer` claims a server (may wait in the pool queue; 503 at once when
//!   every server is down) and sets every upstream timeout (pingora sets none).
//! - `fail_to_connect` / `error_while_proxy` mark passive failures and decide
//!   retries: a failed connect is always retried on another server, other errors
//!   (reset, close, timeout) only for idempotent requests whose body is still
//!   buffered and whose response has not started, within `retries`.
//! - `logging` records metrics; the server lease ends when the context drops.

pub mod headers;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{Error, ErrorSource, ErrorType};

use crate::buffer::{BufferedBody, Spool, SpoolError, SpoolLimits};
use crate::cache::policy;
use crate::cache::store::CacheStore;
use crate::compress::{self, Encoder};
use crate::metrics::{status_class, Metrics};
use crate::snapshot::{CompressionPolicy, RequestBuffering, Snapshot, SnapshotHandle};
use crate::upstream::{Lease, Unavailable};
use pingora::cache::key::HashBinary;
use pingora::cache::{
    CacheKey, CacheMeta, CacheOptionOverrides, ForcedFreshness, HitHandler, NoCacheReason,
    RespCacheable,
};

/// The proxy logic. Cheap to share: everything it holds is behind an `Arc`.
pub struct Edge {
    pub snapshots: SnapshotHandle,
    pub metrics: Arc<Metrics>,
    /// The response cache (created once at start, shared by every route that caches).
    pub cache: Option<&'static CacheStore>,
    /// The access log (written off the request path).
    pub access_log: Option<Arc<crate::accesslog::AccessLog>>,
}

/// Per-request state.
pub struct Ctx {
    pub snap: Arc<Snapshot>,
    pub route: Option<usize>,
    pub request_id: String,
    pub start: Instant,
    pub client_ip: Option<IpAddr>,
    /// The peer is one of `client.trusted_proxies` (its forwarding headers count).
    peer_trusted: bool,
    hash_key: Vec<u8>,
    lease: Option<Lease>,
    /// Server indices already tried by this request.
    tried: Vec<usize>,
    attempts: u32,
    upgraded: bool,
    /// Retry-After seconds for a 429.
    retry_after_secs: Option<u64>,
    /// When the request arrived (for the access log).
    arrived: std::time::SystemTime,
    /// When the last upstream attempt was started (the request time of RFC 9111
    /// §4.2.3's age calculation).
    upstream_sent: std::time::SystemTime,
    /// When the last upstream attempt started, and when its response last
    /// delivered something (header or body): the access log's upstream time.
    upstream_timing: Option<(Instant, Instant)>,
    /// The status the edge itself answered with, if it did.
    edge_status: Option<u16>,
    retry_after: bool,
    /// The text of a failure the edge decided itself (503 queue full, 413, ...);
    /// other failures are told by status only, never with the error's context.
    edge_reason: Option<&'static str>,
    /// Accept-Encoding of the request, for negotiation at response time.
    accept_encoding: Vec<String>,
    is_head: bool,
    has_range: bool,
    /// The whole request body, read before choosing an upstream (request buffering).
    request_body: Option<Bytes>,
    /// `request_body` is only its first part (the buffering budgets were spent): the
    /// rest streams from the client, and the request cannot be sent again.
    request_body_partial: bool,
    /// Body bytes seen so far when the body streams (for client_max_body_size).
    streamed_body: u64,
    /// The upstream said `X-Accel-Buffering: no`.
    no_buffering: bool,
    encoder: Option<Encoder>,
    buffer: Option<BufferedBody>,
    /// The cache was enabled for this request.
    cache_enabled: bool,
    /// The route's bypass rules skipped the cache.
    cache_bypassed: bool,
    /// Why the response was not stored, when it was not.
    cache_uncacheable: Option<&'static str>,
    /// The response was admitted to the cache.
    cache_stored: bool,
    /// Primary cache key of this request.
    cache_key: Option<String>,
    /// Cache outcome for metrics, decided when the response header goes out.
    cache_outcome: Option<policy::Outcome>,
    /// The origin's 304 to a revalidation, whose fields update the stored response
    /// (RFC 9111 §4.3.4) when `response_cache_filter` sees the merged header.
    cache_304: Option<Box<ResponseHeader>>,
    /// The client's request directives forced a fresh stored response to be
    /// revalidated (Cache-Status `fwd=request`).
    cache_forced: bool,
    /// Some variant of this request's primary key was stored when the request
    /// arrived (a miss is then a vary-miss).
    cache_uri_stored: bool,
}

impl Ctx {
    fn route(&self) -> Option<&crate::snapshot::RouteSnap> {
        self.route.map(|i| &self.snap.routes[i])
    }

    fn pool(&self) -> Option<&crate::upstream::Pool> {
        self.route().map(|r| &self.snap.pools[r.pool])
    }

    fn route_name(&self) -> &str {
        self.route().map_or("-", |r| r.name.as_str())
    }
}

fn edge_error(status: u16, why: &'static str) -> Box<Error> {
    Error::explain(ErrorType::HTTPStatus(status), why)
}

impl Edge {
    /// Marks a passive failure of the current server; counts an ejection.
    fn mark_failure(&self, ctx: &Ctx) {
        let (Some(lease), Some(pool)) = (&ctx.lease, ctx.pool()) else {
            return;
        };
        let label = &pool.servers[lease.index].label;
        let counter = match pool.record_failure(lease.index) {
            crate::upstream::Failure::Counted => return,
            crate::upstream::Failure::Ejected => {
                log::warn!(
                    "pool {} server {label} ejected for {:?}",
                    pool.name,
                    pool.ejection_time
                );
                &self.metrics.ejections
            }
            crate::upstream::Failure::KeptLast => {
                log::warn!(
                    "pool {} server {label} failing but not ejected: no other server is available",
                    pool.name
                );
                &self.metrics.ejections_refused
            }
        };
        counter
            .with_label_values(&[pool.name.as_str(), label.as_str()])
            .inc();
    }

    /// Sets `Cache-Status` (RFC 9211) and notes the outcome for metrics.
    fn cache_status(&self, session: &Session, resp: &mut ResponseHeader, ctx: &mut Ctx) {
        use pingora::cache::CachePhase;
        let now = std::time::SystemTime::now();
        let ttl = |c: &pingora::cache::HttpCache| -> Option<i64> {
            let meta = c.maybe_cache_meta()?;
            Some(match meta.fresh_until().duration_since(now) {
                Ok(d) => d.as_secs() as i64,
                Err(e) => -(e.duration().as_secs() as i64),
            })
        };
        let c = &session.cache;
        let (outcome, ttl) = if ctx.cache_bypassed {
            (policy::Outcome::Bypass, None)
        } else if ctx.cache_forced {
            (policy::Outcome::Request, ttl(c))
        } else {
            match c.phase() {
                CachePhase::Hit => (policy::Outcome::Hit, ttl(c)),
                CachePhase::StaleUpdating => (policy::Outcome::StaleWhileRevalidate, ttl(c)),
                CachePhase::Stale => (policy::Outcome::StaleIfError, ttl(c)),
                CachePhase::Expired => (policy::Outcome::Expired, None),
                CachePhase::Revalidated | CachePhase::RevalidatedNoCache(_) => {
                    (policy::Outcome::Revalidated, ttl(c))
                }
                CachePhase::Miss if ctx.cache_uncacheable.is_some() => {
                    (policy::Outcome::Uncacheable, None)
                }
                CachePhase::Miss => {
                    // something was stored for the URI, but no variant matched
                    let miss = if ctx.cache_uri_stored {
                        policy::Outcome::VaryMiss
                    } else {
                        policy::Outcome::Miss
                    };
                    (miss, None)
                }
                _ => (policy::Outcome::Uncacheable, None),
            }
        };
        let stored = ctx.cache_stored
            && matches!(
                outcome,
                policy::Outcome::Miss
                    | policy::Outcome::VaryMiss
                    | policy::Outcome::Request
                    | policy::Outcome::Expired
                    | policy::Outcome::Revalidated
            );
        let detail = ctx.cache_uncacheable.or(match c.phase() {
            CachePhase::Disabled(reason) => Some(reason.as_str()),
            _ => None,
        });
        let key = ctx
            .route()
            .and_then(|r| r.cache.as_ref())
            .filter(|p| p.status_key)
            .and(ctx.cache_key.as_deref());
        let value = policy::cache_status(outcome, ttl, stored, detail, key);
        let _ = resp.insert_header("cache-status", value);
        // RFC 9111 §4: every response served from storage carries Age; pingora adds
        // it to hits and stale answers, not to one just revalidated by a 304
        if outcome == policy::Outcome::Revalidated && !resp.headers.contains_key(http::header::AGE)
        {
            if let Some(meta) = c.maybe_cache_meta() {
                let _ = resp.insert_header(http::header::AGE, meta.age().as_secs());
            }
        }
        ctx.cache_outcome = Some(outcome);
    }

    /// A successful POST/PUT/DELETE/PATCH invalidates what is stored for its URI and
    /// for the Location and Content-Location it names on the same host (RFC 9111 §4.4).
    fn invalidate_after_unsafe_method(&self, session: &Session, status: u16, ctx: &Ctx) {
        let Some(store) = self.cache else { return };
        let Some(policy) = ctx.route.and_then(|i| ctx.snap.routes[i].cache.as_ref()) else {
            return;
        };
        let req = session.req_header();
        if req.method.is_safe() || !(200..400).contains(&status) {
            return;
        }
        let scheme = scheme(session);
        let host = headers::request_host(req).unwrap_or("").to_owned();
        let resource = |pq: &str| policy::resource_key(scheme, &host, pq, &policy.ignore_query);
        let mut keys = vec![resource(
            req.uri.path_and_query().map_or("/", |p| p.as_str()),
        )];
        if let Some(resp) = session.response_written() {
            for name in [http::header::LOCATION, http::header::CONTENT_LOCATION] {
                let Some(target) = resp.headers.get(&name).and_then(|v| v.to_str().ok()) else {
                    continue;
                };
                let Ok(uri) = target.parse::<http::Uri>() else {
                    continue;
                };
                if uri.authority().is_some_and(|a| {
                    crate::route::canonical_host(a.as_str()) != crate::route::canonical_host(&host)
                }) {
                    continue; // another host: not ours to invalidate
                }
                let Some(pq) = uri.path_and_query().map(|p| p.as_str()) else {
                    continue;
                };
                if pq.starts_with('/') {
                    keys.push(resource(pq));
                }
            }
        }
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            for key in keys {
                let n = store.invalidate_resource(&key).await;
                if n > 0 {
                    metrics
                        .cache_purges
                        .with_label_values(&["invalidation"])
                        .inc_by(n as u64);
                }
            }
        });
    }

    /// Decides compression for a response and rewrites its header accordingly.
    fn start_compression(
        &self,
        policy: &CompressionPolicy,
        status: u16,
        head_only: bool,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) {
        if compress::eligible(
            status,
            head_only,
            ctx.has_range,
            &resp.headers,
            &policy.types,
            policy.min_length,
            policy.event_streams,
        )
        .is_err()
        {
            return;
        }
        // the answer depends on Accept-Encoding even when this client gets identity
        if let Some(vary) = compress::merged_vary(&resp.headers) {
            let _ = resp.insert_header(http::header::VARY, vary);
        }
        let Some(coding) = compress::negotiate(
            ctx.accept_encoding.iter().map(String::as_str),
            &policy.offered,
        ) else {
            return;
        };
        let event_stream = resp
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(compress::is_event_stream);
        let Ok(encoder) = Encoder::new(coding, policy.levels, event_stream) else {
            return;
        };
        let _ = resp.insert_header(http::header::CONTENT_ENCODING, coding.token());
        resp.remove_header(&http::header::CONTENT_LENGTH);
        resp.remove_header(&http::header::ACCEPT_RANGES);
        match compress::weakened_etag(&resp.headers) {
            compress::EtagChange::Keep => {}
            compress::EtagChange::Set(v) => {
                let _ = resp.insert_header(http::header::ETAG, v);
            }
            compress::EtagChange::Remove => {
                resp.remove_header(&http::header::ETAG);
            }
        }
        self.metrics
            .compressed_responses
            .with_label_values(&[coding.token()])
            .inc();
        ctx.encoder = Some(encoder);
    }

    /// Checks the route's rate limit; the Retry-After seconds when over it.
    fn rate_limited(&self, session: &Session, ctx: &Ctx) -> Option<u64> {
        let r = ctx.route()?;
        let limit = r.rate_limit.as_ref()?;
        let decision = match &limit.key {
            crate::config::HashOn::ClientIp => {
                let ip = ctx.client_ip?;
                let key = crate::ratelimit::IpKey::new(ip, limit.ipv6_prefix);
                limit
                    .limiter
                    .check(key.as_bytes(), std::time::Instant::now())
            }
            other => {
                let key = headers::hash_key(session.req_header(), other, ctx.client_ip);
                limit.limiter.check(&key, std::time::Instant::now())
            }
        };
        let secs = decision.retry_after_secs()?;
        self.metrics
            .rate_limited
            .with_label_values(&[r.name.as_str()])
            .inc();
        Some(secs)
    }

    /// Writes the access log line of a finished request.
    fn access_log(&self, session: &Session, status: u16, ctx: &Ctx) {
        let Some(log) = &self.access_log else { return };
        let req = session.req_header();
        let header = |name: http::header::HeaderName| {
            req.headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let upstream = ctx.pool().and_then(|p| {
            ctx.tried
                .last()
                .or(ctx.lease.as_ref().map(|l| &l.index))
                .map(|&i| p.servers[i].addr.to_string())
        });
        let rec = crate::accesslog::LogRecord {
            remote_addr: ctx.client_ip,
            time: ctx.arrived,
            method: req.method.to_string(),
            uri: logged_uri(req, ctx.route().and_then(|r| r.log_query), ctx.upgraded),
            protocol: format!("{:?}", req.version),
            status,
            bytes_sent: session.body_bytes_sent() as u64,
            referer: header(http::header::REFERER),
            user_agent: header(http::header::USER_AGENT),
            request_id: Some(ctx.request_id.clone()),
            route: ctx.route().map(|r| r.name.clone()),
            upstream,
            upstream_time_ms: ctx
                .upstream_timing
                .map(|(start, last)| last.duration_since(start).as_secs_f64() * 1000.0),
            request_time_ms: ctx.start.elapsed().as_secs_f64() * 1000.0,
            cache_status: ctx.cache_outcome.map(|o| o.label().to_owned()),
            compression: ctx.encoder.as_ref().map(|e| e.coding.token().to_owned()),
            host: headers::request_host(req).map(str::to_owned),
        };
        log.log(rec);
    }

    /// The https port to redirect to, when the request came in on a cleartext
    /// listener configured to redirect.
    fn redirect_port(&self, session: &Session, ctx: &Ctx) -> Option<u16> {
        let local = session.server_addr().and_then(|a| a.as_inet()).copied()?;
        ctx.snap
            .listeners
            .iter()
            .filter(|l| l.addr.port() == local.port())
            .find(|l| l.addr.ip() == local.ip() || l.addr.ip().is_unspecified())
            .and_then(|l| l.redirect_https)
    }

    /// Answers 413 and counts it.
    async fn body_too_large(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        self.metrics.body_too_large.inc();
        respond(session, ctx, 413, "request body too large").await;
        Ok(true)
    }

    /// Reads the whole request body before any upstream is chosen, so a slow upload
    /// never ties up an app server. 413 once it passes `client_max_body_size`.
    async fn buffer_request_body(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        cfg: &RequestBuffering,
    ) -> Result<bool> {
        if session
            .req_header()
            .headers
            .get(http::header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
            && !session.is_http2()
        {
            let cont = ResponseHeader::build(100, Some(0))?;
            session
                .as_downstream_mut()
                .write_response_header(Box::new(cont))
                .await?;
        }
        let mut spool = Spool::new(
            SpoolLimits {
                memory: cfg.memory.min(cfg.max_body as usize),
                file: cfg.max_body,
                dir: ctx.snap.temp_dir.clone(),
            },
            &ctx.snap.buffers,
        );
        let internal = |what, e| Error::because(ErrorType::InternalError, what, e);
        // a body that cannot be read (broken framing, a stall, a close) is the
        // client's doing: 400/408, never a 5xx (see fail_to_proxy)
        while let Some(chunk) = session
            .read_request_body()
            .await
            .map_err(|e| e.into_down())?
        {
            match spool.push(chunk.clone()).await {
                Ok(()) => {}
                Err(SpoolError::Full) => return self.body_too_large(session, ctx).await,
                Err(SpoolError::Budget) => {
                    // the budgets are spent: send what was read, stream the rest
                    spool
                        .push_over_budget(chunk)
                        .await
                        .map_err(|e| internal("spooling the request body", e))?;
                    ctx.request_body_partial = true;
                    break;
                }
                Err(e) => return Err(internal("spooling the request body", e)),
            }
        }
        let storage = match (ctx.request_body_partial, spool.spilled()) {
            (true, _) => "streamed",
            (false, true) => "file",
            (false, false) => "memory",
        };
        self.metrics
            .buffered_body("request", storage, spool.spilled(), spool.refusals());
        let body = spool
            .take()
            .map_err(|e| internal("reading the spooled request body", e))?;
        ctx.request_body = Some(body);
        Ok(false)
    }

    /// Whether another attempt is allowed (the retry budget is not spent and a server
    /// other than the one that just failed is left), and counts it.
    fn may_retry(&self, ctx: &Ctx) -> bool {
        let Some(pool) = ctx.pool() else { return false };
        // the failing server joins `tried` when the next attempt starts
        let others_left = ctx.tried.len() + 1 < pool.servers.len();
        let ok = ctx.attempts <= pool.retries && others_left;
        if ok {
            self.metrics
                .retries
                .with_label_values(&[pool.name.as_str()])
                .inc();
        }
        ok
    }
}

#[async_trait]
impl ProxyHttp for Edge {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx {
            snap: self.snapshots.load_full(),
            route: None,
            request_id: String::new(),
            start: Instant::now(),
            client_ip: None,
            peer_trusted: false,
            hash_key: Vec::new(),
            lease: None,
            tried: Vec::new(),
            attempts: 0,
            upgraded: false,
            retry_after_secs: None,
            arrived: std::time::SystemTime::now(),
            upstream_sent: std::time::SystemTime::now(),
            upstream_timing: None,
            edge_status: None,
            retry_after: false,
            edge_reason: None,
            accept_encoding: Vec::new(),
            is_head: false,
            has_range: false,
            request_body: None,
            request_body_partial: false,
            streamed_body: 0,
            no_buffering: false,
            encoder: None,
            buffer: None,
            cache_enabled: false,
            cache_bypassed: false,
            cache_uncacheable: None,
            cache_stored: false,
            cache_key: None,
            cache_outcome: None,
            cache_304: None,
            cache_forced: false,
            cache_uri_stored: false,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        ctx.start = Instant::now();
        // from here on, `is_upgrade_req()` means a WebSocket handshake and nothing else
        if !session.is_http2() {
            headers::drop_non_websocket_upgrade(session.req_header_mut());
        }
        let req = session.req_header();
        ctx.request_id = headers::request_id(req.headers.get(headers::X_REQUEST_ID));
        let peer = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        ctx.peer_trusted = peer.is_some_and(|p| {
            ctx.snap
                .trusted_proxies
                .iter()
                .any(|net| net.contains(&p.to_canonical()))
        });
        ctx.client_ip = peer.map(|peer| {
            if ctx.snap.trusted_proxies.is_empty() {
                return peer;
            }
            let xff: Vec<&str> = req
                .headers
                .get_all(headers::X_FORWARDED_FOR)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            let joined = xff.join(",");
            crate::ratelimit::client_ip(
                peer,
                (!joined.is_empty()).then_some(joined.as_str()),
                &ctx.snap.trusted_proxies,
            )
        });
        let is_h1 = !session.is_http2();
        if let Err(invalid) = headers::check_request(
            session.req_header(),
            is_h1,
            ctx.snap.client.max_header_bytes,
        ) {
            self.metrics
                .rejected_requests
                .with_label_values(&[&invalid.status().to_string()])
                .inc();
            respond(session, ctx, invalid.status(), invalid.reason()).await;
            return Ok(true);
        }
        if let Some(port) = self.redirect_port(session, ctx) {
            redirect_to_https(session, ctx, port).await;
            return Ok(true);
        }
        let req = session.req_header();
        let host = headers::request_host(req);
        let path = req.uri.path();
        let Some(route) = ctx.snap.router.find(host, path) else {
            respond(session, ctx, 404, "no route for this host and path").await;
            return Ok(true);
        };
        ctx.route = Some(route);
        if let Some(retry) = self.rate_limited(session, ctx) {
            ctx.retry_after_secs = Some(retry);
            respond(session, ctx, 429, "too many requests").await;
            return Ok(true);
        }
        let r = &ctx.snap.routes[route];
        let pool = &ctx.snap.pools[r.pool];
        if pool.algorithm == crate::config::Algorithm::Hash {
            ctx.hash_key = headers::hash_key(session.req_header(), &pool.hash_on, ctx.client_ip);
        }
        let req = session.req_header();
        ctx.is_head = req.method == http::Method::HEAD;
        ctx.has_range = req.headers.contains_key(http::header::RANGE);
        ctx.accept_encoding = req
            .headers
            .get_all(http::header::ACCEPT_ENCODING)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(str::to_owned)
            .collect();
        let client = ctx.snap.client;
        if session.is_upgrade_req() {
            session.set_read_timeout(Some(r.websocket_idle_timeout));
            session.set_write_timeout(Some(r.websocket_idle_timeout));
            return Ok(false);
        }
        session.set_read_timeout(Some(client.body_read_timeout));
        session.set_write_timeout(Some(client.send_timeout));
        if client.min_send_rate > 0 {
            session.set_min_send_rate(Some(client.min_send_rate as usize));
        }
        let buffering = r.request_buffering.clone();
        if let Some(len) = declared_length(session.req_header()) {
            if len > buffering.max_body {
                return self.body_too_large(session, ctx).await;
            }
        }
        if buffering.enabled && !session.as_mut().is_body_empty() {
            return self.buffer_request_body(session, ctx, &buffering).await;
        }
        Ok(false)
    }

    fn prebuffered_request_body(&self, _session: &Session, ctx: &Ctx) -> Option<Bytes> {
        ctx.request_body.clone()
    }

    async fn request_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<()> {
        // a streamed (unbuffered) body is still held to client_max_body_size
        if (ctx.request_body.is_none() || ctx.request_body_partial)
            && !ctx.upgraded
            && !session.was_upgraded()
        {
            let max = ctx.route().map(|r| r.request_buffering.max_body);
            if let (Some(b), Some(max)) = (body.as_ref(), max) {
                ctx.streamed_body += b.len() as u64;
                if ctx.streamed_body > max {
                    self.metrics.body_too_large.inc();
                    ctx.edge_reason = Some("request body too large");
                    return Err(edge_error(413, "request body too large"));
                }
            }
        }
        Ok(())
    }

    fn request_cache_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<()> {
        let snap = ctx.snap.clone();
        let (Some(store), Some(policy)) = (
            self.cache,
            ctx.route.and_then(|i| snap.routes[i].cache.as_ref()),
        ) else {
            return Ok(());
        };
        let req = session.req_header();
        if !(req.method == http::Method::GET || req.method == http::Method::HEAD)
            || session.is_upgrade_req()
        {
            return Ok(());
        }
        if policy::bypass(req, policy) {
            ctx.cache_bypassed = true;
            return Ok(());
        }
        let mut overrides = CacheOptionOverrides::default();
        overrides.wait_timeout = Some(policy.lock_timeout);
        session.cache.enable(
            store.storage,
            store.eviction,
            Some(store.predictor),
            Some(store.lock),
            Some(overrides),
        );
        session
            .cache
            .set_max_file_size_bytes(store.max_object_bytes);
        ctx.cache_enabled = true;
        let req = session.req_header();
        let host = headers::request_host(req).unwrap_or("");
        let key = policy::primary_key(scheme(session), host, req, policy);
        ctx.cache_uri_stored = store.has_primary(&key);
        ctx.cache_key = Some(key);
        Ok(())
    }

    fn cache_key_callback(&self, session: &Session, ctx: &mut Ctx) -> Result<CacheKey> {
        let policy = ctx
            .route
            .and_then(|i| ctx.snap.routes[i].cache.as_ref())
            .ok_or_else(|| edge_error(500, "cache enabled without a cache policy"))?;
        let key = match &ctx.cache_key {
            Some(k) => k.clone(),
            None => {
                let req = session.req_header();
                let host = headers::request_host(req).unwrap_or("");
                let key = policy::primary_key(scheme(session), host, req, policy);
                ctx.cache_key = Some(key.clone());
                key
            }
        };
        Ok(CacheKey::new(key, ""))
    }

    fn cache_vary_filter(
        &self,
        meta: &CacheMeta,
        ctx: &mut Ctx,
        req: &pingora::http::RequestHeader,
    ) -> Option<HashBinary> {
        let coding = ctx
            .route
            .and_then(|i| ctx.snap.routes[i].compression.as_ref())
            .and_then(|c| {
                compress::negotiate(ctx.accept_encoding.iter().map(String::as_str), &c.offered)
            })
            .map_or("identity", |c| c.token());
        policy::variance(meta.response_header(), req, coding)
    }

    async fn cache_hit_filter(
        &self,
        session: &mut Session,
        _meta: &CacheMeta,
        _hit_handler: &mut HitHandler,
        is_fresh: bool,
        ctx: &mut Ctx,
    ) -> Result<Option<ForcedFreshness>> {
        // a client asking for revalidation gets it (and no stale answer)
        if is_fresh && policy::request_wants_revalidation(session.req_header()) {
            ctx.cache_forced = true;
            return Ok(Some(ForcedFreshness::ForceExpired));
        }
        Ok(None)
    }

    fn response_cache_filter(
        &self,
        session: &Session,
        resp: &ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<RespCacheable> {
        let Some(policy) = ctx.route.and_then(|i| ctx.snap.routes[i].cache.as_ref()) else {
            return Ok(RespCacheable::Uncacheable(NoCacheReason::NeverEnabled));
        };
        let auth = session
            .req_header()
            .headers
            .contains_key(http::header::AUTHORIZATION);
        // after a 304, pingora merged only a few of its fields into the stored
        // header; the RFC wants every field but framing and content ones
        let updated = ctx.cache_304.take().map(|fresh| {
            let mut merged = resp.clone();
            policy::update_from_304(&mut merged, &fresh);
            merged
        });
        let resp = updated.as_ref().unwrap_or(resp);
        let now = std::time::SystemTime::now();
        // from when the request went upstream (at the latest: its arrival)
        let delay = now.duration_since(ctx.upstream_sent).unwrap_or_default();
        match policy::decide(auth, resp, policy, now, delay) {
            policy::Decision::Store {
                fresh_until,
                created,
                stale_while_revalidate,
                stale_if_error,
                strip,
            } => {
                let mut header = resp.clone();
                for name in &strip {
                    header.remove_header(name.as_str());
                }
                ctx.cache_stored = true;
                ctx.cache_uncacheable = None;
                Ok(RespCacheable::Cacheable(CacheMeta::new(
                    fresh_until,
                    created,
                    stale_while_revalidate,
                    stale_if_error,
                    header,
                )))
            }
            policy::Decision::NoStore(why) => {
                ctx.cache_stored = false;
                ctx.cache_uncacheable = Some(why);
                Ok(RespCacheable::Uncacheable(NoCacheReason::Custom(why)))
            }
        }
    }

    fn should_serve_stale(
        &self,
        _session: &mut Session,
        _ctx: &mut Ctx,
        error: Option<&Error>,
    ) -> bool {
        match error {
            // stale-while-revalidate: pingora has checked the response's window
            None => true,
            // stale-if-error: the origin failed, answered 5xx, or every server is down
            Some(e) => {
                e.esource() == &ErrorSource::Upstream
                    || matches!(e.etype(), ErrorType::HTTPStatus(code) if *code >= 500)
            }
        }
    }

    async fn upstream_peer(&self, session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let snap = ctx.snap.clone();
        let Some(route) = ctx.route.map(|i| &snap.routes[i]) else {
            return Err(edge_error(500, "no route chosen"));
        };
        let pool = &snap.pools[route.pool];
        // the previous attempt's lease ends here, before the next one is taken
        if let Some(prev) = ctx.lease.take() {
            ctx.tried.push(prev.index);
        }
        let waited = Instant::now();
        let lease = match pool.acquire(&ctx.hash_key, &ctx.tried).await {
            Ok(l) => l,
            Err(why) => {
                let (status, text, reason) = match why {
                    Unavailable::NoneAvailable => (503, "no healthy upstream server", "down"),
                    Unavailable::AllTried => (502, "every upstream server failed", "tried"),
                    Unavailable::QueueFull => (503, "upstream queue is full", "full"),
                    Unavailable::QueueTimeout => (503, "timed out waiting for a server", "timeout"),
                };
                if matches!(why, Unavailable::QueueFull | Unavailable::QueueTimeout) {
                    self.metrics
                        .queue_rejections
                        .with_label_values(&[pool.name.as_str(), reason])
                        .inc();
                }
                ctx.retry_after = status == 503;
                ctx.edge_reason = Some(text);
                return Err(edge_error(status, text));
            }
        };
        self.metrics
            .queue_wait
            .observe(waited.elapsed().as_secs_f64());
        self.metrics.upstream_requests.inc();
        if lease.panic {
            self.metrics.panic.with_label_values(&[&pool.name]).inc();
        }
        ctx.attempts += 1;
        ctx.upstream_sent = std::time::SystemTime::now();
        let started = Instant::now();
        ctx.upstream_timing = Some((started, started));
        let server = &pool.servers[lease.index];
        let sni = if pool.tls.enabled {
            pool.sni_for(server)
        } else {
            String::new()
        };
        let mut peer = Box::new(HttpPeer::new(server.addr, pool.tls.enabled, sni));
        let o = &mut peer.options;
        if pool.tls.enabled {
            o.verify_cert = pool.tls.verify;
            o.verify_hostname = pool.tls.verify;
        }
        o.connection_timeout = Some(route.connect_timeout);
        o.total_connection_timeout = Some(route.connect_timeout);
        o.idle_timeout = Some(pool.timeouts.idle);
        if session.is_upgrade_req() {
            o.read_timeout = Some(route.websocket_idle_timeout);
            o.write_timeout = Some(route.websocket_idle_timeout);
        } else {
            o.read_timeout = Some(route.read_timeout);
            o.write_timeout = Some(route.write_timeout);
        }
        ctx.lease = Some(lease);
        Ok(peer)
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut pingora::http::RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let tls = scheme(session) == "https";
        let host = headers::request_host(session.req_header()).map(str::to_owned);
        headers::add_forwarding(
            upstream,
            ctx.client_ip,
            tls,
            host.as_deref(),
            &ctx.request_id,
            ctx.peer_trusted,
        );
        if ctx.request_body.is_some() {
            // the edge already answered `Expect: 100-continue` and holds the body
            upstream.remove_header(&http::header::EXPECT);
        }
        if let Some(r) = ctx.route() {
            headers::apply_request_edits(upstream, &r.request_headers);
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if let Some(lease) = &ctx.lease {
            if resp.status.is_server_error() {
                self.mark_failure(ctx);
            } else {
                lease.server.record_success();
            }
        }
        if let Some((_, last)) = ctx.upstream_timing.as_mut() {
            *last = Instant::now();
        }
        headers::strip_hop_by_hop_response(resp);
        if resp.status.as_u16() == 304 && session.cache.enabled() {
            ctx.cache_304 = Some(Box::new(resp.clone()));
        }
        if let Some(v) = resp.headers.get("x-accel-buffering") {
            ctx.no_buffering = v.as_bytes().eq_ignore_ascii_case(b"no");
            resp.remove_header("x-accel-buffering");
        }
        // Compression happens here, upstream of the cache: a cacheable response is
        // stored compressed, once per negotiated coding (see cache_vary_filter), and a
        // hit is never compressed again.
        let snap = ctx.snap.clone();
        if let Some(policy) = ctx.route.and_then(|i| snap.routes[i].compression.as_ref()) {
            if !session.is_upgrade_req() && resp.status.as_u16() != 101 {
                let status = resp.status.as_u16();
                let head_only = ctx.is_head && !session.cache.enabled();
                self.start_compression(policy, status, head_only, resp, ctx);
            }
        }
        Ok(())
    }

    fn upstream_response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<Option<std::time::Duration>> {
        if let Some((_, last)) = ctx.upstream_timing.as_mut() {
            *last = Instant::now();
        }
        if let Some(enc) = ctx.encoder.as_mut() {
            let input = body.take().unwrap_or_default();
            let out = enc.encode(&input, end_of_stream).map_err(|e| {
                Error::because(ErrorType::InternalError, "compressing the response", e)
            })?;
            *body = (!out.is_empty()).then_some(out);
            if end_of_stream {
                let algo = enc.coding.token();
                self.metrics
                    .compression_bytes
                    .with_label_values(&[algo, "in"])
                    .inc_by(enc.bytes_in);
                self.metrics
                    .compression_bytes
                    .with_label_values(&[algo, "out"])
                    .inc_by(enc.bytes_out);
            }
        }
        Ok(None)
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if resp.status.as_u16() == 101 && !ctx.upgraded {
            ctx.upgraded = true;
            self.metrics.websockets_active.inc();
        }
        let _ = resp.insert_header(
            bytes::Bytes::from_static(headers::XRID_WIRE),
            ctx.request_id.clone(),
        );
        let snap = ctx.snap.clone();
        let Some(r) = ctx.route.map(|i| &snap.routes[i]) else {
            return Ok(());
        };
        headers::apply_response_edits(resp, &r.response_headers);
        if let Some(hsts) = &r.hsts {
            if scheme(session) == "https" {
                let _ = resp.insert_header(http::header::STRICT_TRANSPORT_SECURITY, hsts.clone());
            }
        }
        if ctx.upgraded || session.is_upgrade_req() {
            return Ok(());
        }
        let status = resp.status.as_u16();
        if ctx.cache_enabled || ctx.cache_bypassed {
            self.cache_status(session, resp, ctx);
        } else if r.cache.is_some() && self.cache.is_some() {
            // a method the cache does not serve (RFC 9211 fwd=method)
            let _ = resp.insert_header("cache-status", "wingman-edge; fwd=method");
        }
        if let Some(policy) = r.cache.as_ref().filter(|p| p.strip_targeted) {
            for name in &policy.targeted {
                resp.remove_header(name);
            }
        }
        let event_stream = resp
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(compress::is_event_stream);
        if let Some(cfg) = &r.response_buffering {
            let has_body = !ctx.is_head && status >= 200 && status != 204 && status != 304;
            // a response going through the cache is already decoupled from the upstream
            // (the cache fill runs at upstream speed) and ends without a final body chunk
            let via_cache = session.cache.enabled();
            if has_body && !event_stream && !ctx.no_buffering && !via_cache {
                ctx.buffer = Some(BufferedBody::new(cfg, &ctx.snap.buffers));
            }
        }
        Ok(())
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<Option<std::time::Duration>> {
        if let Some(buf) = ctx.buffer.as_mut() {
            let input = body.take().unwrap_or_default();
            *body = buf.push(input, end_of_stream).filter(|b| !b.is_empty());
        }
        Ok(None)
    }

    fn has_response_body_backlog(&self, ctx: &Ctx) -> bool {
        ctx.buffer.as_ref().is_some_and(BufferedBody::has_backlog)
    }

    async fn response_body_backlog(
        &self,
        _session: &mut Session,
        _end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<Option<Bytes>> {
        match ctx.buffer.as_mut() {
            None => Ok(None),
            Some(buf) => buf
                .next_out()
                .await
                .map_err(|e| Error::because(ErrorType::InternalError, "buffering the response", e)),
        }
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Ctx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        if let (Some(lease), Some(pool)) = (&ctx.lease, ctx.pool()) {
            self.metrics
                .connect_failures
                .with_label_values(&[pool.name.as_str(), pool.servers[lease.index].label.as_str()])
                .inc();
        }
        self.mark_failure(ctx);
        // nothing reached the upstream: safe to retry any method elsewhere
        let retry = self.may_retry(ctx);
        e.set_retry(retry);
        e
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut Ctx,
        _client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        if e.esource() == &ErrorSource::Upstream {
            self.mark_failure(ctx);
        }
        // Like nginx's `proxy_next_upstream error timeout`: an idempotent request whose
        // body is still fully buffered is retried elsewhere when the upstream fails
        // before the response started; anything else was possibly acted on, or is
        // already partly with the client.
        let replayable = session.req_header().method.is_idempotent()
            && !session.as_ref().retry_buffer_truncated()
            && !ctx.request_body_partial
            && session.response_written().is_none()
            && !ctx.upgraded;
        let retry = replayable && self.may_retry(ctx);
        e.set_retry(retry);
        e
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        if let Some(written) = session.response_written() {
            // the response already started: all we can do is cut the connection, so the
            // client never takes a short body for a complete one
            return FailToProxy {
                error_code: written.status.as_u16(),
                can_reuse_downstream: false,
            };
        }
        let code = match e.etype() {
            ErrorType::HTTPStatus(code) => *code,
            ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout
                if e.esource() == &ErrorSource::Upstream =>
            {
                504
            }
            ErrorType::ReadTimedout if e.esource() == &ErrorSource::Downstream => 408,
            _ => match e.esource() {
                ErrorSource::Upstream => 502,
                ErrorSource::Downstream => match e.etype() {
                    ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => 0,
                    _ => 400,
                },
                ErrorSource::Internal | ErrorSource::Unset => 500,
            },
        };
        if code > 0 {
            let text = ctx.edge_reason.unwrap_or_else(|| failure_text(code));
            respond(session, ctx, code, text).await;
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut Ctx) {
        let status = ctx
            .edge_status
            .unwrap_or_else(|| session.response_written().map_or(0, |r| r.status.as_u16()));
        let route = ctx.route_name().to_owned();
        self.metrics
            .requests
            .with_label_values(&[route.as_str(), status_class(status)])
            .inc();
        self.metrics
            .duration
            .with_label_values(&[route.as_str()])
            .observe(ctx.start.elapsed().as_secs_f64());
        if ctx.upgraded {
            self.metrics.websockets_active.dec();
        }
        self.access_log(session, status, ctx);
        if let Some(b) = ctx.buffer.take().filter(BufferedBody::ended) {
            let outcome = b.outcome().label();
            self.metrics
                .buffered_body("response", outcome, b.spilled(), b.refusals());
        }
        if let Some(lease) = ctx.lease.take() {
            let ok = status != 0 && status < 500;
            lease.server.record_request(ok, ctx.start.elapsed());
        }
        if let Some(outcome) = ctx.cache_outcome {
            self.metrics
                .cache_lookups
                .with_label_values(&[outcome.label()])
                .inc();
        }
        if session.cache.lock_duration().is_some() {
            self.metrics.cache_lock_waits.inc();
        }
        self.invalidate_after_unsafe_method(session, status, ctx);
    }

    fn suppress_error_log(&self, _session: &Session, ctx: &Ctx, e: &Error) -> bool {
        // the edge's own answers (404, 503, ...) are expected, not errors
        ctx.edge_status.is_some() && matches!(e.etype(), ErrorType::HTTPStatus(_))
    }
}

/// The request target as the access log shows it: without its query string when
/// the route says so, and by default on WebSocket handshakes (whose URL often
/// carries a token). `websocket`: the request was a handshake.
fn logged_uri(
    req: &pingora::http::RequestHeader,
    log_query: Option<bool>,
    websocket: bool,
) -> String {
    let websocket = websocket || headers::is_websocket_upgrade(req);
    if log_query.unwrap_or(!websocket) || req.uri.query().is_none() {
        req.uri.to_string()
    } else {
        req.uri.path().to_owned()
    }
}

/// What the client is told when proxying failed: what happened, never where. The
/// error's context (which names the upstream peer) goes to the error log only.
fn failure_text(code: u16) -> &'static str {
    match code {
        502 => "upstream failed",
        504 => "upstream timed out",
        _ => http::StatusCode::from_u16(code)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("error"),
    }
}

/// `https` when the client came over TLS, else `http`.
fn scheme(session: &Session) -> &'static str {
    if session.digest().is_some_and(|d| d.ssl_digest.is_some()) {
        "https"
    } else {
        "http"
    }
}

/// Answers a 308 to the same host and path over https.
async fn redirect_to_https(session: &mut Session, ctx: &mut Ctx, port: u16) {
    ctx.edge_status = Some(308);
    let req = session.req_header();
    let host = headers::request_host(req)
        .map(crate::route::strip_port)
        .unwrap_or("");
    let target = req.uri.path_and_query().map_or("/", |p| p.as_str());
    let location = if port == 443 {
        format!("https://{host}{target}")
    } else {
        format!("https://{host}:{port}{target}")
    };
    let Ok(mut resp) = ResponseHeader::build(308, Some(4)) else {
        return;
    };
    let _ = resp.insert_header(http::header::LOCATION, location);
    let _ = resp.insert_header("content-length", "0");
    let _ = resp.insert_header(headers::X_REQUEST_ID, ctx.request_id.clone());
    if let Err(e) = session
        .as_downstream_mut()
        .write_error_response(resp, Bytes::new())
        .await
    {
        log::debug!("writing a redirect failed: {e}");
    }
}

/// The request's Content-Length, when it has a valid one.
fn declared_length(req: &pingora::http::RequestHeader) -> Option<u64> {
    req.headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

/// Writes an answer the edge makes itself: a short text body, the request id, and
/// `Retry-After` on 503. The connection closes afterwards.
async fn respond(session: &mut Session, ctx: &mut Ctx, status: u16, text: &str) {
    ctx.edge_status = Some(status);
    let body = Bytes::from(format!("{status} {text}\n"));
    let Ok(mut resp) = ResponseHeader::build(status, Some(5)) else {
        return;
    };
    let _ = resp.insert_header("content-type", "text/plain; charset=utf-8");
    let _ = resp.insert_header("content-length", body.len().to_string());
    let _ = resp.insert_header(headers::X_REQUEST_ID, ctx.request_id.clone());
    let _ = resp.insert_header("cache-control", "no-store");
    if let Some(secs) = ctx.retry_after_secs {
        let _ = resp.insert_header("retry-after", secs.to_string());
    } else if status == 503 || ctx.retry_after {
        let _ = resp.insert_header("retry-after", "1");
    }
    if let Err(e) = session
        .as_downstream_mut()
        .write_error_response(resp, body)
        .await
    {
        log::debug!("writing {status} to the client failed: {e}");
    }
}
