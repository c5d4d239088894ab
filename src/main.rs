//! `wingman-edge`: run the edge, or check a configuration like `nginx -t`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

// glibc malloc showed up at ~10% of a request's CPU under load; jemalloc is what
// pingora's own examples use.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "wingman-edge",
    version,
    about = "Edge proxy for the Wingman chat backend"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the edge with a configuration file.
    Run {
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
        /// Take the listening sockets over from a running wingman-edge (graceful upgrade).
        #[arg(short, long)]
        upgrade: bool,
        /// Detach and run in the background.
        #[arg(short, long)]
        daemon: bool,
    },
    /// Check a configuration file: exit 0 with a summary, or 1 listing every problem.
    Check {
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Check the file, then tell the running edge (its pid file) to reload it.
    Reload {
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Stop the running edge: drain (SIGTERM), or at once with --fast (SIGINT).
    Stop {
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
        #[arg(long)]
        fast: bool,
    },
    /// Replace the running edge with this binary without dropping connections:
    /// start it with --upgrade, ask the old process to hand the sockets over
    /// (SIGQUIT); the old one drains once the new one serves. Exit 1 when the new
    /// process fails (the old one keeps serving).
    Upgrade {
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match cli.command {
        Command::Check { config } => match wingman_edge::app::check(config.clone()) {
            Ok(cfg) => {
                println!("{}: ok: {}", config.display(), cfg.summary());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        Command::Reload { config } => control(&config, Control::Reload),
        Command::Stop { config, fast } => control(
            &config,
            if fast {
                Control::StopFast
            } else {
                Control::Stop
            },
        ),
        Command::Upgrade { config } => control(&config, Control::Upgrade),
        Command::Run {
            config,
            upgrade,
            daemon,
        } => match wingman_edge::app::run(wingman_edge::app::RunOptions {
            config,
            upgrade,
            daemon,
        }) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("wingman-edge: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

enum Control {
    Reload,
    Stop,
    StopFast,
    Upgrade,
}

/// Signals the running edge found through the config's pid file.
fn control(config: &std::path::Path, what: Control) -> ExitCode {
    let cfg = match what {
        // a reload or an upgrade of a file that would not load changes nothing: say so
        Control::Reload | Control::Upgrade => {
            match wingman_edge::app::check(config.to_path_buf()) {
                Ok(cfg) => cfg,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::FAILURE;
                }
            }
        }
        Control::Stop | Control::StopFast => match wingman_edge::config::load(config) {
            Ok(cfg) => cfg,
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::FAILURE;
            }
        },
    };
    let pid_file = &cfg.server.pid_file;
    let pid = match read_pid(pid_file) {
        Ok(pid) => nix::unistd::Pid::from_raw(pid),
        Err(e) => {
            eprintln!(
                "wingman-edge: cannot read pid file {}: {e}",
                pid_file.display()
            );
            return ExitCode::FAILURE;
        }
    };
    use nix::sys::signal::{kill, Signal};
    let result = match what {
        Control::Reload => kill(pid, Signal::SIGHUP),
        Control::Stop => kill(pid, Signal::SIGTERM),
        Control::StopFast => kill(pid, Signal::SIGINT),
        Control::Upgrade => return upgrade(config, &cfg, pid),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wingman-edge: signalling pid {pid}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn read_pid(pid_file: &std::path::Path) -> Result<i32, String> {
    std::fs::read_to_string(pid_file)
        .map_err(|e| e.to_string())
        .and_then(|s| s.trim().parse::<i32>().map_err(|e| e.to_string()))
}

/// Starts the new process (`run --upgrade`), asks the old one to hand the sockets
/// over (SIGQUIT), and waits for the outcome: the new process serving (it writes
/// the pid file once the old one accepted its ready report) or failing (it exits,
/// or is not ready within `server.upgrade_timeout`; the old one keeps serving).
fn upgrade(
    config: &std::path::Path,
    cfg: &wingman_edge::config::Config,
    old: nix::unistd::Pid,
) -> ExitCode {
    use nix::sys::signal::{kill, Signal};
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("wingman-edge: cannot find this binary: {e}");
            return ExitCode::FAILURE;
        }
    };
    let child = std::process::Command::new(exe)
        .args(["run", "--upgrade", "-c"])
        .arg(config)
        .stdin(std::process::Stdio::null())
        // never hold the caller's stdout open (a `$(wingman-edge upgrade)` would
        // wait for the new process to exit); logs go to stderr as usual
        .stdout(std::process::Stdio::null())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            eprintln!("wingman-edge: cannot start the new process: {e}");
            return ExitCode::FAILURE;
        }
    };
    let new = child.id() as i32;
    // the old process sends the sockets once the new one listens for them
    if let Err(e) = kill(old, Signal::SIGQUIT) {
        let _ = child.kill();
        let _ = child.wait();
        eprintln!("wingman-edge: signalling the old process {old}: {e}");
        return ExitCode::FAILURE;
    }
    let pid_file = &cfg.server.pid_file;
    let limit = cfg.server.upgrade_timeout.get() + std::time::Duration::from_secs(5);
    let deadline = std::time::Instant::now() + limit;
    let failed = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break format!("the new process exited ({status})");
        }
        if read_pid(pid_file) == Ok(new) {
            println!(
                "upgraded: pid {new} serves (pid file {}), old pid {old} drains",
                pid_file.display()
            );
            return ExitCode::SUCCESS;
        }
        if std::time::Instant::now() >= deadline {
            // it drains what it accepted and exits
            let _ = kill(nix::unistd::Pid::from_raw(new), Signal::SIGTERM);
            break format!("the new process was not ready within {limit:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    eprintln!("wingman-edge: upgrade failed: {failed}; the old process {old} keeps serving");
    ExitCode::FAILURE
}
