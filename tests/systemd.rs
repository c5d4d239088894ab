//! The systemd unit (`systemd/wingman-edge.service`) against the code: under
//! `ProtectSystem=strict` every path the edge writes by default or as documented in
//! `conf/edge.toml` must be one the unit makes writable, the runtime files must not
//! live in a world-writable directory, `conf/edge.toml` must show the code's
//! defaults, and `systemd-analyze verify` must accept the unit without a warning.

use std::path::{Path, PathBuf};

use wingman_edge::config::{ClientLimits, ServerSection};

fn repo_file(rel: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// The values of `key=` in the unit's `[Service]` section (a key may repeat).
fn service_values(unit: &str, key: &str) -> Vec<String> {
    let mut in_service = false;
    let mut out = Vec::new();
    for line in unit.lines().map(str::trim) {
        if line.starts_with('[') {
            in_service = line == "[Service]";
        } else if in_service {
            if let Some((k, v)) = line.split_once('=') {
                if k.trim() == key {
                    out.push(v.trim().to_owned());
                }
            }
        }
    }
    out
}

/// The directories the unit makes writable under ProtectSystem=strict: its
/// RuntimeDirectory (under /run), CacheDirectory, LogsDirectory, StateDirectory and
/// ReadWritePaths.
fn writable_dirs(unit: &str) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    for (key, base) in [
        ("RuntimeDirectory", "/run"),
        ("CacheDirectory", "/var/cache"),
        ("LogsDirectory", "/var/log"),
        ("StateDirectory", "/var/lib"),
        ("ReadWritePaths", "/"),
    ] {
        for v in service_values(unit, key) {
            for d in v.split_whitespace() {
                dirs.push(Path::new(base).join(d.trim_start_matches('-')));
            }
        }
    }
    dirs
}

/// A path the edge writes: the unit must make its directory writable.
fn assert_writable(unit: &str, what: &str, path: &Path) {
    let dirs = writable_dirs(unit);
    assert!(
        dirs.iter().any(|d| path.starts_with(d)),
        "{what} {} is not under a directory the unit makes writable ({dirs:?})",
        path.display()
    );
}

/// The value of a commented example line `# key = "value"` in conf/edge.toml.
fn documented(conf: &str, key: &str) -> PathBuf {
    conf.lines()
        .filter_map(|l| l.trim().strip_prefix('#'))
        .filter_map(|l| l.split_once('='))
        .find(|(k, _)| k.trim() == key)
        .map(|(_, v)| PathBuf::from(v.split('"').nth(1).unwrap_or("")))
        .unwrap_or_else(|| panic!("conf/edge.toml documents no {key}"))
}

#[test]
fn the_unit_makes_every_default_and_documented_path_writable() {
    let unit = repo_file("systemd/wingman-edge.service");
    assert_eq!(service_values(&unit, "ProtectSystem"), ["strict"]);
    let server = ServerSection::default();
    assert_writable(&unit, "server.pid_file", &server.pid_file);
    assert_writable(&unit, "server.upgrade_sock", &server.upgrade_sock);
    let conf = repo_file("conf/edge.toml");
    assert_writable(&unit, "cache.disk_dir", &documented(&conf, "disk_dir"));
    assert_writable(&unit, "access_log.path", &documented(&conf, "path"));
}

#[test]
fn the_pid_file_and_upgrade_socket_default_to_the_private_runtime_directory() {
    let server = ServerSection::default();
    for (what, path) in [
        ("pid_file", &server.pid_file),
        ("upgrade_sock", &server.upgrade_sock),
    ] {
        // /tmp is world-writable: another local user could plant the file first
        assert_eq!(
            path.parent(),
            Some(Path::new("/run/wingman-edge")),
            "server.{what} = {}",
            path.display()
        );
    }
    let unit = repo_file("systemd/wingman-edge.service");
    assert_eq!(service_values(&unit, "RuntimeDirectory"), ["wingman-edge"]);
    let mode = service_values(&unit, "RuntimeDirectoryMode");
    assert_eq!(mode, ["0700"], "the runtime directory must be private");
}

#[test]
fn conf_edge_toml_shows_the_defaults_of_the_code() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("conf/edge.toml");
    let shipped = wingman_edge::config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let server = ServerSection::default();
    assert_eq!(shipped.server.pid_file, server.pid_file);
    assert_eq!(shipped.server.upgrade_sock, server.upgrade_sock);
    assert_eq!(shipped.server.upgrade_timeout, server.upgrade_timeout);
    assert_eq!(shipped.server.grace_period, server.grace_period);
    let client = ClientLimits::default();
    assert_eq!(shipped.client.max_conns_per_ip, client.max_conns_per_ip);
    assert_eq!(shipped.client.header_timeout, client.header_timeout);
}

#[test]
fn systemd_analyze_verifies_the_unit() {
    if !Path::new("/run/systemd/system").exists() {
        eprintln!("systemd is not PID 1 here: no start under systemd-run; verifying the file only");
    }
    let Ok(version) = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
    else {
        eprintln!("SKIPPED: systemd-analyze is not installed (apt-get install systemd)");
        return;
    };
    assert!(version.status.success());
    // verify checks that ExecStart exists: point it at the binary under test
    let dir = tempfile::tempdir().unwrap();
    let unit = repo_file("systemd/wingman-edge.service").replace(
        "/usr/local/bin/wingman-edge",
        env!("CARGO_BIN_EXE_wingman-edge"),
    );
    let path = dir.path().join("wingman-edge.service");
    std::fs::write(&path, unit).unwrap();
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // verify exits 0 on unknown keys and bad values too, warning on stderr
    assert!(out.status.success() && stderr.trim().is_empty(), "{stderr}");
}
