//! The edge's configuration file: its TOML types, its defaults and its loading.
//!
//! This module owns the *shape* of `edge.toml`. [`load`] reads a file, parses it,
//! deserializes it into [`Config`] and runs every semantic check in
//! [`validate`]; the result is either a valid `Config` or a list of [`Problem`]s,
//! each naming file, line and key (`edge.toml:12: upstreams[0].servers[1].address:
//! not an ip:port or host:port`), all reported at once.
//!
//! Unknown keys are errors. Instead of `#[serde(deny_unknown_fields)]`, which
//! stops at the first unknown key, the structs are deserialized through
//! `serde_ignored`, which sees every key serde would have ignored; each one becomes
//! a problem, so an operator fixing a typo sees all of them in one `check` run.
//!
//! Every default is written once, in the `default_*` functions below, and
//! documented in `conf/edge.toml`.

mod duration;
mod locate;
mod size;
mod validate;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use duration::HumanDuration;
pub use locate::{KeyPath, Segment};
pub use size::ByteSize;
pub use validate::{
    bounds, check_host_pattern, parse_hash_on, parse_server_address, parse_status_set, HashOn,
    ServerAddress, StatusSet,
};

/// One problem found in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The file the problem is in.
    pub file: PathBuf,
    /// 1-based line, when the key could be located.
    pub line: Option<usize>,
    /// The key, as `routes[2].upstream`.
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let line = self
            .line
            .map(|l| l.to_string())
            .unwrap_or_else(|| "?".into());
        let key = if self.key.is_empty() { "-" } else { &self.key };
        write!(
            f,
            "{}:{}: {}: {}",
            self.file.display(),
            line,
            key,
            self.message
        )
    }
}

/// Why a configuration could not be loaded: every problem found.
#[derive(Debug, thiserror::Error)]
#[error("{} problem(s) in configuration:\n{}", .problems.len(), render(.problems))]
pub struct ConfigError {
    pub problems: Vec<Problem>,
}

fn render(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize, Default)]
pub struct Config {
    #[serde(default)]
    pub server: ServerSection,
    #[serde(default)]
    pub listeners: Vec<Listener>,
    #[serde(default)]
    pub admin: Admin,
    #[serde(default)]
    pub client: ClientLimits,
    #[serde(default)]
    pub upstreams: Vec<Upstream>,
    #[serde(default)]
    pub routes: Vec<Route>,
    #[serde(default)]
    pub cache: CacheSection,
    /// Access log; none when absent.
    pub access_log: Option<AccessLogSection>,
}

/// The access log. Set at start; SIGHUP reopens the file (for logrotate).
#[derive(Debug, Clone, Deserialize)]
pub struct AccessLogSection {
    /// A file path, or "stdout".
    pub path: String,
    /// `combined` (nginx's) or `json`.
    #[serde(default = "default_log_format")]
    pub format: String,
    /// Fields to log (empty: the format's defaults).
    #[serde(default)]
    pub fields: Vec<String>,
    /// Records queued for the writer thread; past it records are dropped, never waited on.
    #[serde(default = "default_log_buffer")]
    pub buffer: usize,
}

/// The response cache's storage (shared by every route that caches). Set at start:
/// a reload keeps the storage and its contents.
#[derive(Debug, Clone, Deserialize)]
pub struct CacheSection {
    /// Memory for cached responses, in bytes.
    #[serde(default = "default_cache_memory")]
    pub memory: ByteSize,
    /// Largest response stored.
    #[serde(default = "default_cache_max_object")]
    pub max_object: ByteSize,
    /// Directory of the disk tier (absent: memory only).
    pub disk_dir: Option<PathBuf>,
    /// Size limit of the disk tier.
    #[serde(default = "default_cache_disk_max")]
    pub disk_max: ByteSize,
}

impl Default for CacheSection {
    fn default() -> Self {
        CacheSection {
            memory: default_cache_memory(),
            max_object: default_cache_max_object(),
            disk_dir: None,
            disk_max: default_cache_disk_max(),
        }
    }
}

/// Process-wide settings. Changing them needs a restart or a binary upgrade.
#[derive(Debug, Clone, Deserialize)]
pub struct ServerSection {
    /// Worker threads of the proxy service.
    #[serde(default = "default_threads")]
    pub threads: usize,
    /// How long a stopping process keeps serving in-flight requests.
    #[serde(default = "default_grace_period")]
    pub grace_period: HumanDuration,
    /// After the grace period, how long runtimes get to wind down.
    #[serde(default = "default_graceful_shutdown_timeout")]
    pub graceful_shutdown_timeout: HumanDuration,
    /// Where the running process writes its pid.
    #[serde(default = "default_pid_file")]
    pub pid_file: PathBuf,
    /// The socket a graceful binary upgrade hands listeners over.
    #[serde(default = "default_upgrade_sock")]
    pub upgrade_sock: PathBuf,
    /// How long an upgrade waits for the new process to serve before the old one
    /// gives up and keeps serving (and a starting process waits for its listeners).
    #[serde(default = "default_upgrade_timeout")]
    pub upgrade_timeout: HumanDuration,
    /// Idle upstream connections kept for reuse, in total.
    #[serde(default = "default_upstream_keepalive_pool_size")]
    pub upstream_keepalive_pool_size: usize,
    /// CA bundle that verifies TLS upstreams (default: the system's roots).
    pub upstream_ca_file: Option<PathBuf>,
    /// Where buffered bodies larger than their memory limit are spooled.
    #[serde(default = "default_temp_dir")]
    pub temp_dir: PathBuf,
    /// Memory for buffered request and response bodies, all requests together.
    #[serde(default = "default_buffer_memory")]
    pub buffer_memory: ByteSize,
    /// Temporary file space for buffered bodies, all requests together.
    #[serde(default = "default_buffer_disk")]
    pub buffer_disk: ByteSize,
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            threads: default_threads(),
            grace_period: default_grace_period(),
            graceful_shutdown_timeout: default_graceful_shutdown_timeout(),
            pid_file: default_pid_file(),
            upgrade_sock: default_upgrade_sock(),
            upgrade_timeout: default_upgrade_timeout(),
            upstream_keepalive_pool_size: default_upstream_keepalive_pool_size(),
            upstream_ca_file: None,
            temp_dir: default_temp_dir(),
            buffer_memory: default_buffer_memory(),
            buffer_disk: default_buffer_disk(),
        }
    }
}

/// A listening socket: cleartext (HTTP/1.1 and prior-knowledge h2c share it) or TLS.
#[derive(Debug, Clone, Deserialize)]
pub struct Listener {
    /// `ip:port` to bind.
    pub address: String,
    /// Accept h2c (HTTP/2 with prior knowledge) on this cleartext port.
    #[serde(default = "default_true")]
    pub h2c: bool,
    /// Terminate TLS on this listener.
    pub tls: Option<ListenerTls>,
    /// Answer every request on this cleartext listener with a 308 to https.
    #[serde(default)]
    pub redirect_to_https: bool,
    /// The port in redirect Locations (443 is left out).
    #[serde(default = "default_https_port")]
    pub https_port: u16,
}

/// TLS settings of a listener. Certificates are reloaded on SIGHUP.
#[derive(Debug, Clone, Deserialize)]
pub struct ListenerTls {
    /// Certificate chains and keys (PEM); SNI picks by the names in each
    /// certificate; the first is the default.
    pub certificates: Vec<CertificatePair>,
    /// Offer HTTP/2 over ALPN.
    #[serde(default = "default_true")]
    pub h2: bool,
    /// Require client certificates signed by this CA bundle (mTLS). Read at start.
    pub client_ca: Option<PathBuf>,
}

/// One certificate chain and its key.
#[derive(Debug, Clone, Deserialize)]
pub struct CertificatePair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The admin listener: /metrics, /healthz, /status.
#[derive(Debug, Clone, Deserialize)]
pub struct Admin {
    /// `ip:port`; loopback by default, never public unless written here.
    #[serde(default = "default_admin_address")]
    pub address: String,
    /// Bearer token for admin actions (drain, disable, enable, purge). Without a
    /// token, actions need the `X-Wingman-Admin: 1` header and a loopback client,
    /// and the address must be a loopback one.
    pub token: Option<String>,
    /// Names the admin may be addressed by (Host), besides its own address and
    /// localhost.
    #[serde(default)]
    pub hosts: Vec<String>,
}

impl Default for Admin {
    fn default() -> Self {
        Admin {
            address: default_admin_address(),
            token: None,
            hosts: Vec::new(),
        }
    }
}

/// Limits on what clients may send and how long they may take.
#[derive(Debug, Clone, Deserialize)]
pub struct ClientLimits {
    /// Deadline for a whole request header section, from the connection's accept
    /// (first request) or the request's first byte (later requests). 408 after it.
    #[serde(default = "default_header_timeout")]
    pub header_timeout: HumanDuration,
    /// How long an idle keep-alive connection waits for its next request.
    #[serde(default = "default_keepalive_timeout")]
    pub keepalive_timeout: HumanDuration,
    /// Most requests served on one keep-alive connection (0: no limit).
    #[serde(default = "default_keepalive_requests")]
    pub keepalive_requests: u32,
    /// Largest request line plus header section, in bytes. 431 above it.
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: usize,
    /// Per-read timeout on a request body.
    #[serde(default = "default_body_read_timeout")]
    pub body_read_timeout: HumanDuration,
    /// Longest wait for one write of a response to a client (nginx `send_timeout`).
    #[serde(default = "default_send_timeout")]
    pub send_timeout: HumanDuration,
    /// Slowest accepted response send rate in bytes per second (0: no minimum).
    #[serde(default)]
    pub min_send_rate: ByteSize,
    /// Proxies (addresses or CIDRs) whose X-Forwarded-For is believed when finding
    /// the client address.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    /// Open connections allowed per client address (0: no limit), counted from the
    /// accept. Set at start.
    #[serde(default = "default_max_conns_per_ip")]
    pub max_conns_per_ip: u32,
}

impl Default for ClientLimits {
    fn default() -> Self {
        ClientLimits {
            header_timeout: default_header_timeout(),
            keepalive_timeout: default_keepalive_timeout(),
            keepalive_requests: default_keepalive_requests(),
            max_header_bytes: default_max_header_bytes(),
            body_read_timeout: default_body_read_timeout(),
            send_timeout: default_send_timeout(),
            min_send_rate: ByteSize(0),
            trusted_proxies: Vec::new(),
            max_conns_per_ip: default_max_conns_per_ip(),
        }
    }
}

/// How a pool picks a server.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    /// Smooth weighted round robin (nginx's).
    #[default]
    RoundRobin,
    /// Fewest in-flight requests relative to weight.
    LeastConn,
    /// Consistent hashing (ketama) on `hash_on`.
    Hash,
}

/// A pool of upstream servers.
#[derive(Debug, Clone, Deserialize)]
pub struct Upstream {
    pub name: String,
    #[serde(default)]
    pub algorithm: Algorithm,
    /// What `hash` balancing hashes: `client_ip`, `header:NAME` or `cookie:NAME`.
    #[serde(default = "default_hash_on")]
    pub hash_on: String,
    #[serde(default)]
    pub servers: Vec<Server>,
    /// Extra attempts on other servers after a failed one.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Requests that may wait for a free server when every server is at max_conns.
    #[serde(default = "default_queue_size")]
    pub queue_size: usize,
    /// How long a queued request waits before it gets 503.
    #[serde(default = "default_queue_timeout")]
    pub queue_timeout: HumanDuration,
    #[serde(default)]
    pub timeouts: UpstreamTimeouts,
    /// Active health checking; none when absent.
    pub health_check: Option<HealthCheck>,
    #[serde(default)]
    pub passive: PassiveHealth,
    /// Panic mode, in percent: when fewer of the pool's servers than this are
    /// available (healthy and not ejected), requests are balanced across all of them
    /// again (0: never).
    #[serde(default = "default_panic_threshold")]
    pub panic_threshold: u8,
    /// Talk TLS to the servers.
    #[serde(default)]
    pub tls: bool,
    /// SNI and verified name for TLS servers (default: the host of each server's
    /// address when it is a name).
    pub sni: Option<String>,
    /// Verify the servers' certificates and names.
    #[serde(default = "default_true")]
    pub verify_cert: bool,
}

/// One server of a pool.
#[derive(Debug, Clone, Deserialize)]
pub struct Server {
    /// `ip:port` or `host:port` (resolved at load and at each reload).
    pub address: String,
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Most concurrent requests to this server (0: no limit).
    #[serde(default)]
    pub max_conns: u32,
}

/// Timeouts toward a pool's servers.
#[derive(Debug, Clone, Deserialize)]
pub struct UpstreamTimeouts {
    #[serde(default = "default_connect_timeout")]
    pub connect: HumanDuration,
    /// Between two reads of the response (also the wait for its header).
    #[serde(default = "default_read_timeout")]
    pub read: HumanDuration,
    #[serde(default = "default_write_timeout")]
    pub write: HumanDuration,
    /// How long an idle pooled connection is kept.
    #[serde(default = "default_idle_timeout")]
    pub idle: HumanDuration,
}

impl Default for UpstreamTimeouts {
    fn default() -> Self {
        UpstreamTimeouts {
            connect: default_connect_timeout(),
            read: default_read_timeout(),
            write: default_write_timeout(),
            idle: default_idle_timeout(),
        }
    }
}

/// Active HTTP health check.
#[derive(Debug, Clone, Deserialize)]
pub struct HealthCheck {
    #[serde(default = "default_health_path")]
    pub path: String,
    /// Host header of the probe (default: the server's address).
    pub host: Option<String>,
    #[serde(default = "default_health_interval")]
    pub interval: HumanDuration,
    #[serde(default = "default_health_timeout")]
    pub timeout: HumanDuration,
    /// Consecutive passes that bring a server back.
    #[serde(default = "default_rise")]
    pub rise: u32,
    /// Consecutive failures that take a server out.
    #[serde(default = "default_fall")]
    pub fall: u32,
    /// Statuses that pass, as `200`, `200-299` or `200,204,300-399`.
    #[serde(default = "default_expected_status")]
    pub expected_status: String,
}

/// Passive failure tracking (outlier ejection).
#[derive(Debug, Clone, Deserialize)]
pub struct PassiveHealth {
    /// Consecutive connect failures or 5xx answers that eject a server (0: off).
    #[serde(default = "default_consecutive_failures")]
    pub consecutive_failures: u32,
    /// How long an ejected server gets no requests.
    #[serde(default = "default_ejection_time")]
    pub ejection_time: HumanDuration,
}

impl Default for PassiveHealth {
    fn default() -> Self {
        PassiveHealth {
            consecutive_failures: default_consecutive_failures(),
            ejection_time: default_ejection_time(),
        }
    }
}

/// One route: which requests go to which pool, and how.
#[derive(Debug, Clone, Deserialize)]
pub struct Route {
    pub name: String,
    /// Exact host or `*.suffix`; absent matches every host.
    pub host: Option<String>,
    #[serde(default = "default_path_prefix")]
    pub path_prefix: String,
    /// The pool's name.
    pub upstream: String,
    /// Idle timeout of a WebSocket after its upgrade (both directions).
    #[serde(default = "default_websocket_idle_timeout")]
    pub websocket_idle_timeout: HumanDuration,
    /// Overrides of the pool's timeouts for this route.
    #[serde(default)]
    pub timeouts: RouteTimeouts,
    #[serde(default)]
    pub request_headers: HeaderRules,
    #[serde(default)]
    pub response_headers: HeaderRules,
    #[serde(default)]
    pub compression: Compression,
    #[serde(default)]
    pub buffering: Buffering,
    #[serde(default)]
    pub cache: RouteCache,
    /// Strict-Transport-Security value sent on TLS responses (absent: none).
    pub hsts: Option<String>,
    /// Request rate limit (absent: none).
    pub rate_limit: Option<RateLimit>,
    /// Whether the access log shows the query string (tokens often travel there).
    /// Absent: shown, except on WebSocket handshakes (`/ws?token=...`).
    pub log_query: Option<bool>,
}

/// A token bucket per key, like nginx's `limit_req ... nodelay`: `1 + burst`
/// requests at once, then `rate` per second; over it, 429 with Retry-After.
#[derive(Debug, Clone, Deserialize)]
pub struct RateLimit {
    /// `client_ip`, `header:NAME` or `cookie:NAME`.
    #[serde(default = "default_hash_on")]
    pub key: String,
    /// Requests per second.
    pub rate: f64,
    #[serde(default)]
    pub burst: u32,
    /// Keys remembered at most (least recently seen are forgotten first).
    #[serde(default = "default_rate_limit_keys")]
    pub max_keys: usize,
    /// IPv6 clients are keyed by this prefix length.
    #[serde(default = "default_ipv6_prefix")]
    pub ipv6_prefix: u8,
}

/// Response caching of a route (RFC 9111 shared cache).
#[derive(Debug, Clone, Deserialize)]
pub struct RouteCache {
    /// Use the cache for GET and HEAD on this route.
    #[serde(default)]
    pub enabled: bool,
    /// Request headers whose values join the cache key.
    #[serde(default)]
    pub key_headers: Vec<String>,
    /// Cookies whose values join the cache key.
    #[serde(default)]
    pub key_cookies: Vec<String>,
    /// Query parameters left out of the cache key.
    #[serde(default)]
    pub ignore_query_params: Vec<String>,
    /// Upper bound on a stored response's freshness lifetime.
    pub max_ttl: Option<HumanDuration>,
    /// Lifetime of responses without freshness information (absent: not stored).
    pub default_ttl: Option<HumanDuration>,
    /// stale-while-revalidate when the response gives none.
    pub stale_while_revalidate: Option<HumanDuration>,
    /// stale-if-error when the response gives none.
    pub stale_if_error: Option<HumanDuration>,
    /// Store responses that set cookies.
    #[serde(default)]
    pub store_set_cookie: bool,
    /// Requests with any of these cookies skip the cache.
    #[serde(default)]
    pub bypass_cookies: Vec<String>,
    /// Requests with any of these headers skip the cache.
    #[serde(default)]
    pub bypass_headers: Vec<String>,
    /// How long concurrent misses for one key wait for the single origin fetch.
    pub lock_timeout: Option<HumanDuration>,
    /// Heuristic freshness (RFC 9111 §4.2.2) for responses without explicit
    /// freshness: 10% of the time since Last-Modified, at most `heuristic_max`.
    #[serde(default)]
    pub heuristic_freshness: bool,
    #[serde(default = "default_heuristic_max")]
    pub heuristic_max: HumanDuration,
    /// Targeted Cache-Control fields (RFC 9213) this cache obeys, most specific
    /// first; the first one present and valid replaces Cache-Control and Expires.
    #[serde(default = "default_targeted_cache_control")]
    pub targeted_cache_control: Vec<String>,
    /// Remove those fields from responses to clients (they are meant for caches).
    #[serde(default)]
    pub strip_targeted_cache_control: bool,
    /// Debug aid: show the cache key in Cache-Status (`key="..."`).
    #[serde(default)]
    pub cache_status_key: bool,
}

impl Default for RouteCache {
    fn default() -> Self {
        RouteCache {
            enabled: false,
            key_headers: Vec::new(),
            key_cookies: Vec::new(),
            ignore_query_params: Vec::new(),
            max_ttl: None,
            default_ttl: None,
            stale_while_revalidate: None,
            stale_if_error: None,
            store_set_cookie: false,
            bypass_cookies: Vec::new(),
            bypass_headers: Vec::new(),
            lock_timeout: None,
            heuristic_freshness: false,
            heuristic_max: default_heuristic_max(),
            targeted_cache_control: default_targeted_cache_control(),
            strip_targeted_cache_control: false,
            cache_status_key: false,
        }
    }
}

fn default_heuristic_max() -> HumanDuration {
    HumanDuration(DEFAULT_HEURISTIC_MAX)
}

/// Longest heuristic freshness lifetime (`routes.cache.heuristic_max`).
pub const DEFAULT_HEURISTIC_MAX: Duration = Duration::from_secs(24 * 3600);

fn default_targeted_cache_control() -> Vec<String> {
    vec!["wingman-cache-control".into(), "cdn-cache-control".into()]
}

/// Response compression of a route.
#[derive(Debug, Clone, Deserialize)]
pub struct Compression {
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Codings offered, in server preference order (`br`, `zstd`, `gzip`).
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<String>,
    #[serde(default = "default_gzip_level")]
    pub gzip_level: u32,
    #[serde(default = "default_brotli_level")]
    pub brotli_level: u32,
    #[serde(default = "default_zstd_level")]
    pub zstd_level: i32,
    /// Responses whose Content-Length is below this are sent as is.
    #[serde(default = "default_min_length")]
    pub min_length: ByteSize,
    /// Media types compressed: `text/*`, `application/json`, `application/*+json`...
    #[serde(default = "default_compress_types")]
    pub types: Vec<String>,
    /// Also compress text/event-stream, flushing every chunk (off: sent as is).
    #[serde(default)]
    pub event_streams: bool,
}

impl Default for Compression {
    fn default() -> Self {
        Compression {
            enabled: true,
            algorithms: default_algorithms(),
            gzip_level: default_gzip_level(),
            brotli_level: default_brotli_level(),
            zstd_level: default_zstd_level(),
            min_length: default_min_length(),
            types: default_compress_types(),
            event_streams: false,
        }
    }
}

/// Request and response buffering of a route.
#[derive(Debug, Clone, Deserialize)]
pub struct Buffering {
    /// Read the whole request body before choosing and contacting an upstream.
    #[serde(default = "default_true")]
    pub request: bool,
    /// Request bodies above this get 413.
    #[serde(default = "default_client_max_body_size")]
    pub client_max_body_size: ByteSize,
    /// Request body bytes kept in memory before spooling to a temporary file.
    #[serde(default = "default_request_memory")]
    pub request_memory: ByteSize,
    /// Read the whole response from the upstream at its speed before sending it
    /// (off for WebSocket, text/event-stream and `X-Accel-Buffering: no`).
    #[serde(default = "default_true")]
    pub response: bool,
    /// Response bytes kept in memory before spooling to a temporary file.
    #[serde(default = "default_response_memory")]
    pub response_memory: ByteSize,
    /// Largest temporary file per response; past it the response streams (0: no
    /// file, stream past `response_memory`).
    #[serde(default = "default_response_max_temp_file")]
    pub response_max_temp_file: ByteSize,
}

impl Default for Buffering {
    fn default() -> Self {
        Buffering {
            request: true,
            client_max_body_size: default_client_max_body_size(),
            request_memory: default_request_memory(),
            response: true,
            response_memory: default_response_memory(),
            response_max_temp_file: default_response_max_temp_file(),
        }
    }
}

/// Per-route overrides of upstream timeouts.
#[derive(Debug, Clone, Deserialize, Default)]
pub struct RouteTimeouts {
    pub connect: Option<HumanDuration>,
    pub read: Option<HumanDuration>,
    pub write: Option<HumanDuration>,
}

/// Header edits: `set` replaces (or adds), `remove` deletes.
#[derive(Debug, Clone, Deserialize, Default)]
pub struct HeaderRules {
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

fn default_true() -> bool {
    true
}
fn default_threads() -> usize {
    2
}
fn default_grace_period() -> HumanDuration {
    HumanDuration(Duration::from_secs(5))
}
fn default_graceful_shutdown_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(5))
}
/// The systemd unit's RuntimeDirectory: private to the service, unlike /tmp.
const RUNTIME_DIR: &str = "/run/wingman-edge";
fn default_pid_file() -> PathBuf {
    Path::new(RUNTIME_DIR).join("edge.pid")
}
fn default_upgrade_sock() -> PathBuf {
    Path::new(RUNTIME_DIR).join("upgrade.sock")
}
fn default_upgrade_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}
fn default_upstream_keepalive_pool_size() -> usize {
    256
}
fn default_admin_address() -> String {
    "127.0.0.1:9901".into()
}
fn default_header_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}
fn default_keepalive_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(60))
}
fn default_max_conns_per_ip() -> u32 {
    256
}
fn default_keepalive_requests() -> u32 {
    1000
}
fn default_max_header_bytes() -> usize {
    32 * 1024
}
fn default_body_read_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(60))
}
fn default_hash_on() -> String {
    "client_ip".into()
}
fn default_retries() -> u32 {
    2
}
fn default_queue_size() -> usize {
    256
}
fn default_queue_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(2))
}
fn default_weight() -> u32 {
    1
}
fn default_connect_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(2))
}
fn default_read_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(60))
}
fn default_write_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(60))
}
fn default_idle_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(60))
}
fn default_health_path() -> String {
    "/healthz".into()
}
fn default_health_interval() -> HumanDuration {
    HumanDuration(Duration::from_secs(2))
}
fn default_health_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(1))
}
fn default_rise() -> u32 {
    2
}
fn default_fall() -> u32 {
    3
}
fn default_expected_status() -> String {
    "200-399".into()
}
fn default_consecutive_failures() -> u32 {
    5
}
fn default_panic_threshold() -> u8 {
    50
}
fn default_ejection_time() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}
fn default_buffer_memory() -> ByteSize {
    ByteSize(256 << 20)
}
fn default_buffer_disk() -> ByteSize {
    ByteSize(4 << 30)
}
fn default_temp_dir() -> PathBuf {
    std::env::temp_dir()
}
fn default_send_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(60))
}
fn default_algorithms() -> Vec<String> {
    vec!["br".into(), "zstd".into(), "gzip".into()]
}
fn default_gzip_level() -> u32 {
    5
}
fn default_brotli_level() -> u32 {
    5
}
fn default_zstd_level() -> i32 {
    3
}
fn default_min_length() -> ByteSize {
    ByteSize(1024)
}
fn default_compress_types() -> Vec<String> {
    [
        "text/*",
        "application/json",
        "application/*+json",
        "application/javascript",
        "application/x-javascript",
        "application/xml",
        "application/*+xml",
        "application/wasm",
        "application/x-ndjson",
        "image/svg+xml",
        "image/x-icon",
        "font/ttf",
        "font/otf",
    ]
    .map(String::from)
    .to_vec()
}
fn default_client_max_body_size() -> ByteSize {
    ByteSize(10 << 20)
}
fn default_request_memory() -> ByteSize {
    ByteSize(1 << 20)
}
fn default_response_memory() -> ByteSize {
    ByteSize(256 << 10)
}
fn default_response_max_temp_file() -> ByteSize {
    ByteSize(1 << 30)
}
fn default_log_format() -> String {
    "combined".into()
}
fn default_log_buffer() -> usize {
    65_536
}
fn default_rate_limit_keys() -> usize {
    100_000
}
fn default_ipv6_prefix() -> u8 {
    64
}
fn default_https_port() -> u16 {
    443
}
fn default_cache_memory() -> ByteSize {
    ByteSize(256 << 20)
}
fn default_cache_max_object() -> ByteSize {
    ByteSize(8 << 20)
}
fn default_cache_disk_max() -> ByteSize {
    ByteSize(1 << 30)
}
/// Cache lock wait when the route sets none.
pub const DEFAULT_CACHE_LOCK_TIMEOUT: Duration = Duration::from_secs(5);
fn default_path_prefix() -> String {
    "/".into()
}
fn default_websocket_idle_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(3600))
}

/// Reads, parses and validates a configuration file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        problems: vec![Problem {
            file: path.to_path_buf(),
            line: None,
            key: String::new(),
            message: format!("cannot read file: {e}"),
        }],
    })?;
    parse(path, &text)
}

/// Parses and validates configuration text; `path` is used in problem reports only.
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
    let problem = |line: Option<usize>, key: String, message: String| Problem {
        file: path.to_path_buf(),
        line,
        key,
        message,
    };
    let doc = match toml_edit::ImDocument::parse(text.to_owned()) {
        Ok(doc) => doc,
        Err(e) => {
            let line = e.span().map(|s| locate::line_of(text, s.start));
            let message = e.message().trim().to_owned();
            return Err(ConfigError {
                problems: vec![problem(line, String::new(), message)],
            });
        }
    };
    let mut unknown: Vec<KeyPath> = Vec::new();
    let de = toml::Deserializer::new(text);
    let config: Result<Config, _> =
        serde_ignored::deserialize(de, |p| unknown.push(KeyPath::from_ignored(&p)));
    let mut problems: Vec<Problem> = unknown
        .iter()
        .map(|k| {
            problem(
                locate::line_of_path(&doc, text, k),
                k.to_string(),
                "unknown key".into(),
            )
        })
        .collect();
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            let line = e.span().map(|s| locate::line_of(text, s.start));
            let key = line
                .map(|l| locate::key_on_line(text, l))
                .unwrap_or_default();
            problems.push(problem(line, key, e.message().trim().to_owned()));
            return Err(ConfigError { problems });
        }
    };
    for (key, message) in validate::validate(&config) {
        problems.push(problem(
            locate::line_of_path(&doc, text, &key),
            key.to_string(),
            message,
        ));
    }
    if problems.is_empty() {
        Ok(config)
    } else {
        problems.sort_by_key(|p| p.line.unwrap_or(usize::MAX));
        Err(ConfigError { problems })
    }
}

impl Config {
    /// A one-line summary, as printed by `wingman-edge check`.
    pub fn summary(&self) -> String {
        let servers: usize = self.upstreams.iter().map(|u| u.servers.len()).sum();
        format!(
            "{} listener(s), {} route(s), {} upstream pool(s), {} server(s), admin on {}",
            self.listeners.len(),
            self.routes.len(),
            self.upstreams.len(),
            servers,
            self.admin.address
        )
    }
}

#[cfg(test)]
mod tests;
