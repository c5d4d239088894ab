//! Typed settings: every default lives in the `Default` impls below (and nowhere else in
//! code); `conf/app.toml` documents the same values and a test keeps the two in sync.
//!
//! Sources, later ones win: built-in defaults, the TOML file, then environment variables
//! `WINGMAN_APP_<SECTION>__<KEY>` (for example `WINGMAN_APP_DATABASE__URL`).

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

/// Why the settings could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid configuration: {0}")]
    Invalid(#[from] Box<figment::Error>),
    #[error("invalid configuration: {field}: {message}")]
    Field { field: &'static str, message: String },
}

/// All settings of one app instance.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub server: ServerSettings,
    pub database: DatabaseSettings,
    pub redis: RedisSettings,
    pub cache: CacheSettings,
    pub auth: AuthSettings,
    pub limits: LimitSettings,
    pub ws: WsSettings,
    pub jobs: JobSettings,
    pub llm: LlmSettings,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSettings {
    /// Address the binary listens on (the library `serve` takes a bound listener instead).
    pub listen: SocketAddr,
    /// Address of the binary's `/metrics` listener, kept apart from `listen` so the
    /// public route never reaches it; empty: no metrics listener. (The library serves
    /// metrics on `Options::metrics_listener` instead.)
    pub metrics_listen: String,
    /// Requests taking longer than this get 503.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// How long shutdown waits for requests, WebSockets and running jobs to finish.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// `max-age` for static assets and public data.
    #[serde(with = "humantime_serde")]
    pub static_max_age: Duration,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 3000)),
            metrics_listen: "127.0.0.1:9464".into(),
            request_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(20),
            static_max_age: Duration::from_secs(3600),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseSettings {
    /// `sqlite://path/to/file.db` (created on first run) or `postgres://…`.
    pub url: String,
    /// PostgreSQL only: schema to use (created if missing); empty means `public`.
    pub schema: String,
    pub max_connections: u32,
    pub min_connections: u32,
    #[serde(with = "humantime_serde")]
    pub acquire_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub max_lifetime: Duration,
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// SQLite only: how long a writer waits for the file lock.
    #[serde(with = "humantime_serde")]
    pub busy_timeout: Duration,
}

impl ServerSettings {
    /// The metrics address, `None` when metrics are off (checked by `validate`).
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listen.parse().ok()
    }
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self {
            url: "sqlite://wingman-app.db".into(),
            schema: String::new(),
            max_connections: 16,
            min_connections: 1,
            acquire_timeout: Duration::from_secs(3),
            max_lifetime: Duration::from_secs(1800),
            idle_timeout: Duration::from_secs(600),
            busy_timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RedisSettings {
    /// `redis://host:port/db`; empty disables Redis (in-process cache and fan-out).
    pub url: String,
    /// Prefix of every key and channel, so several deployments can share one Redis.
    pub prefix: String,
    /// A cache or publish operation slower than this counts as a Redis failure.
    #[serde(with = "humantime_serde")]
    pub op_timeout: Duration,
    /// After a failure, Redis is skipped (cache misses, events not published) this long.
    #[serde(with = "humantime_serde")]
    pub retry_after: Duration,
}

impl Default for RedisSettings {
    fn default() -> Self {
        Self {
            url: String::new(),
            prefix: String::new(),
            op_timeout: Duration::from_millis(500),
            retry_after: Duration::from_secs(1),
        }
    }
}

impl RedisSettings {
    pub fn enabled(&self) -> bool {
        !self.url.is_empty()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CacheSettings {
    /// In-process cache capacity (entries).
    pub max_entries: u64,
    /// How long a cached query result lives at most.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// How long a bearer token lookup is cached in-process (never past the session's
    /// expiry; a logout drops it at once on every instance the event bus reaches).
    #[serde(with = "humantime_serde")]
    pub auth_ttl: Duration,
}

impl Default for CacheSettings {
    fn default() -> Self {
        Self {
            max_entries: 100_000,
            ttl: Duration::from_secs(30),
            auth_ttl: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSettings {
    /// Lifetime of a bearer token from login.
    #[serde(with = "humantime_serde")]
    pub token_ttl: Duration,
    /// Argon2id memory cost in KiB (OWASP minimum: 19456).
    pub argon2_memory_kib: u32,
    /// Argon2id iterations.
    pub argon2_iterations: u32,
    /// How often each instance deletes the expired sessions (also once at start).
    #[serde(with = "humantime_serde")]
    pub session_prune_interval: Duration,
    /// Failed logins allowed per user name within `login_failure_window`; more get 429.
    pub login_max_failures_per_user: u32,
    /// Failed logins allowed per client address (the TCP peer) within the window.
    pub login_max_failures_per_addr: u32,
    /// The window starts at a name's (or address's) first failure.
    #[serde(with = "humantime_serde")]
    pub login_failure_window: Duration,
    /// Names and addresses tracked at most (each table; the least used are dropped).
    pub login_throttle_entries: u64,
}

impl Default for AuthSettings {
    fn default() -> Self {
        Self {
            token_ttl: Duration::from_secs(30 * 24 * 3600),
            argon2_memory_kib: 19_456,
            argon2_iterations: 2,
            session_prune_interval: Duration::from_secs(3600),
            login_max_failures_per_user: 10,
            login_max_failures_per_addr: 100,
            login_failure_window: Duration::from_secs(15 * 60),
            login_throttle_entries: 100_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LimitSettings {
    /// Largest request body accepted (413 beyond).
    pub max_body_bytes: usize,
    /// Largest message content accepted (413 beyond).
    pub max_message_bytes: usize,
    /// Most messages accepted in one import.
    pub max_import_messages: usize,
    /// Default and maximum page sizes.
    pub default_page: u32,
    pub max_page: u32,
}

impl Default for LimitSettings {
    fn default() -> Self {
        Self {
            max_body_bytes: 1024 * 1024,
            max_message_bytes: 16 * 1024,
            max_import_messages: 1000,
            default_page: 50,
            max_page: 200,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct WsSettings {
    /// Server ping interval.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// A socket with no frame from the client for this long is closed.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Events queued per socket; a socket whose outbox is full is dropped (slow consumer).
    pub outbox_capacity: usize,
    /// Largest frame accepted from a client.
    pub max_message_bytes: usize,
    /// A write to a socket blocked this long (client not reading) drops the socket.
    #[serde(with = "humantime_serde")]
    pub send_timeout: Duration,
}

impl Default for WsSettings {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_secs(25),
            idle_timeout: Duration::from_secs(75),
            outbox_capacity: 1024,
            max_message_bytes: 64 * 1024,
            send_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct JobSettings {
    /// Concurrent AI reply jobs per instance (I/O bound).
    pub ai_concurrency: usize,
    /// Concurrent CPU-bound jobs per instance.
    pub heavy_concurrency: usize,
    #[serde(with = "humantime_serde")]
    pub ai_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub heavy_timeout: Duration,
    /// Retries after a failed attempt (exponential backoff).
    pub retries: usize,
    /// Fallback poll interval (new jobs from this instance wake workers at once).
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Prefix of the queue names, so deployments sharing a database stay apart.
    pub queue_prefix: String,
    /// Worker heartbeat; jobs held by a worker silent for two beats are re-enqueued
    /// (also when a worker dies on a database error and is rebuilt).
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
}

impl Default for JobSettings {
    fn default() -> Self {
        Self {
            ai_concurrency: 256,
            heavy_concurrency: 2,
            ai_timeout: Duration::from_secs(120),
            heavy_timeout: Duration::from_secs(300),
            retries: 3,
            poll_interval: Duration::from_millis(200),
            queue_prefix: String::new(),
            heartbeat_interval: Duration::from_secs(5),
        }
    }
}

/// Which model answers.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// Deterministic reply derived from the prompt; no network.
    Offline,
    /// OpenAI-compatible `/v1/chat/completions` with streaming.
    Openai,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LlmSettings {
    pub provider: Provider,
    /// Base URL; the client posts to `{base_url}/v1/chat/completions`.
    pub base_url: String,
    pub model: String,
    /// Bearer key; empty sends no Authorization header.
    pub api_key: String,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Longest wait for the first token.
    #[serde(with = "humantime_serde")]
    pub first_token_timeout: Duration,
    /// Longest gap between two streamed chunks.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Attempts made before the first token (never after).
    pub max_attempts: u32,
    /// Messages of history sent with the prompt.
    pub history_messages: u32,
    /// Offline provider: delay between tokens.
    #[serde(with = "humantime_serde")]
    pub token_delay: Duration,
}

impl Default for LlmSettings {
    fn default() -> Self {
        Self {
            provider: Provider::Offline,
            base_url: "https://api.openai.com".into(),
            model: "gpt-4o-mini".into(),
            api_key: String::new(),
            connect_timeout: Duration::from_secs(5),
            first_token_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(30),
            max_attempts: 3,
            history_messages: 20,
            token_delay: Duration::from_millis(20),
        }
    }
}

impl Settings {
    /// Defaults, then `path` if given (it must exist), then `WINGMAN_APP_*` variables.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(Settings::default()));
        if let Some(path) = path {
            if !path.exists() {
                return Err(ConfigError::Field {
                    field: "config file",
                    message: format!("{} does not exist", path.display()),
                });
            }
            fig = fig.merge(Toml::file(path));
        }
        fig = fig.merge(Env::prefixed("WINGMAN_APP_").split("__"));
        let settings: Settings = fig.extract().map_err(Box::new)?;
        settings.validate()?;
        Ok(settings)
    }

    /// Parses a TOML document on top of the defaults (no environment).
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        let settings: Settings = Figment::from(Serialized::defaults(Settings::default()))
            .merge(Toml::string(text))
            .extract()
            .map_err(Box::new)?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks values serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field, message: &str| {
            Err(ConfigError::Field {
                field,
                message: message.to_string(),
            })
        };
        if !self.server.metrics_listen.is_empty() && self.server.metrics_addr().is_none() {
            return bad(
                "server.metrics_listen",
                "must be an address and port (127.0.0.1:9464), or empty",
            );
        }
        if self.server.metrics_addr() == Some(self.server.listen) {
            return bad("server.metrics_listen", "must differ from server.listen");
        }
        let url = &self.database.url;
        if !(url.starts_with("sqlite:") || url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return bad("database.url", "must start with sqlite: or postgres://");
        }
        if self.database.max_connections == 0 {
            return bad("database.max_connections", "must be at least 1");
        }
        if self.database.min_connections > self.database.max_connections {
            return bad("database.min_connections", "must not exceed max_connections");
        }
        if !self
            .database
            .schema
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return bad("database.schema", "only letters, digits and _ are allowed");
        }
        if self.redis.enabled() && !self.redis.url.starts_with("redis://") && !self.redis.url.starts_with("rediss://") {
            return bad("redis.url", "must start with redis:// or rediss://");
        }
        if self.jobs.ai_concurrency == 0 || self.jobs.heavy_concurrency == 0 {
            return bad("jobs.ai_concurrency", "concurrency must be at least 1");
        }
        if self.auth.session_prune_interval.is_zero() {
            return bad("auth.session_prune_interval", "must be more than 0");
        }
        if self.auth.login_max_failures_per_user == 0 || self.auth.login_max_failures_per_addr == 0 {
            return bad(
                "auth.login_max_failures_per_user",
                "login failure limits must be at least 1",
            );
        }
        if self.auth.login_failure_window.is_zero() {
            return bad("auth.login_failure_window", "must be more than 0");
        }
        if self.ws.outbox_capacity == 0 {
            return bad("ws.outbox_capacity", "must be at least 1");
        }
        if self.limits.max_message_bytes > self.limits.max_body_bytes {
            return bad("limits.max_message_bytes", "must not exceed max_body_bytes");
        }
        if self.limits.default_page == 0 || self.limits.default_page > self.limits.max_page {
            return bad("limits.default_page", "must be between 1 and max_page");
        }
        if self.llm.provider == Provider::Openai && self.llm.base_url.is_empty() {
            return bad("llm.base_url", "required for the openai provider");
        }
        if self.llm.max_attempts == 0 {
            return bad("llm.max_attempts", "must be at least 1");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_example_equals_defaults() {
        let text = include_str!("../../conf/app.toml");
        let parsed = Settings::from_toml_str(text).expect("conf/app.toml parses");
        assert_eq!(parsed, Settings::default(), "conf/app.toml and Default disagree");
    }

    #[test]
    fn unknown_keys_and_bad_values_are_rejected() {
        let err = Settings::from_toml_str("[database]\nurll = \"x\"\n").unwrap_err();
        assert!(err.to_string().contains("urll"), "{err}");
        let err = Settings::from_toml_str("[database]\nurl = \"mysql://x\"\n").unwrap_err();
        assert!(err.to_string().contains("database.url"), "{err}");
        let err = Settings::from_toml_str("[ws]\nheartbeat_interval = \"soon\"\n").unwrap_err();
        assert!(err.to_string().contains("heartbeat_interval"), "{err}");
    }
}
