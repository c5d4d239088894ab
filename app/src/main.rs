//! The `wingman-app` binary: loads settings (`--config conf/app.toml` plus
//! `WINGMAN_APP_*` variables), binds `server.listen` (and `server.metrics_listen` for
//! `/metrics`), and serves until SIGTERM or Ctrl-C.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(name = "wingman-app", version, about = "Wingman chat app server")]
struct Cli {
    /// TOML settings file (see conf/app.toml); defaults apply when omitted.
    #[arg(short, long)]
    config: Option<PathBuf>,
    /// Check the settings and exit.
    #[arg(long)]
    check: bool,
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutdown requested");
}

#[tokio::main]
async fn main() -> ExitCode {
    wingman_app::telemetry::init_logging();
    let cli = Cli::parse();
    let settings = match wingman_app::Settings::load(cli.config.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("wingman-app: {e}");
            return ExitCode::from(2);
        }
    };
    if cli.check {
        println!(
            "configuration ok: database {}, redis {}",
            settings.database.url,
            if settings.redis.enabled() { "on" } else { "off" }
        );
        return ExitCode::SUCCESS;
    }
    let listener = match tokio::net::TcpListener::bind(settings.server.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("wingman-app: cannot listen on {}: {e}", settings.server.listen);
            return ExitCode::from(1);
        }
    };
    let metrics_listener = match settings.server.metrics_addr() {
        None => None,
        Some(addr) => match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => Some(l),
            Err(e) => {
                eprintln!("wingman-app: cannot listen on {addr} (server.metrics_listen): {e}");
                return ExitCode::from(1);
            }
        },
    };
    let options = wingman_app::Options {
        metrics_listener,
        ..Default::default()
    };
    match wingman_app::serve_with(settings, listener, shutdown_signal(), options).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wingman-app: {e}");
            ExitCode::from(1)
        }
    }
}
