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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binary_upgrade_under_load_fails_no_request_without_keepalive() {
    let origin = Origin::start("a").await;
    // the old process drains for 2 s: connections it accepted just before the
    // hand-over are served, not cut when its runtime stops
    let mut edge = Edge::start_with("grace_period = \"2s\"", "", &single_pool(&origin, "")).await;
    let old_pid = edge.pid() as i32;
    wait_until(Duration::from_secs(10), "pid file", || async {
        pid_in(&edge) == Some(old_pid)
    })
    .await;

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let url = edge.url("/");
    let load = {
        let (stop, ok) = (stop.clone(), ok.clone());
        tokio::spawn(async move {
            let client = common::fresh_client();
            let mut failures = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(40);
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
    wait_until(Duration::from_secs(10), "load running", || async {
        ok.load(Ordering::SeqCst) > 20
    })
    .await;

    let mut new = hand_over(&edge, old_pid);

    // the new process owns the pid file once it has the sockets; the old one exits
    let edge_ref = &edge;
    wait_until(Duration::from_secs(20), "new pid", || async move {
        pid_in(edge_ref).is_some_and(|p| p != old_pid)
    })
    .await;
    let new_pid = pid_in(&edge).unwrap();
    assert!(
        edge.wait_exit(Duration::from_secs(30)).await.is_some(),
        "the old process did not exit after handing over"
    );
    let served_before = ok.load(Ordering::SeqCst);
    wait_until(Duration::from_secs(10), "new process serving", || async {
        ok.load(Ordering::SeqCst) > served_before + 20
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    let failures = load.await.unwrap();
    assert_eq!(new.id(), Some(new_pid as u32));
    let _ = new.start_kill();
    assert!(
        failures.is_empty(),
        "{} failed requests: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
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
    let edge_ref = &edge;
    wait_until(
        Duration::from_secs(20),
        "pid file names the new process",
        || async move { pid_in(edge_ref) == Some(new_pid) },
    )
    .await;
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
    let edge_ref = &edge;
    wait_until(Duration::from_secs(20), "new pid", || async move {
        pid_in(edge_ref).is_some_and(|p| p != old_pid)
    })
    .await;
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
