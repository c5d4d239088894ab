//! Zero-downtime binary upgrade (pingora's socket hand-over) and the control
//! commands that find the running edge through its pid file.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{single_pool, wait_until, Edge, Origin};

fn edge_cmd() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_wingman-edge"))
}

/// What `wingman-edge upgrade` does: starts the new binary with --upgrade (it waits
/// for the sockets), then SIGQUITs the old process (it hands them over and drains).
/// The new process is killed when the returned handle drops.
fn hand_over(edge: &Edge, old_pid: i32) -> tokio::process::Child {
    let log = std::fs::File::create(edge.dir.path().join("new.log")).unwrap();
    let new = tokio::process::Command::new(env!("CARGO_BIN_EXE_wingman-edge"))
        .args(["run", "--upgrade", "-c"])
        .arg(&edge.config_path)
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old_pid),
        nix::sys::signal::Signal::SIGQUIT,
    )
    .unwrap();
    new
}

fn pid_in(edge: &Edge) -> Option<i32> {
    std::fs::read_to_string(edge.dir.path().join("edge.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Waits until the pid file names `pid`.
async fn wait_pid_file(edge: &Edge, pid: i32) {
    wait_until(Duration::from_secs(10), "pid file", || async {
        pid_in(edge) == Some(pid)
    })
    .await;
}

/// Waits until the pid file names another process than `old`; that pid.
async fn wait_new_pid(edge: &Edge, old: i32) -> i32 {
    wait_until(Duration::from_secs(20), "new pid", || async {
        pid_in(edge).is_some_and(|p| p != old)
    })
    .await;
    pid_in(edge).unwrap()
}

/// Requests on fresh connections, one after another, until stopped (at most 60 s).
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<Vec<String>>,
}

impl Load {
    /// Starts the loop and waits until it is served.
    async fn start(url: String) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let task = {
            let (stop, ok) = (stop.clone(), ok.clone());
            tokio::spawn(async move {
                let client = common::fresh_client();
                let mut failures = Vec::new();
                let deadline = Instant::now() + Duration::from_secs(60);
                while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                    match client.get(&url).send().await {
                        Ok(r) if r.status() == 200 => {
                            ok.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(r) => failures.push(format!("status {}", r.status())),
                        Err(e) => failures.push(e.to_string()),
                    }
                }
                failures
            })
        };
        let load = Load { stop, ok, task };
        load.wait_served(20).await;
        load
    }

    /// Waits until `more` further requests were answered 200.
    async fn wait_served(&self, more: usize) {
        let target = self.ok.load(Ordering::SeqCst) + more;
        wait_until(Duration::from_secs(20), "requests served", || async {
            self.ok.load(Ordering::SeqCst) >= target
        })
        .await;
    }

    /// Stops the loop; the failed requests.
    async fn finish(self) -> Vec<String> {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.unwrap()
    }
}

/// After a good upgrade: the pid file names a new process, the old one exits, the
/// load goes on being served. The new pid and the failed requests.
async fn taken_over(edge: &mut Edge, old_pid: i32, load: Load) -> (i32, Vec<String>) {
    let new_pid = wait_new_pid(edge, old_pid).await;
    assert!(
        edge.wait_exit(Duration::from_secs(30)).await.is_some(),
        "the old process did not exit after handing over"
    );
    load.wait_served(20).await;
    (new_pid, load.finish().await)
}

fn assert_no_failures(failures: &[String]) {
    assert!(
        failures.is_empty(),
        "{} failed requests: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binary_upgrade_under_load_fails_no_request_without_keepalive() {
    let origin = Origin::start("a").await;
    // the old process drains for 2 s: connections it accepted just before the
    // hand-over are served, not cut when its runtime stops
    let mut edge = Edge::start_with("grace_period = \"2s\"", "", &single_pool(&origin, "")).await;
    let old_pid = edge.pid() as i32;
    wait_pid_file(&edge, old_pid).await;
    let load = Load::start(edge.url("/")).await;

    let mut new = hand_over(&edge, old_pid);

    // the new process owns the pid file once it serves; the old one exits
    let (new_pid, failures) = taken_over(&mut edge, old_pid, load).await;
    assert_eq!(new.id(), Some(new_pid as u32));
    let _ = new.start_kill();
    assert_no_failures(&failures);
}

/// Replaces the binary at `path` (as an upgrade installs one: a new file renamed
/// over the old, which the running process keeps) with a shell script.
fn install_script(path: &std::path::Path, script: &str) {
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, format!("#!/bin/sh\n{script}\n")).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Waits (bounded) until `series` reaches `value` or the process exits; false when
/// it exited.
async fn metric_or_exit(edge: &mut Edge, series: &str, value: f64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if edge.wait_exit(Duration::from_millis(50)).await.is_some() {
            return false;
        }
        let text = match reqwest::get(edge.admin_url("/metrics")).await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(e) => panic!("admin listener: {e}\n{}", edge.log()),
        };
        if text.lines().any(|l| l == format!("{series} {value}")) {
            return true;
        }
    }
    panic!("{series} did not reach {value} in 30 s:\n{}", edge.log());
}

/// After a failed upgrade: the old process counted failure number `n`, is still
/// running and still serves.
async fn assert_kept_serving(edge: &mut Edge, load: &Load, n: f64, what: &str) {
    assert!(
        metric_or_exit(edge, "wingman_edge_upgrade_failures_total", n).await,
        "the old process exited after {what}:\n{}",
        edge.log()
    );
    load.wait_served(20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigusr2_upgrade_to_a_failing_binary_leaves_the_old_process_serving() {
    let origin = Origin::start("a").await;
    let bin_dir = tempfile::tempdir().unwrap();
    let exe = bin_dir.path().join("wingman-edge");
    let real = bin_dir.path().join("wingman-edge.real");
    std::fs::copy(env!("CARGO_BIN_EXE_wingman-edge"), &exe).unwrap();
    std::fs::copy(env!("CARGO_BIN_EXE_wingman-edge"), &real).unwrap();
    let mut edge = Edge::start_exe(
        &exe,
        "upgrade_timeout = \"3s\"\ngrace_period = \"1s\"",
        "",
        &single_pool(&origin, ""),
        &[],
    )
    .await;
    let old_pid = edge.pid() as i32;
    wait_pid_file(&edge, old_pid).await;
    let load = Load::start(edge.url("/")).await;
    let usr2 = || {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(old_pid),
            nix::sys::signal::Signal::SIGUSR2,
        )
        .unwrap()
    };

    // 1. a binary that does not even run
    install_script(&exe, "echo 'broken build' >&2; exit 1");
    usr2();
    assert_kept_serving(&mut edge, &load, 1.0, "an upgrade to a binary that fails").await;

    // 2. a binary that passes `check`, takes the sockets, then cannot start (a
    // listener it cannot bind) and never reports ready
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let bad = edge.dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        format!(
            "{}\n[[listeners]]\naddress = \"{}\"\n",
            std::fs::read_to_string(&edge.config_path).unwrap(),
            held.local_addr().unwrap()
        ),
    )
    .unwrap();
    install_script(
        &exe,
        &format!(
            "[ \"$1\" = run ] && exec {real} run --upgrade -c {bad}\nexec {real} \"$@\"",
            real = real.display(),
            bad = bad.display()
        ),
    );
    usr2();
    assert_kept_serving(
        &mut edge,
        &load,
        2.0,
        "an upgrade whose new process never got ready",
    )
    .await;
    assert_eq!(pid_in(&edge), Some(old_pid), "the pid file moved");

    // 3. the real binary again: the upgrade goes through
    std::fs::copy(&real, exe.with_extension("new")).unwrap();
    std::fs::rename(exe.with_extension("new"), &exe).unwrap();
    usr2();
    let (new_pid, failures) = taken_over(&mut edge, old_pid, load).await;
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(new_pid),
        nix::sys::signal::Signal::SIGKILL,
    );
    assert_no_failures(&failures);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upgrade_command_reports_a_new_process_that_fails_and_the_old_one_keeps_serving() {
    let origin = Origin::start("a").await;
    let mut edge = Edge::start_with(
        "upgrade_timeout = \"3s\"\ngrace_period = \"1s\"",
        "",
        &single_pool(&origin, ""),
    )
    .await;
    let old_pid = edge.pid() as i32;
    wait_pid_file(&edge, old_pid).await;
    let load = Load::start(edge.url("/")).await;
    // the file passes `check` but the process cannot start: its cache directory
    // is a regular file
    let not_a_dir = edge.dir.path().join("not-a-dir");
    std::fs::write(&not_a_dir, "x").unwrap();
    let good = std::fs::read_to_string(&edge.config_path).unwrap();
    edge.write_config(&single_pool(
        &origin,
        &format!("[cache]\ndisk_dir = \"{}\"", not_a_dir.display()),
    ));
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_wingman-edge"))
        .arg("upgrade")
        .arg("-c")
        .arg(&edge.config_path)
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("keeps serving"), "{stderr}");
    assert_kept_serving(&mut edge, &load, 1.0, "a failed upgrade").await;
    assert_eq!(pid_in(&edge), Some(old_pid));

    // fixed: the same command upgrades
    edge.write_raw_config(&good);
    // (the new process inherits stderr: a captured one would never reach EOF)
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_wingman-edge"))
        .arg("upgrade")
        .arg("-c")
        .arg(&edge.config_path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
        .wait_with_output()
        .await
        .unwrap();
    assert!(out.status.success());
    assert_ne!(
        pid_in(&edge),
        Some(old_pid),
        "the command returned before the new process was ready"
    );
    let (new_pid, failures) = taken_over(&mut edge, old_pid, load).await;
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(new_pid),
        nix::sys::signal::Signal::SIGKILL,
    );
    assert_no_failures(&failures);
}

#[tokio::test]
async fn reload_and_stop_commands_find_the_edge_through_its_pid_file() {
    let origin = Origin::start("a").await;
    let mut edge = Edge::start(&single_pool(&origin, "")).await;
    let pid = edge.pid() as i32;
    wait_until(Duration::from_secs(10), "pid file", || async {
        pid_in(&edge) == Some(pid)
    })
    .await;
    let out = edge_cmd()
        .arg("reload")
        .arg("-c")
        .arg(&edge.config_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    edge.wait_reloads(2.0).await;
    // a broken file is refused before anything is signalled
    let good = std::fs::read_to_string(&edge.config_path).unwrap();
    edge.write_raw_config("[[listeners]\n");
    let out = edge_cmd()
        .arg("reload")
        .arg("-c")
        .arg(&edge.config_path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    edge.write_raw_config(&good);
    let out = edge_cmd()
        .arg("stop")
        .arg("-c")
        .arg(&edge.config_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = edge.wait_exit(Duration::from_secs(20)).await;
    assert!(status.is_some(), "the edge did not stop");
}

/// Reads one notification datagram (bounded wait).
async fn notification(sock: &tokio::net::UnixDatagram) -> String {
    let mut buf = [0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(20), sock.recv(&mut buf))
        .await
        .expect("a notification within 20 s")
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

fn mainpid(msg: &str) -> i32 {
    msg.lines()
        .find_map(|l| l.strip_prefix("MAINPID="))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no MAINPID in {msg:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr2_upgrades_in_place_and_the_new_process_tells_systemd_it_is_main() {
    let origin = Origin::start("a").await;
    let notify_dir = tempfile::tempdir().unwrap();
    let notify_path = notify_dir.path().join("notify.sock");
    let sock = tokio::net::UnixDatagram::bind(&notify_path).unwrap();
    let mut edge = Edge::start_full(
        "",
        "",
        &single_pool(&origin, ""),
        &[("NOTIFY_SOCKET", notify_path.to_str().unwrap())],
    )
    .await;
    let first = notification(&sock).await;
    assert!(first.contains("READY=1"), "{first:?}");
    let old_pid = mainpid(&first);
    assert_eq!(old_pid as u32, edge.pid());

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old_pid),
        nix::sys::signal::Signal::SIGUSR2,
    )
    .unwrap();
    let second = notification(&sock).await;
    let new_pid = mainpid(&second);
    assert!(
        second.contains("READY=1") && new_pid != old_pid,
        "{second:?}"
    );
    wait_pid_file(&edge, new_pid).await;
    assert!(
        edge.wait_exit(Duration::from_secs(30)).await.is_some(),
        "the old process did not exit after handing over"
    );
    let resp = reqwest::get(edge.url("/")).await.unwrap();
    assert_eq!(resp.status(), 200);
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(new_pid),
        nix::sys::signal::Signal::SIGINT,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_on_the_old_process_keeps_working_until_the_grace_period_ends() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let origin = Origin::start("a").await;
    let mut edge = Edge::start_with("grace_period = \"2s\"", "", &single_pool(&origin, "")).await;
    let old_pid = edge.pid() as i32;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{}/ws", edge.port))
        .await
        .unwrap();
    let mut new = hand_over(&edge, old_pid);
    wait_new_pid(&edge, old_pid).await;
    // the socket lives on the old process and still echoes after the hand-over
    ws.send(Message::text("still here")).await.unwrap();
    let echoed = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .unwrap();
    assert!(
        matches!(&echoed, Some(Ok(Message::Text(t))) if t.as_str() == "still here"),
        "{echoed:?}"
    );
    // and is closed when the old process finishes draining (bounded)
    let started = Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the old process kept the WebSocket past its drain"
    );
    assert!(edge.wait_exit(Duration::from_secs(30)).await.is_some());
    assert!(started.elapsed() < Duration::from_secs(30));
    // new WebSockets go to the new process
    let (mut ws2, _) = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{}/ws", edge.port))
        .await
        .unwrap();
    ws2.send(Message::text("new")).await.unwrap();
    let echoed = tokio::time::timeout(Duration::from_secs(10), ws2.next())
        .await
        .unwrap();
    assert!(matches!(&echoed, Some(Ok(Message::Text(t))) if t.as_str() == "new"));
    let _ = new.start_kill();
}
