//! Binary upgrades that cannot take the edge down.
//!
//! pingora's own hand-over (on SIGQUIT: send the listening sockets to whoever
//! listens on `upgrade_sock`, wait 5 s, drain) stops the old process whether or not
//! the new one ever serves. Here the old process keeps serving until the new one
//! says it serves, and stays when it does not within `server.upgrade_timeout`:
//!
//! 1. SIGUSR2: `BINARY check -c CONFIG` with the binary now on disk, then
//!    `BINARY run --upgrade -c CONFIG` as a child. SIGQUIT: someone else (the
//!    `upgrade` command) has started the new process.
//! 2. The old process listens on `<upgrade_sock>.ready` (mode 0600), then sends its
//!    listening sockets to `upgrade_sock`, retrying until the new process listens.
//! 3. The new process starts its services; once every configured listener is up
//!    it connects to `<upgrade_sock>.ready` and writes `READY <pid>`; the old one
//!    answers `OK` and drains (as on SIGTERM). Only then does the new process write
//!    the pid file and tell systemd it is the main process.
//! 4. No `READY` in time, or the new process exited: the old process logs it,
//!    counts `wingman_edge_upgrade_failures_total`, stops its child (SIGUSR2:
//!    SIGTERM, so connections the child already accepted are served; SIGKILL if it
//!    is still there after its drain time) and keeps serving. A new process that
//!    reports later is answered `NO` and drains.
//!
//! A new process whose predecessor has no `.ready` socket (a build from before this
//! handshake) goes on serving, as pingora's hand-over did.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use pingora::server::{ListenFds, ShutdownSignal, ShutdownSignalWatch, ShutdownWatch};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::metrics::Metrics;

/// What asked for an upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// SIGUSR2: start the binary on disk as a child.
    Spawn,
    /// SIGQUIT: a new process started elsewhere waits for the sockets.
    External,
}

/// Where the old process waits for the new one's `READY`.
pub fn ready_path(upgrade_sock: &Path) -> PathBuf {
    let mut p = upgrade_sock.as_os_str().to_owned();
    p.push(".ready");
    PathBuf::from(p)
}

/// pingora's table of listening sockets (bind address -> fd), which pingora hands
/// to every service at start. Kept to send it in an upgrade and to see which
/// listeners are up.
#[derive(Clone, Default)]
pub struct ListenerTable(Arc<OnceLock<ListenFds>>);

impl ListenerTable {
    /// The configured listener addresses that have no socket yet.
    pub fn missing(&self, expected: &[String]) -> Vec<String> {
        let Some(table) = self.0.get() else {
            return expected.to_vec();
        };
        let table = table.lock();
        expected
            .iter()
            .filter(|a| table.get(a).is_none())
            .cloned()
            .collect()
    }

    /// A pingora service that only takes the table.
    pub fn service(&self) -> TableService {
        TableService(self.clone())
    }
}

pub struct TableService(ListenerTable);

#[async_trait]
impl pingora::services::Service for TableService {
    async fn start_service(
        &mut self,
        fds: Option<ListenFds>,
        mut shutdown: ShutdownWatch,
        _listeners_per_fd: usize,
    ) {
        if let Some(fds) = fds {
            let _ = self.0 .0.set(fds);
        }
        let _ = shutdown.changed().await;
    }

    fn name(&self) -> &str {
        "listener table"
    }

    fn threads(&self) -> Option<usize> {
        Some(1)
    }

    fn listen_addresses(&self) -> Option<Vec<String>> {
        Some(Vec::new())
    }
}

/// The old process's side of an upgrade.
pub struct Handover {
    pub table: ListenerTable,
    /// The binary as started (its path now names the new one), for SIGUSR2.
    pub exe: Option<PathBuf>,
    pub config: PathBuf,
    pub upgrade_sock: PathBuf,
    pub timeout: Duration,
    pub metrics: Arc<Metrics>,
    /// How long a stopped child may drain (grace period + shutdown timeout).
    pub child_drain: Duration,
    /// The task answering on the `.ready` socket of the last attempt.
    pub ready_task: Mutex<Option<tokio::task::AbortHandle>>,
}

/// The attempt a `READY` may complete: the child's pid when this process started it.
struct Expected {
    pid: Option<u32>,
    ready: oneshot::Sender<u32>,
}

type Slot = Arc<Mutex<Option<Expected>>>;

/// Stops the child unless disarmed (a failed attempt leaves no half-started edge):
/// SIGTERM, so what it accepted on the shared sockets is served, then SIGKILL once
/// its drain time is over.
struct ChildGuard(Option<std::process::Child>, Duration);

impl ChildGuard {
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.0.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let Some(mut child) = self.0.take() else {
            return;
        };
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let drain = self.1 + Duration::from_secs(2);
        let reap = move || {
            let deadline = std::time::Instant::now() + drain;
            while std::time::Instant::now() < deadline {
                if !matches!(child.try_wait(), Ok(None)) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            log::warn!("upgrade: the stopped new process {pid} did not exit; killing it");
            let _ = child.kill();
            let _ = child.wait();
        };
        let _ = std::thread::Builder::new()
            .name("upgrade-reap".into())
            .spawn(reap);
    }
}

impl Handover {
    /// One upgrade attempt; true when a new process took over (this one drains).
    pub async fn attempt(&self, trigger: Trigger) -> bool {
        log::warn!("upgrade ({trigger:?}): handing the listening sockets over");
        match self.try_attempt(trigger).await {
            Ok(pid) => {
                log::warn!("upgrade: process {pid} has the sockets and serves; draining");
                true
            }
            Err(e) => {
                self.metrics.upgrade_failures.inc();
                log::error!("upgrade failed, this process keeps serving: {e}");
                false
            }
        }
    }

    async fn try_attempt(&self, trigger: Trigger) -> Result<u32, String> {
        let deadline = Instant::now() + self.timeout;
        let mut child = ChildGuard(None, self.child_drain);
        if trigger == Trigger::Spawn {
            let exe = self
                .exe
                .as_deref()
                .ok_or("cannot find the binary to upgrade to")?;
            self.check_with(exe, deadline).await?;
            let c = std::process::Command::new(exe)
                .args(["run", "--upgrade", "-c"])
                .arg(&self.config)
                .stdin(Stdio::null())
                .spawn()
                .map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
            log::warn!("upgrade: started {} as pid {}", exe.display(), c.id());
            child.0 = Some(c);
        }
        let (tx, mut rx) = oneshot::channel();
        let slot = self.listen_for_ready()?;
        *slot.lock() = Some(Expected {
            pid: child.0.as_ref().map(|c| c.id()),
            ready: tx,
        });
        let result = self.hand_over(&mut child, &mut rx, deadline).await;
        // a READY answered OK just as the deadline passed still counts
        let answered = slot.lock().take().is_none();
        let result = match result {
            Err(_) if answered => rx.try_recv().map_err(|_| "no ready report".to_owned()),
            r => r,
        };
        if result.is_ok() {
            // the new process lives on (dropping a Child neither kills nor waits)
            drop(child.0.take());
        }
        result
    }

    /// Sends the sockets, then waits for `READY`.
    async fn hand_over(
        &self,
        child: &mut ChildGuard,
        ready: &mut oneshot::Receiver<u32>,
        deadline: Instant,
    ) -> Result<u32, String> {
        let table = self
            .table
            .0
            .get()
            .cloned()
            .ok_or("the listeners are not up yet")?;
        let sock = self.upgrade_sock.display().to_string();
        loop {
            if let Some(st) = child.exited() {
                return Err(format!(
                    "the new process exited ({st}) before it took the sockets"
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "no new process took the sockets on {sock} within {:?}",
                    self.timeout
                ));
            }
            // a probe connection would use up the new process's only accept: wait
            // for its socket file, then send (pingora retries a refused connect)
            if self.upgrade_sock.exists() {
                let (table, to) = (table.clone(), sock.clone());
                let sent =
                    tokio::task::spawn_blocking(move || table.lock().send_to_sock(to.as_str()))
                        .await;
                match sent {
                    Ok(Ok(_)) => break,
                    Ok(Err(e)) => log::warn!("upgrade: sending the sockets to {sock}: {e}"),
                    Err(e) => return Err(format!("sending the sockets: {e}")),
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        log::warn!("upgrade: sockets sent; waiting for the new process to report ready");
        loop {
            tokio::select! {
                r = &mut *ready => return r.map_err(|_| "no ready report".to_owned()),
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(format!(
                        "the new process did not report ready within {:?}",
                        self.timeout
                    ))
                }
                _ = tokio::time::sleep(Duration::from_millis(50)) => {
                    if let Some(st) = child.exited() {
                        return Err(format!("the new process exited ({st}) after it took the sockets"));
                    }
                }
            }
        }
    }

    /// `BINARY check -c CONFIG`: the new binary must accept the file.
    async fn check_with(&self, exe: &Path, deadline: Instant) -> Result<(), String> {
        let run = tokio::process::Command::new(exe)
            .arg("check")
            .arg("-c")
            .arg(&self.config)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout_at(deadline, run)
            .await
            .map_err(|_| format!("{} check did not finish in time", exe.display()))?
            .map_err(|e| format!("cannot run {}: {e}", exe.display()))?;
        if out.status.success() {
            return Ok(());
        }
        Err(format!(
            "{} check -c {} failed ({}): {}",
            exe.display(),
            self.config.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }

    /// Binds `<upgrade_sock>.ready` afresh and answers each `READY <pid>` on it.
    fn listen_for_ready(&self) -> Result<Slot, String> {
        use std::os::unix::fs::PermissionsExt;
        let path = ready_path(&self.upgrade_sock);
        let _ = std::fs::remove_file(&path);
        let listener = tokio::net::UnixListener::bind(&path)
            .map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let slot: Slot = Arc::new(Mutex::new(None));
        let answers = slot.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(answer(stream, answers.clone()));
            }
        });
        // the previous attempt's socket no longer has a path
        if let Some(old) = self.ready_task.lock().replace(task.abort_handle()) {
            old.abort();
        }
        Ok(slot)
    }
}

async fn answer(stream: tokio::net::UnixStream, slot: Slot) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut read = tokio::io::BufReader::new(read);
    let _ = tokio::time::timeout(Duration::from_secs(5), read.read_line(&mut line)).await;
    let pid = line
        .trim()
        .strip_prefix("READY ")
        .and_then(|p| p.parse::<u32>().ok());
    let ok = pid.is_some_and(|pid| {
        let mut slot = slot.lock();
        match slot.take() {
            Some(e) if e.pid.is_none_or(|p| p == pid) => e.ready.send(pid).is_ok(),
            other => {
                *slot = other;
                false
            }
        }
    });
    if !ok {
        log::warn!("upgrade: refused a ready report {:?}", line.trim());
    }
    let _ = write.write_all(if ok { b"OK\n" } else { b"NO\n" }).await;
}

/// The new process's side: tells the old process it serves. Ok also when the old
/// process does not wait for a report (no `.ready` socket).
pub fn report_ready(upgrade_sock: &Path) -> Result<(), String> {
    let path = ready_path(upgrade_sock);
    let mut stream = match std::os::unix::net::UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            log::warn!(
                "upgrade: the old process does not wait for a ready report ({}: {e})",
                path.display()
            );
            return Ok(());
        }
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let io = |e: std::io::Error| format!("{}: {e}", path.display());
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(io)?;
    writeln!(stream, "READY {}", std::process::id()).map_err(io)?;
    let mut reply = String::new();
    BufReader::new(stream).read_line(&mut reply).map_err(io)?;
    if reply.trim() == "OK" {
        Ok(())
    } else {
        Err("the old process gave up on this upgrade".into())
    }
}

/// pingora's shutdown signals plus upgrade requests, for `Server::run`: SIGTERM
/// (or `stop`) drains, SIGINT stops at once, and an upgrade request (from the signal
/// thread: SIGUSR2 or SIGQUIT) drains only once a new process serves.
pub struct Signals {
    pub handover: Handover,
    pub requests: tokio::sync::Mutex<mpsc::UnboundedReceiver<Trigger>>,
    /// Notified when this process cannot get ready: it drains and stops.
    pub stop: Arc<tokio::sync::Notify>,
}

#[async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            log::error!("cannot install the SIGTERM/SIGINT handlers");
            return ShutdownSignal::FastShutdown;
        };
        let mut requests = self.requests.lock().await;
        loop {
            let trigger = tokio::select! {
                _ = term.recv() => return ShutdownSignal::GracefulTerminate,
                _ = self.stop.notified() => return ShutdownSignal::GracefulTerminate,
                _ = int.recv() => return ShutdownSignal::FastShutdown,
                t = requests.recv() => match t {
                    Some(t) => t,
                    None => std::future::pending().await,
                },
            };
            let attempt = self.handover.attempt(trigger);
            tokio::pin!(attempt);
            let took_over = tokio::select! {
                _ = term.recv() => return ShutdownSignal::GracefulTerminate,
                _ = int.recv() => return ShutdownSignal::FastShutdown,
                ok = &mut attempt => ok,
            };
            if took_over {
                return ShutdownSignal::GracefulTerminate;
            }
            while requests.try_recv().is_ok() {
                log::warn!("upgrade: a request made during the attempt is dropped");
            }
        }
    }
}
