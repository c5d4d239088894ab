//! Semantic checks of a deserialized [`Config`]: everything serde cannot see.
//!
//! Every check runs; each failure is a `(key path, message)` pair, so the caller can
//! report all of them at once with their lines. The small parsers here
//! (`parse_hash_on`, `parse_status_set`, `parse_server_address`) are the same ones the
//! snapshot builder uses, so what `check` accepts is exactly what `run` builds.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;

use super::{Config, HeaderRules, KeyPath};

/// What `hash` balancing hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashOn {
    ClientIp,
    Header(http::HeaderName),
    Cookie(String),
}

/// Parses `client_ip`, `header:NAME` or `cookie:NAME`.
pub fn parse_hash_on(s: &str) -> Result<HashOn, String> {
    if s == "client_ip" {
        return Ok(HashOn::ClientIp);
    }
    if let Some(name) = s.strip_prefix("header:") {
        return http::HeaderName::from_bytes(name.trim().as_bytes())
            .map(HashOn::Header)
            .map_err(|_| format!("{name:?} is not a valid header name"));
    }
    if let Some(name) = s.strip_prefix("cookie:") {
        let name = name.trim();
        if name.is_empty() || name.contains([';', '=', ' ']) {
            return Err(format!("{name:?} is not a valid cookie name"));
        }
        return Ok(HashOn::Cookie(name.to_owned()));
    }
    Err(format!(
        "{s:?} is not one of client_ip, header:NAME, cookie:NAME"
    ))
}

/// A set of HTTP status codes, as `200`, `200-299` or `200,204,300-399`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusSet(Vec<(u16, u16)>);

impl StatusSet {
    pub fn contains(&self, code: u16) -> bool {
        self.0.iter().any(|&(lo, hi)| (lo..=hi).contains(&code))
    }
}

pub fn parse_status_set(s: &str) -> Result<StatusSet, String> {
    let mut ranges = Vec::new();
    for part in s.split(',').map(str::trim) {
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (part, part),
        };
        let parse = |x: &str| -> Result<u16, String> {
            x.parse::<u16>()
                .ok()
                .filter(|c| (100..=599).contains(c))
                .ok_or_else(|| format!("{x:?} is not an HTTP status code (100-599)"))
        };
        let (lo, hi) = (parse(lo)?, parse(hi)?);
        if lo > hi {
            return Err(format!("range {part:?} is empty"));
        }
        ranges.push((lo, hi));
    }
    Ok(StatusSet(ranges))
}

/// A server address as written: a socket address, or a host name to resolve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerAddress {
    Ip(SocketAddr),
    Name { host: String, port: u16 },
}

pub fn parse_server_address(s: &str) -> Result<ServerAddress, String> {
    if let Ok(addr) = s.parse::<SocketAddr>() {
        if addr.port() == 0 {
            return Err(format!("{s:?}: port 0 is not a server port"));
        }
        return Ok(ServerAddress::Ip(addr));
    }
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("{s:?} is not ip:port or host:port"))?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|&p| p != 0)
        .ok_or_else(|| format!("{s:?}: {port:?} is not a port (1-65535)"))?;
    if !is_hostname(host) {
        return Err(format!("{s:?}: {host:?} is not a host name or IP address"));
    }
    Ok(ServerAddress::Name {
        host: host.to_owned(),
        port,
    })
}

fn is_hostname(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// Checks a route's host pattern: an exact host name or `*.suffix`.
pub fn check_host_pattern(p: &str) -> Result<(), String> {
    let name = p.strip_prefix("*.").unwrap_or(p);
    let name = name.strip_suffix('.').unwrap_or(name);
    if is_hostname(&name.to_ascii_lowercase()) {
        Ok(())
    } else {
        Err(format!(
            "{p:?} is not a host name or a wildcard like \"*.example.com\""
        ))
    }
}

fn check_listen_address(s: &str) -> Result<SocketAddr, String> {
    s.parse::<SocketAddr>()
        .map_err(|_| format!("{s:?} is not an ip:port to listen on"))
}

/// Upper bounds of the numbers that size an allocation (so that `check` or a reload
/// can never make the process ask for more memory than it can get). Each is
/// documented with its key in `conf/edge.toml`.
pub mod bounds {
    /// `server.threads`: each is an OS thread with its own runtime.
    pub const THREADS: usize = 1024;
    /// `server.upstream_keepalive_pool_size`: pingora preallocates its map.
    pub const KEEPALIVE_POOL: usize = 1 << 20;
    /// `client.max_header_bytes`: buffered per connection; pingora parses at most
    /// 1 MiB anyway.
    pub const HEADER_BYTES: usize = 1 << 20;
    /// `access_log.buffer`: the queue is allocated up front.
    pub const LOG_BUFFER: usize = 1 << 20;
    /// `upstreams[].servers[].weight`: a hash pool puts 160 ring points per unit.
    pub const WEIGHT: u32 = 1000;
    /// `routes[].rate_limit.max_keys`: the limiter owns it.
    pub const RATE_LIMIT_KEYS: usize = crate::ratelimit::MAX_KEYS;
}

fn at_most<T: PartialOrd + std::fmt::Display>(
    out: &mut Vec<(KeyPath, String)>,
    key: KeyPath,
    value: T,
    max: T,
) {
    if value > max {
        out.push((key, format!("must be at most {max}")));
    }
}

/// Runs every semantic check; returns all problems found.
pub fn validate(c: &Config) -> Vec<(KeyPath, String)> {
    let mut out: Vec<(KeyPath, String)> = Vec::new();
    let root = KeyPath::root();

    // listeners and admin
    if c.listeners.is_empty() {
        out.push((
            root.key("listeners"),
            "at least one [[listeners]] entry is needed".into(),
        ));
    }
    let mut bound: HashMap<SocketAddr, KeyPath> = HashMap::new();
    for (i, l) in c.listeners.iter().enumerate() {
        let lp = root.key("listeners").index(i);
        if let Some(tls) = &l.tls {
            if tls.certificates.is_empty() {
                out.push((
                    lp.key("tls").key("certificates"),
                    "at least one certificate is needed".into(),
                ));
            }
            if l.redirect_to_https {
                out.push((
                    lp.key("redirect_to_https"),
                    "a TLS listener cannot redirect to https".into(),
                ));
            }
        }
        let path = lp.key("address");
        match check_listen_address(&l.address) {
            Ok(a) => {
                if let Some(first) = bound.insert(a, path.clone()) {
                    out.push((path, format!("{a} is already used by {first}")));
                }
            }
            Err(e) => out.push((path, e)),
        }
    }
    let admin_path = root.key("admin").key("address");
    match check_listen_address(&c.admin.address) {
        Ok(a) => {
            if let Some(first) = bound.get(&a) {
                out.push((admin_path, format!("{a} is already used by {first}")));
            } else if !a.ip().is_loopback() && c.admin.token.as_deref().is_none_or(str::is_empty) {
                out.push((
                    admin_path,
                    format!("{a} is not a loopback address: serving admin there needs admin.token"),
                ));
            }
        }
        Err(e) => out.push((admin_path, e)),
    }

    // client limits
    let client = root.key("client");
    if c.client.max_header_bytes < 1024 {
        out.push((
            client.key("max_header_bytes"),
            "must be at least 1024".into(),
        ));
    }
    for (key, d) in [
        ("header_timeout", c.client.header_timeout),
        ("keepalive_timeout", c.client.keepalive_timeout),
        ("body_read_timeout", c.client.body_read_timeout),
    ] {
        if d.get().is_zero() {
            out.push((client.key(key), "must be longer than 0s".into()));
        }
    }
    if c.cache.max_object.get() == 0 || c.cache.max_object.get() > c.cache.memory.get() {
        out.push((
            root.key("cache").key("max_object"),
            "must be above 0 and at most cache.memory".into(),
        ));
    }
    for (j, t) in c.client.trusted_proxies.iter().enumerate() {
        if let Err(e) = crate::ratelimit::parse_trusted(t) {
            out.push((client.key("trusted_proxies").index(j), e.to_string()));
        }
    }
    if let Some(log) = &c.access_log {
        let lp = root.key("access_log");
        if log.format.parse::<crate::accesslog::Format>().is_err() {
            out.push((
                lp.key("format"),
                format!("{:?} is not combined or json", log.format),
            ));
        }
        if let Err(e) = crate::accesslog::parse_fields(&log.fields) {
            out.push((lp.key("fields"), e.to_string()));
        }
        if log.buffer == 0 {
            out.push((lp.key("buffer"), "must be at least 1".into()));
        }
        at_most(&mut out, lp.key("buffer"), log.buffer, bounds::LOG_BUFFER);
    }
    if c.server.threads == 0 {
        out.push((
            root.key("server").key("threads"),
            "must be at least 1".into(),
        ));
    }
    let server = root.key("server");
    at_most(
        &mut out,
        server.key("threads"),
        c.server.threads,
        bounds::THREADS,
    );
    at_most(
        &mut out,
        server.key("upstream_keepalive_pool_size"),
        c.server.upstream_keepalive_pool_size,
        bounds::KEEPALIVE_POOL,
    );
    at_most(
        &mut out,
        client.key("max_header_bytes"),
        c.client.max_header_bytes,
        bounds::HEADER_BYTES,
    );

    // upstream pools
    let mut pools: HashMap<&str, usize> = HashMap::new();
    for (i, u) in c.upstreams.iter().enumerate() {
        let up = root.key("upstreams").index(i);
        if u.name.trim().is_empty() {
            out.push((up.key("name"), "must not be empty".into()));
        } else if let Some(first) = pools.insert(&u.name, i) {
            out.push((
                up.key("name"),
                format!("pool {:?} is already defined by upstreams[{first}]", u.name),
            ));
        }
        if u.servers.is_empty() {
            out.push((up.key("servers"), "a pool needs at least one server".into()));
        } else if u.servers.iter().all(|s| s.weight == 0) {
            out.push((
                up.key("servers"),
                "every server has weight 0, so none could be chosen".into(),
            ));
        }
        let mut seen: HashSet<&str> = HashSet::new();
        for (j, s) in u.servers.iter().enumerate() {
            let sp = up.key("servers").index(j);
            at_most(&mut out, sp.key("weight"), s.weight, bounds::WEIGHT);
            if let Err(e) = parse_server_address(&s.address) {
                out.push((sp.key("address"), e));
            } else if !seen.insert(s.address.as_str()) {
                out.push((
                    sp.key("address"),
                    format!("{} is listed twice in this pool", s.address),
                ));
            }
        }
        if let Err(e) = parse_hash_on(&u.hash_on) {
            out.push((up.key("hash_on"), e));
        }
        if let Some(sni) = &u.sni {
            if !is_hostname(&sni.to_ascii_lowercase()) {
                out.push((up.key("sni"), format!("{sni:?} is not a host name")));
            }
        }
        for (key, d) in [
            ("connect", u.timeouts.connect),
            ("read", u.timeouts.read),
            ("write", u.timeouts.write),
        ] {
            if d.get().is_zero() {
                out.push((up.key("timeouts").key(key), "must be longer than 0s".into()));
            }
        }
        if u.queue_size > 0 && u.queue_timeout.get().is_zero() {
            out.push((
                up.key("queue_timeout"),
                "must be longer than 0s when queue_size is above 0".into(),
            ));
        }
        if let Some(h) = &u.health_check {
            let hp = up.key("health_check");
            if !h.path.starts_with('/') {
                out.push((hp.key("path"), format!("{:?} must start with '/'", h.path)));
            }
            if h.rise == 0 {
                out.push((hp.key("rise"), "must be at least 1".into()));
            }
            if h.fall == 0 {
                out.push((hp.key("fall"), "must be at least 1".into()));
            }
            if h.interval.get().is_zero() {
                out.push((hp.key("interval"), "must be longer than 0s".into()));
            }
            if h.timeout.get().is_zero() {
                out.push((hp.key("timeout"), "must be longer than 0s".into()));
            }
            if let Err(e) = parse_status_set(&h.expected_status) {
                out.push((hp.key("expected_status"), e));
            }
            if let Some(host) = &h.host {
                if http::HeaderValue::from_str(host).is_err() {
                    out.push((
                        hp.key("host"),
                        format!("{host:?} is not a valid Host value"),
                    ));
                }
            }
        }
        if u.panic_threshold > 100 {
            out.push((
                up.key("panic_threshold"),
                "must be 0 to 100 (percent)".into(),
            ));
        }
        if u.passive.consecutive_failures > 0 && u.passive.ejection_time.get().is_zero() {
            out.push((
                up.key("passive").key("ejection_time"),
                "must be longer than 0s when consecutive_failures is above 0".into(),
            ));
        }
    }

    // routes
    let mut names: HashMap<&str, usize> = HashMap::new();
    let mut matchers: HashMap<(String, String), usize> = HashMap::new();
    if c.routes.is_empty() {
        out.push((
            root.key("routes"),
            "at least one [[routes]] entry is needed".into(),
        ));
    }
    for (i, r) in c.routes.iter().enumerate() {
        let rp = root.key("routes").index(i);
        if r.name.trim().is_empty() {
            out.push((rp.key("name"), "must not be empty".into()));
        } else if let Some(first) = names.insert(&r.name, i) {
            out.push((
                rp.key("name"),
                format!("route {:?} is already defined by routes[{first}]", r.name),
            ));
        }
        if !pools.contains_key(r.upstream.as_str()) {
            out.push((
                rp.key("upstream"),
                format!("no upstream pool is named {:?}", r.upstream),
            ));
        }
        if let Some(h) = &r.host {
            if let Err(e) = check_host_pattern(h) {
                out.push((rp.key("host"), e));
            }
        }
        if !r.path_prefix.starts_with('/') {
            out.push((
                rp.key("path_prefix"),
                format!("{:?} must start with '/'", r.path_prefix),
            ));
        }
        let host_key = r.host.clone().unwrap_or_default().to_ascii_lowercase();
        if let Some(first) = matchers.insert((host_key, r.path_prefix.clone()), i) {
            out.push((
                rp.key("path_prefix"),
                format!("routes[{first}] already matches the same host and path prefix"),
            ));
        }
        if r.websocket_idle_timeout.get().is_zero() {
            out.push((
                rp.key("websocket_idle_timeout"),
                "must be longer than 0s".into(),
            ));
        }
        for (key, d) in [
            ("connect", r.timeouts.connect),
            ("read", r.timeouts.read),
            ("write", r.timeouts.write),
        ] {
            if d.is_some_and(|d| d.get().is_zero()) {
                out.push((rp.key("timeouts").key(key), "must be longer than 0s".into()));
            }
        }
        let cp = rp.key("compression");
        let mut seen_algos = HashSet::new();
        for (j, a) in r.compression.algorithms.iter().enumerate() {
            if crate::compress::Coding::from_token(a).is_none() || a == "x-gzip" {
                out.push((
                    cp.key("algorithms").index(j),
                    format!("{a:?} is not one of br, zstd, gzip"),
                ));
            } else if !seen_algos.insert(a.as_str()) {
                out.push((
                    cp.key("algorithms").index(j),
                    format!("{a:?} is listed twice"),
                ));
            }
        }
        if !(1..=9).contains(&r.compression.gzip_level) {
            out.push((cp.key("gzip_level"), "must be 1 to 9".into()));
        }
        if r.compression.brotli_level > 11 {
            out.push((cp.key("brotli_level"), "must be 0 to 11".into()));
        }
        if !(1..=19).contains(&r.compression.zstd_level) {
            out.push((cp.key("zstd_level"), "must be 1 to 19".into()));
        }
        for (j, t) in r.compression.types.iter().enumerate() {
            if let Err(e) = crate::compress::check_type_pattern(t) {
                out.push((cp.key("types").index(j), e));
            }
        }
        let bp = rp.key("buffering");
        if r.buffering.client_max_body_size.get() == 0 {
            out.push((bp.key("client_max_body_size"), "must be above 0".into()));
        }
        let kp = rp.key("cache");
        for (j, h) in r.cache.key_headers.iter().enumerate() {
            if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                out.push((
                    kp.key("key_headers").index(j),
                    format!("{h:?} is not a valid header name"),
                ));
            }
        }
        for (j, h) in r.cache.targeted_cache_control.iter().enumerate() {
            if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                out.push((
                    kp.key("targeted_cache_control").index(j),
                    format!("{h:?} is not a valid header name"),
                ));
            }
        }
        for (j, h) in r.cache.bypass_headers.iter().enumerate() {
            if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                out.push((
                    kp.key("bypass_headers").index(j),
                    format!("{h:?} is not a valid header name"),
                ));
            }
        }
        if let Some(rl) = &r.rate_limit {
            let rlp = rp.key("rate_limit");
            if let Err(e) = parse_hash_on(&rl.key) {
                out.push((rlp.key("key"), e));
            }
            if !(rl.rate.is_finite() && rl.rate > 0.0) {
                out.push((
                    rlp.key("rate"),
                    "must be above 0 requests per second".into(),
                ));
            }
            if rl.max_keys == 0 {
                out.push((rlp.key("max_keys"), "must be at least 1".into()));
            }
            at_most(
                &mut out,
                rlp.key("max_keys"),
                rl.max_keys,
                bounds::RATE_LIMIT_KEYS,
            );
        }
        if let Some(h) = &r.hsts {
            if http::HeaderValue::from_str(h).is_err() || !h.contains("max-age=") {
                out.push((
                    rp.key("hsts"),
                    format!("{h:?} is not a Strict-Transport-Security value (it needs max-age=)"),
                ));
            }
        }
        check_header_rules(&r.request_headers, &rp.key("request_headers"), &mut out);
        check_header_rules(&r.response_headers, &rp.key("response_headers"), &mut out);
    }
    out
}

fn check_header_rules(rules: &HeaderRules, path: &KeyPath, out: &mut Vec<(KeyPath, String)>) {
    for (name, value) in &rules.set {
        let p = path.key("set").key(name);
        if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
            out.push((p, format!("{name:?} is not a valid header name")));
        } else if http::HeaderValue::from_str(value).is_err() {
            out.push((p, format!("{value:?} is not a valid header value")));
        }
    }
    for (j, name) in rules.remove.iter().enumerate() {
        if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
            out.push((
                path.key("remove").index(j),
                format!("{name:?} is not a valid header name"),
            ));
        }
    }
}
