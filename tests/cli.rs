//! The command line: `check` like `nginx -t`, `--version`, and `run` refusing a bad
//! file before it binds anything.

use std::process::Command;

fn edge() -> Command {
    Command::new(env!("CARGO_BIN_EXE_wingman-edge"))
}

#[test]
fn check_accepts_the_shipped_config_with_a_one_line_summary() {
    let out = edge()
        .args([
            "check",
            "-c",
            concat!(env!("CARGO_MANIFEST_DIR"), "/conf/edge.toml"),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(stdout.contains(": ok: 1 listener(s), 1 route(s), 1 upstream pool(s), 2 server(s)"));
}

#[test]
fn check_lists_every_problem_as_file_line_key_message_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        r#"[[listeners]]
address = "127.0.0.1:8080"
colour = "red"

[[upstreams]]
name = "app"
servers = [{ address = "127.0.0.1:0" }]

[[routes]]
name = "all"
upstream = "nowhere"
"#,
    )
    .unwrap();
    let out = edge().arg("check").arg("-c").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let file = path.display();
    for line in [
        format!("{file}:3: listeners[0].colour: unknown key"),
        format!("{file}:7: upstreams[0].servers[0].address: \"127.0.0.1:0\": port 0 is not a server port"),
        format!("{file}:11: routes[0].upstream: no upstream pool is named \"nowhere\""),
    ] {
        assert!(stderr.contains(&line), "missing {line:?} in\n{stderr}");
    }
}

#[test]
fn check_reports_an_unresolvable_server_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dns.toml");
    std::fs::write(
        &path,
        r#"[[listeners]]
address = "127.0.0.1:8080"
[[upstreams]]
name = "app"
servers = [{ address = "no-such-host.invalid:80" }]
[[routes]]
name = "all"
upstream = "app"
"#,
    )
    .unwrap();
    let out = edge().arg("check").arg("-c").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("upstreams[0].servers[0].address")
            && stderr.contains("no-such-host.invalid"),
        "{stderr}"
    );
}

#[test]
fn check_names_a_missing_file() {
    let out = edge()
        .args(["check", "-c", "/nonexistent/edge.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/nonexistent/edge.toml"), "{stderr}");
    assert!(stderr.contains("cannot read file"), "{stderr}");
}

#[test]
fn run_refuses_an_invalid_config_before_starting() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[[listeners]]\naddress = \"nope\"\n").unwrap();
    let out = edge().arg("run").arg("-c").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("listeners[0].address"));
}

#[test]
fn version_flag_prints_the_version() {
    let out = edge().arg("--version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("wingman-edge {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn check_refuses_sizes_that_would_exhaust_memory_naming_file_line_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("huge.toml");
    std::fs::write(
        &path,
        r#"[server]
threads = 100000
upstream_keepalive_pool_size = 1000000000000
[client]
max_header_bytes = 1000000000
[access_log]
path = "stdout"
buffer = 1000000000000
[[listeners]]
address = "127.0.0.1:8080"
[[upstreams]]
name = "app"
algorithm = "hash"
servers = [{ address = "127.0.0.1:8001", weight = 4000000000 }]
[[routes]]
name = "all"
upstream = "app"
[routes.rate_limit]
rate = 1.0
max_keys = 10000000000000
"#,
    )
    .unwrap();
    let mut child = edge()
        .arg("check")
        .arg("-c")
        .arg(&path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("check did not finish within 30 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(status.code(), Some(1), "{status:?}\n{stderr}");
    let file = path.display();
    for line in [
        format!("{file}:2: server.threads: must be at most "),
        format!("{file}:3: server.upstream_keepalive_pool_size: must be at most "),
        format!("{file}:5: client.max_header_bytes: must be at most "),
        format!("{file}:8: access_log.buffer: must be at most "),
        format!("{file}:14: upstreams[0].servers[0].weight: must be at most "),
        format!("{file}:20: routes[0].rate_limit.max_keys: must be at most "),
    ] {
        assert!(stderr.contains(&line), "missing {line:?} in\n{stderr}");
    }
}
