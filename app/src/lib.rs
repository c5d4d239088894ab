//! wingman-app: the chat app server of Wingman Edge (REST + WebSocket, SQLite or
//! PostgreSQL, query cache, AI job queues). A library with a thin binary, so other code
//! (the local stack, tests) can run instances in-process with [`serve`] / [`serve_with`].

pub mod bus;
pub mod cache;
pub mod config;
pub mod http;
pub mod jobs;
pub mod llm;
pub mod redis_gate;
pub mod store;
pub mod telemetry;
pub mod ws;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use bus::{EventBus, InProcessBus};
pub use config::Settings;

/// Why an instance could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("storage: {0}")]
    Store(#[from] store::StoreError),
    #[error("redis at {url}: {source}")]
    Redis {
        url: String,
        #[source]
        source: redis::RedisError,
    },
    #[error("event bus: {0}")]
    Bus(#[from] bus::BusError),
    #[error("job queues: {0}")]
    Jobs(#[from] jobs::JobError),
    #[error("llm provider: {0}")]
    Llm(#[from] llm::LlmError),
    #[error("http server: {0}")]
    Io(#[from] std::io::Error),
}

/// Options for embedding several instances in one process.
#[derive(Default)]
pub struct Options {
    /// Where to serve `/metrics` (the public listener never serves it). The binary binds
    /// `server.metrics_listen`; without a listener here, the instance serves no metrics.
    pub metrics_listener: Option<TcpListener>,
    /// Share one bus between instances of this process, so WebSocket events and cache
    /// invalidations reach sockets on every instance. Ignored when Redis is configured
    /// (Redis pub/sub is used). Without Redis and without this, each instance has its own.
    pub bus: Option<Arc<dyn EventBus>>,
    /// A name for logs, metrics and job worker names (default: random).
    pub instance: Option<String>,
}

/// Runs one instance on `listener` until `shutdown` completes, then drains in-flight
/// requests, WebSockets and running jobs (bounded by `server.shutdown_grace`).
pub async fn serve(
    settings: Settings,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AppError> {
    serve_with(settings, listener, shutdown, Options::default()).await
}

/// [`serve`] with [`Options`].
pub async fn serve_with(
    settings: Settings,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    options: Options,
) -> Result<(), AppError> {
    settings.validate()?;
    let instance = options
        .instance
        .clone()
        .unwrap_or_else(|| hex::encode(rand::random::<[u8; 4]>()));
    let metrics = telemetry::metrics_handle();
    let store::Opened { store, sqlite_writer } = store::open(&settings.database).await?;

    let redis = if settings.redis.enabled() {
        let url = settings.redis.url.clone();
        let rerr = |source| AppError::Redis {
            url: url.clone(),
            source,
        };
        let client = redis::Client::open(url.as_str()).map_err(rerr)?;
        let op = settings.redis.op_timeout;
        let cfg = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(op))
            .set_response_timeout(Some(op))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conn = client.get_connection_manager_with_config(cfg).await.map_err(rerr)?;
        let gate = Arc::new(cache::RedisGate::new(op, settings.redis.retry_after));
        Some((client, conn, gate))
    } else {
        None
    };
    let bus: Arc<dyn EventBus> = match (&redis, options.bus) {
        (Some((client, conn, gate)), _) => {
            Arc::new(bus::RedisBus::connect(client.clone(), conn.clone(), gate.clone(), &settings.redis.prefix).await?)
        }
        (None, Some(shared)) => shared,
        (None, None) => Arc::new(InProcessBus::new()),
    };
    let cache = Arc::new(match &redis {
        Some((_, conn, gate)) => {
            cache::QueryCache::redis(conn.clone(), gate.clone(), &settings.redis.prefix, settings.cache.ttl)
        }
        None => cache::QueryCache::moka(settings.cache.max_entries, settings.cache.ttl),
    });
    let model = llm::from_settings(&settings.llm)?;
    let dummy_hash = http::users::dummy_hash(&settings.auth).await.map_err(|e| {
        AppError::Config(config::ConfigError::Field {
            field: "auth.argon2_memory_kib",
            message: format!("argon2: {e}"),
        })
    })?;
    let stop = CancellationToken::new();
    let job_ctx = Arc::new(jobs::JobContext {
        store: store.clone(),
        bus: bus.clone(),
        cache: cache.clone(),
        model,
        llm: settings.llm.clone(),
    });
    let worker_stop = CancellationToken::new();
    let (queues, workers) = jobs::start(
        &settings.database,
        sqlite_writer,
        &settings.jobs,
        job_ctx,
        &instance,
        worker_stop.clone(),
    )
    .await?;

    let state = http::AppState(Arc::new(http::Inner {
        auth_cache: http::sessions::AuthCache::new(settings.cache.auth_ttl),
        login_throttle: http::throttle::LoginThrottle::new(&settings.auth),
        dummy_hash,
        hub: Arc::new(ws::Hub::new(settings.ws.outbox_capacity)),
        settings: settings.clone(),
        instance: instance.clone(),
        store: store.clone(),
        cache,
        bus: bus.clone(),
        queues,
        redis: redis.map(|(_, c, _)| c),
        metrics,
        shutdown: stop.clone(),
        ws_tasks: TaskTracker::new(),
    }));
    let dispatcher = tokio::spawn(ws::run_dispatcher(state.clone(), bus.subscribe()));
    let pruner = tokio::spawn(http::sessions::prune_expired(
        store.clone(),
        settings.auth.session_prune_interval,
        stop.clone(),
    ));
    let router = http::router(state.clone());
    tracing::info!(
        instance,
        addr = ?listener.local_addr().ok(),
        store = store.backend(),
        bus = bus.kind(),
        cache = state.cache.kind(),
        "wingman-app listening"
    );

    let stop_signal = stop.clone();
    tokio::spawn(async move {
        shutdown.await;
        stop_signal.cancel();
    });
    if let Some(metrics_listener) = options.metrics_listener {
        tracing::info!(addr = ?metrics_listener.local_addr().ok(), "metrics listening");
        let metrics_stop = stop.clone();
        let app = http::health::metrics_router(state.clone());
        tokio::spawn(async move {
            let served = axum::serve(metrics_listener, app)
                .with_graceful_shutdown(async move { metrics_stop.cancelled().await })
                .await;
            if let Err(e) = served {
                tracing::warn!(error = %e, "metrics listener failed");
            }
        });
    }
    let http_stop = stop.clone();
    // (the peer address: the login throttle counts failures per client address)
    let served = axum::serve(
        listener,
        router.into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(async move { http_stop.cancelled().await })
    .await;

    // Drain: HTTP is done; sockets were told to close; jobs finish what they hold.
    let grace = settings.server.shutdown_grace;
    stop.cancel();
    state.ws_tasks.close();
    worker_stop.cancel();
    let drained = tokio::time::timeout(grace, async {
        state.ws_tasks.wait().await;
        workers.wait().await;
    })
    .await;
    if drained.is_err() {
        tracing::warn!(?grace, "shutdown grace elapsed with work still running");
    }
    dispatcher.abort();
    pruner.abort();
    store.close().await;
    tracing::info!(instance, "wingman-app stopped");
    served.map_err(AppError::Io)
}
