//! Assembles the pingora server from a configuration file and runs it.
//!
//! Order matters: the SIGHUP handler is installed first (SIGHUP's default action
//! would kill the process), then the config is loaded and the first snapshot built,
//! then pingora's server, the proxy services (one per distinct h2c setting), the
//! admin service and the health checker are added, and the reload thread starts.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use pingora::proxy::HttpProxy;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::Server;
use pingora::services::background::background_service;
use pingora::services::listening::Service;
use signal_hook::consts::{SIGHUP, SIGQUIT, SIGUSR2};
use signal_hook::iterator::Signals;

use crate::admin::Admin;
use crate::cache::store::{CacheStore, StoreConfig};
use crate::config::Config;
use crate::listener::EdgeApp;
use crate::metrics::Metrics;
use crate::proxy::Edge;
use crate::reload::{ReloadError, Reloader};
use crate::tls::SniResolver;
use crate::upstream::health::HealthChecker;
use crate::upstream::Registry;
use pingora::listeners::tls::TlsSettings;

/// How `run` was asked to start.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub config: PathBuf,
    /// Take the listening sockets over from a running process (graceful upgrade).
    pub upgrade: bool,
    pub daemon: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Config(#[from] ReloadError),
    #[error("cannot install the SIGHUP handler: {0}")]
    Signal(std::io::Error),
    #[error("cannot start a runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot open the cache: {0}")]
    Cache(std::io::Error),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("access log: {0}")]
    AccessLog(String),
    #[error("client.max_conns_per_ip: {0}")]
    ConnLimit(String),
}

/// pingora's TLS settings want handshake callbacks; the edge needs none.
struct NoCallbacks;

#[async_trait::async_trait]
impl pingora::listeners::TlsAccept for NoCallbacks {}

/// Loads and fully builds the configuration without starting anything (the `check`
/// command): the same parsing, validation and name resolution as `run`.
pub fn check(path: PathBuf) -> Result<Config, ReloadError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            ReloadError::Build(crate::snapshot::BuildError(vec![format!(
                "cannot start a runtime: {e}"
            )]))
        })?;
    rt.block_on(async {
        let (_, cfg) = Reloader::start(path, Registry::new(), Arc::new(Metrics::new())).await?;
        Ok(cfg)
    })
}

/// Starts the edge and serves until it is told to stop. Returns only on a start error.
pub fn run(opts: RunOptions) -> Result<(), StartError> {
    // SIGUSR2 and SIGQUIT (upgrades) too: their default actions would end the process
    let mut signals = Signals::new([SIGHUP, SIGUSR2, SIGQUIT]).map_err(StartError::Signal)?;
    // the binary as started: after it is replaced on disk, /proc/self/exe names a
    // deleted file, but this path names the new one
    let exe = std::env::args_os()
        .next()
        .map(PathBuf::from)
        .and_then(|p| std::fs::canonicalize(p).ok())
        .or_else(|| std::env::current_exe().ok());
    let metrics = Arc::new(Metrics::new());
    let registry = Registry::new();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(StartError::Runtime)?;
    let (reloader, cfg) = rt.block_on(Reloader::start(
        opts.config.clone(),
        registry,
        metrics.clone(),
    ))?;
    metrics.reloads.with_label_values(&["ok"]).inc();
    let cache = rt
        .block_on(CacheStore::open(&StoreConfig {
            memory_bytes: cfg.cache.memory.get() as usize,
            max_object_bytes: cfg.cache.max_object.get() as usize,
            disk: cfg
                .cache
                .disk_dir
                .clone()
                .map(|d| (d, cfg.cache.disk_max.get())),
        }))
        .map_err(StartError::Cache)?;
    let access_log = match &cfg.access_log {
        None => None,
        Some(a) => {
            let format: crate::accesslog::Format =
                a.format
                    .parse()
                    .map_err(|e: crate::accesslog::AccessLogError| {
                        StartError::AccessLog(e.to_string())
                    })?;
            let fields = if a.fields.is_empty() {
                format.default_fields()
            } else {
                crate::accesslog::parse_fields(&a.fields)
                    .map_err(|e| StartError::AccessLog(e.to_string()))?
            };
            let log = crate::accesslog::AccessLog::start(&crate::accesslog::AccessLogConfig {
                destination: crate::accesslog::Destination::parse(&a.path),
                format: crate::accesslog::LogFormat::new(format, fields),
                buffer_records: a.buffer,
                flush_interval: crate::accesslog::DEFAULT_FLUSH_INTERVAL,
            })
            .map_err(|e| StartError::AccessLog(e.to_string()))?;
            let log = Arc::new(log);
            metrics.watch_access_log(log.clone());
            Some(log)
        }
    };
    let conn_limit = (cfg.client.max_conns_per_ip > 0)
        .then(|| crate::ratelimit::ConnLimiter::new(cfg.client.max_conns_per_ip))
        .transpose()
        .map_err(|e| StartError::ConnLimit(e.to_string()))?;

    // /run/wingman-edge outside systemd (which creates it as the RuntimeDirectory)
    for file in [&cfg.server.pid_file, &cfg.server.upgrade_sock] {
        if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
            use std::os::unix::fs::DirBuilderExt;
            if let Err(e) = std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
            {
                log::warn!("cannot create {}: {e}", dir.display());
            }
        }
    }
    let conf = server_conf(&cfg, opts.daemon);
    let opt = Opt {
        upgrade: opts.upgrade,
        daemon: opts.daemon,
        nocapture: false,
        test: false,
        conf: None,
    };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();
    let server_conf = server.configuration.clone();
    let table = crate::upgrade::ListenerTable::default();
    server.add_service(table.service());
    // every address given to pingora, as it keys its socket table
    let mut listen_addrs = vec![cfg.admin.address.clone()];

    // one proxy service per kind of listener (server options are per service):
    // cleartext with h2c, cleartext without, and TLS (h2 over ALPN)
    let snap = reloader.current();
    let mut groups: BTreeMap<&'static str, Vec<&crate::snapshot::ListenerSnap>> = BTreeMap::new();
    for l in &snap.listeners {
        let kind = match (&l.certs, l.h2c) {
            (Some(_), _) => "edge (tls)",
            (None, true) => "edge (h1+h2c)",
            (None, false) => "edge (h1)",
        };
        groups.entry(kind).or_default().push(l);
    }
    for (name, listeners) in groups {
        let mut proxy = HttpProxy::new(
            Edge {
                snapshots: reloader.snapshots.clone(),
                metrics: metrics.clone(),
                cache: Some(cache),
                access_log: access_log.clone(),
            },
            server_conf.clone(),
        );
        proxy.handle_init_modules();
        let mut options = pingora::apps::HttpServerOptions::default();
        options.h2c = name == "edge (h1+h2c)";
        options.keepalive_request_limit =
            (cfg.client.keepalive_requests > 0).then_some(cfg.client.keepalive_requests);
        options.h2_idle_timeout = Some(cfg.client.keepalive_timeout.get());
        proxy.server_options = Some(options);
        // TLS listeners are bound as plain TCP: EdgeApp takes the per-address slot
        // at accept and runs the handshake under client.header_timeout
        let mut tls = Vec::new();
        for l in &listeners {
            listen_addrs.push(l.addr.to_string());
            let Some(certs) = &l.certs else {
                continue;
            };
            let resolver = SniResolver::new_shared(certs.clone());
            reloader.register_resolver(l.addr, resolver.clone());
            let tls_cfg = cfg
                .listeners
                .iter()
                .find(|c| c.address.parse().ok() == Some(l.addr))
                .and_then(|c| c.tls.clone());
            let mut settings = TlsSettings::with_callbacks(Box::new(NoCallbacks))
                .map_err(|e| StartError::Tls(e.to_string()))?;
            settings.set_cert_resolver(resolver);
            if tls_cfg.as_ref().is_none_or(|t| t.h2) {
                settings.enable_h2();
            }
            if let Some(ca) = tls_cfg.as_ref().and_then(|t| t.client_ca.as_ref()) {
                settings.set_client_cert_verifier(
                    crate::tls::client_verifier(ca).map_err(StartError::Tls)?,
                );
            }
            tls.push((l.addr, Arc::new(settings.build())));
        }
        let app = EdgeApp {
            proxy: Arc::new(proxy),
            snapshots: reloader.snapshots.clone(),
            metrics: metrics.clone(),
            conn_limit: conn_limit.clone(),
            tls,
        };
        let mut service = Service::new(name.to_string(), app);
        for l in listeners {
            service.add_tcp(&l.addr.to_string());
        }
        service.threads = Some(cfg.server.threads);
        server.add_service(service);
    }

    let mut admin = Service::new(
        "admin".to_string(),
        Admin {
            snapshots: reloader.snapshots.clone(),
            metrics: metrics.clone(),
            cache: Some(cache),
        },
    );
    admin.add_tcp(&cfg.admin.address);
    admin.threads = Some(1);
    server.add_service(admin);

    server.add_service(background_service(
        "health checks",
        HealthChecker {
            snapshots: reloader.snapshots.clone(),
            metrics: metrics.clone(),
            connector: Arc::new(pingora::connectors::TransportConnector::new(Some(
                pingora::connectors::ConnectorOptions::from_server_conf(&server.configuration),
            ))),
        },
    ));

    let (upgrades, requests) = tokio::sync::mpsc::unbounded_channel();
    let reload_thread = reloader.clone();
    std::thread::Builder::new()
        .name("sighup".into())
        .spawn(move || {
            for signal in signals.forever() {
                if signal == SIGUSR2 || signal == SIGQUIT {
                    let trigger = if signal == SIGUSR2 {
                        crate::upgrade::Trigger::Spawn
                    } else {
                        crate::upgrade::Trigger::External
                    };
                    let _ = upgrades.send(trigger);
                    continue;
                }
                log::info!("SIGHUP: reloading {}", reload_thread.path.display());
                let _ = rt.block_on(reload_thread.reload());
                // logrotate: rename the file, then SIGHUP
                if let Some(log) = &access_log {
                    log.reopen();
                }
            }
        })
        .map_err(StartError::Runtime)?;

    // once the services run and every listener is up: after an upgrade, tell the
    // old process (which drains only then); write the pid file; tell systemd
    // (Type=notify), which after an upgrade also names this process as the main one
    let mut phases = server.watch_execution_phase();
    let stop = Arc::new(tokio::sync::Notify::new());
    let stop_on_failure = stop.clone();
    let ready = Readiness {
        table: table.clone(),
        listen_addrs,
        upgrade: opts.upgrade,
        upgrade_sock: cfg.server.upgrade_sock.clone(),
        pid_file: (!opts.daemon).then(|| cfg.server.pid_file.clone()),
        timeout: cfg.server.upgrade_timeout.get(),
    };
    std::thread::Builder::new()
        .name("sd-notify".into())
        .spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().build() else {
                return;
            };
            rt.block_on(async move {
                while let Ok(phase) = phases.recv().await {
                    if matches!(phase, pingora::server::ExecutionPhase::Running) {
                        return;
                    }
                }
            });
            if let Err(e) = ready.announce() {
                // drain what was accepted on the (maybe shared) sockets, then exit 1
                log::error!("wingman-edge cannot serve: {e}; stopping");
                START_FAILED.store(true, std::sync::atomic::Ordering::SeqCst);
                stop_on_failure.notify_one();
            }
        })
        .map_err(StartError::Runtime)?;

    let signals = crate::upgrade::Signals {
        handover: crate::upgrade::Handover {
            table,
            exe,
            config: opts.config.clone(),
            upgrade_sock: cfg.server.upgrade_sock.clone(),
            timeout: cfg.server.upgrade_timeout.get(),
            metrics: metrics.clone(),
            child_drain: cfg.server.grace_period.get() + cfg.server.graceful_shutdown_timeout.get(),
            ready_task: Default::default(),
        },
        requests: tokio::sync::Mutex::new(requests),
        stop,
    };
    log::info!("wingman-edge started: {}", cfg.summary());
    server.run(pingora::server::RunArgs {
        shutdown_signal: Box::new(signals),
    });
    std::process::exit(i32::from(
        START_FAILED.load(std::sync::atomic::Ordering::SeqCst),
    ))
}

/// Set when the process could not get ready (it stops, and exits 1).
static START_FAILED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// What a starting process does once pingora runs its services.
struct Readiness {
    table: crate::upgrade::ListenerTable,
    listen_addrs: Vec<String>,
    upgrade: bool,
    upgrade_sock: PathBuf,
    pid_file: Option<PathBuf>,
    timeout: std::time::Duration,
}

impl Readiness {
    fn announce(self) -> Result<(), String> {
        let deadline = std::time::Instant::now() + self.timeout;
        loop {
            let missing = self.table.missing(&self.listen_addrs);
            if missing.is_empty() {
                break;
            }
            if std::time::Instant::now() >= deadline {
                return Err(format!(
                    "listeners not up after {:?}: {}",
                    self.timeout,
                    missing.join(", ")
                ));
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        if self.upgrade {
            crate::upgrade::report_ready(&self.upgrade_sock)?;
        }
        if let Some(pid_file) = &self.pid_file {
            if let Err(e) = std::fs::write(pid_file, format!("{}\n", std::process::id())) {
                log::warn!("cannot write pid file {}: {e}", pid_file.display());
            }
        }
        crate::sdnotify::ready();
        Ok(())
    }
}

fn server_conf(cfg: &Config, daemon: bool) -> ServerConf {
    let s = &cfg.server;
    ServerConf {
        threads: s.threads,
        daemon,
        pid_file: s.pid_file.display().to_string(),
        upgrade_sock: s.upgrade_sock.display().to_string(),
        grace_period_seconds: Some(s.grace_period.get().as_secs()),
        graceful_shutdown_timeout_seconds: Some(s.graceful_shutdown_timeout.get().as_secs()),
        upstream_keepalive_pool_size: s.upstream_keepalive_pool_size,
        ca_file: s.upstream_ca_file.as_ref().map(|p| p.display().to_string()),
        ..ServerConf::default()
    }
}
