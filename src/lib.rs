//! wingman-edge: the edge tier of the Wingman chat backend, on pingora.
//!
//! Request path: [`listener`] (header deadline and size cap) -> [`proxy`] (one
//! [`snapshot`] per request, [`route`] match, [`upstream`] selection, forwarding)
//! -> origin. [`reload`] swaps snapshots on SIGHUP; [`admin`] serves metrics and
//! status. [`app`] assembles the pingora server.

pub mod accesslog;
pub mod admin;
pub mod app;
pub mod buffer;
pub mod cache;
pub mod compress;
pub mod config;
pub mod listener;
pub mod metrics;
pub mod proxy;
pub mod ratelimit;
pub mod reload;
pub mod route;
pub mod sdnotify;
pub mod snapshot;
pub mod tls;
pub mod upgrade;
pub mod upstream;
