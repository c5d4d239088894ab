//! Loading a configuration and publishing it: at start and on every SIGHUP.
//!
//! [`Reloader::reload`] parses, validates and builds a complete snapshot off to the
//! side; only a fully built snapshot is stored. Any error leaves the running
//! snapshot untouched, is logged, and counts in `config_reloads_total{result="error"}`.
//! Listener changes cannot apply in-process (pingora binds at start): such a reload
//! applies everything else and reports that a restart or upgrade is needed.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use std::collections::HashMap;

use arc_swap::ArcSwap;

use crate::tls::SniResolver;

use crate::config;
use crate::metrics::Metrics;
use crate::snapshot::{Snapshot, SnapshotHandle};
use crate::upstream::Registry;

/// Why a load or reload failed.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{0}")]
    Config(#[from] config::ConfigError),
    #[error("{0}")]
    Build(#[from] crate::snapshot::BuildError),
}

/// Owns the path of the config file and the published snapshot.
pub struct Reloader {
    pub path: PathBuf,
    pub snapshots: SnapshotHandle,
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    generation: AtomicU64,
    /// The listeners and admin address bound at start (they cannot change in-process).
    bound: crate::snapshot::BoundSockets,
    /// Certificate resolvers of the TLS listeners, by address.
    resolvers: parking_lot::Mutex<HashMap<std::net::SocketAddr, Arc<SniResolver>>>,
    /// Serializes reloads (two SIGHUPs in a row are handled one after the other).
    lock: tokio::sync::Mutex<()>,
}

/// What a successful reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reloaded {
    pub generation: u64,
    pub restart_needed: bool,
}

impl Reloader {
    /// Loads the file for the first time and publishes generation 1.
    pub async fn start(
        path: PathBuf,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
    ) -> Result<(Arc<Reloader>, config::Config), ReloadError> {
        let cfg = config::load(&path)?;
        let snap = Snapshot::build(&cfg, &path.display().to_string(), 1, &registry).await?;
        metrics.generation.set(1);
        let bound = crate::snapshot::BoundSockets::of(&snap);
        let r = Reloader {
            bound,
            resolvers: parking_lot::Mutex::new(HashMap::new()),
            path,
            snapshots: Arc::new(ArcSwap::from_pointee(snap)),
            registry,
            metrics,
            generation: AtomicU64::new(1),
            lock: tokio::sync::Mutex::new(()),
        };
        Ok((Arc::new(r), cfg))
    }

    /// Re-reads the file and swaps in the new snapshot, or keeps the old one.
    pub async fn reload(&self) -> Result<Reloaded, ReloadError> {
        let _one_at_a_time = self.lock.lock().await;
        let result = self.try_reload().await;
        match &result {
            Ok(r) => {
                self.metrics.reloads.with_label_values(&["ok"]).inc();
                self.metrics.generation.set(r.generation as i64);
                self.metrics.restart_needed.set(r.restart_needed as i64);
                if r.restart_needed {
                    log::warn!(
                        "config generation {} loaded; listener changes need a restart or binary upgrade",
                        r.generation
                    );
                } else {
                    log::info!("config generation {} loaded", r.generation);
                }
            }
            Err(e) => {
                self.metrics.reloads.with_label_values(&["error"]).inc();
                log::error!("reload failed, keeping the running config:\n{e}");
            }
        }
        result
    }

    async fn try_reload(&self) -> Result<Reloaded, ReloadError> {
        let cfg = config::load(&self.path)?;
        let generation = self.generation.load(Ordering::Acquire) + 1;
        let snap = Snapshot::build(
            &cfg,
            &self.path.display().to_string(),
            generation,
            &self.registry,
        )
        .await?;
        let restart_needed = self.bound != crate::snapshot::BoundSockets::of(&snap);
        // new handshakes use the new certificates; established connections keep theirs
        {
            let resolvers = self.resolvers.lock();
            for l in &snap.listeners {
                if let (Some(certs), Some(r)) = (&l.certs, resolvers.get(&l.addr)) {
                    r.swap(certs.clone());
                }
            }
        }
        self.snapshots.store(Arc::new(snap));
        self.generation.store(generation, Ordering::Release);
        Ok(Reloaded {
            generation,
            restart_needed,
        })
    }

    /// Registers the certificate resolver of a TLS listener (at start).
    pub fn register_resolver(&self, addr: std::net::SocketAddr, resolver: Arc<SniResolver>) {
        self.resolvers.lock().insert(addr, resolver);
    }

    pub fn current(&self) -> Arc<Snapshot> {
        self.snapshots.load_full()
    }
}
