//! The admin listener: status page, JSON status, drain/disable/enable actions and
//! their protection.

mod common;

use std::time::Duration;

use common::{servers, wait_until, Edge, Origin};

fn two_pool(a: &Origin, b: &Origin, admin_extra: &str) -> String {
    format!(
        r#"
{admin_extra}
[[upstreams]]
name = "app"
servers = {}
[upstreams.health_check]
interval = "100ms"
timeout = "500ms"

[[routes]]
name = "all"
upstream = "app"
"#,
        servers(&[a, b])
    )
}

/// An admin action as a script sends it: with the admin header, and the token if
/// given.
async fn action(edge: &Edge, server: &str, what: &str, token: Option<&str>) -> reqwest::Response {
    let mut req = action_request(edge, server, what).header("x-wingman-admin", "1");
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    req.send().await.unwrap()
}

/// A purge without token or admin header.
async fn plain_purge(edge: &Edge) -> u16 {
    let req = reqwest::Client::new().post(edge.admin_url("/cache/purge?prefix=http://x/"));
    req.send().await.unwrap().status().as_u16()
}

fn action_request(edge: &Edge, server: &str, what: &str) -> reqwest::RequestBuilder {
    reqwest::Client::new().post(edge.admin_url(&format!("/api/servers/app/{server}/{what}")))
}

async fn who_answers(edge: &Edge, n: usize) -> Vec<String> {
    let c = reqwest::Client::new();
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(
            c.get(edge.url("/"))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap(),
        );
    }
    out
}

#[tokio::test]
async fn a_drained_server_gets_no_new_requests_until_enabled() {
    let a = Origin::start("a").await;
    let b = Origin::start("b").await;
    let edge = Edge::start(&two_pool(&a, &b, "")).await;
    let addr = a.addr.to_string();
    let resp = action(&edge, &addr, "drain", None).await;
    assert_eq!(resp.status(), 200);
    let state = edge.server_status("app", &addr).await;
    assert_eq!(state["admin_state"], "drained");
    assert!(who_answers(&edge, 10).await.iter().all(|w| w == "b"));
    assert_eq!(action(&edge, &addr, "enable", None).await.status(), 200);
    let answers = who_answers(&edge, 10).await;
    assert!(answers.iter().any(|w| w == "a"), "{answers:?}");
}

#[tokio::test]
async fn a_disabled_server_is_not_probed() {
    let a = Origin::start("a").await;
    let b = Origin::start("b").await;
    let edge = Edge::start(&two_pool(&a, &b, "")).await;
    let addr = a.addr.to_string();
    let probes = |o: &Origin| o.state.probes.load(std::sync::atomic::Ordering::SeqCst);
    wait_until(Duration::from_secs(10), "first probes", || async {
        probes(&a) > 0
    })
    .await;
    assert_eq!(action(&edge, &addr, "disable", None).await.status(), 200);
    let at_disable = probes(&a);
    // b keeps being probed meanwhile
    let b_before = probes(&b);
    wait_until(Duration::from_secs(10), "b probed again", || async {
        probes(&b) >= b_before + 3
    })
    .await;
    assert!(probes(&a) <= at_disable + 1, "a disabled server was probed");
    assert_eq!(
        edge.server_status("app", &addr).await["admin_state"],
        "disabled"
    );
    assert!(who_answers(&edge, 6).await.iter().all(|w| w == "b"));
}

#[tokio::test]
async fn actions_need_the_token_when_one_is_configured() {
    let a = Origin::start("a").await;
    let b = Origin::start("b").await;
    let edge = Edge::start_with("", "token = \"s3cret\"", &two_pool(&a, &b, "")).await;
    let addr = a.addr.to_string();
    assert_eq!(action(&edge, &addr, "drain", None).await.status(), 401);
    assert_eq!(
        action(&edge, &addr, "drain", Some("wrong")).await.status(),
        401
    );
    assert_eq!(
        action(&edge, &addr, "drain", Some("s3cret")).await.status(),
        200
    );
    assert_eq!(
        action(&edge, &addr, "explode", Some("s3cret"))
            .await
            .status(),
        400
    );
    assert_eq!(
        action(&edge, "10.9.9.9:1", "drain", Some("s3cret"))
            .await
            .status(),
        404
    );
    assert_eq!(plain_purge(&edge).await, 401);
}

#[tokio::test]
async fn the_status_page_is_self_contained_and_the_json_carries_per_server_stats() {
    let a = Origin::start("a").await;
    let b = Origin::start("b").await;
    let edge = Edge::start(&two_pool(&a, &b, "")).await;
    let page = reqwest::get(edge.admin_url("/")).await.unwrap();
    assert_eq!(page.headers()["content-type"], "text/html; charset=utf-8");
    let html = page.text().await.unwrap();
    assert!(html.contains("<table") && html.contains("fetch(\"/status\""));
    // its buttons send the header actions need
    assert!(html.contains("\"X-Wingman-Admin\": \"1\""), "{html}");
    assert!(
        !html.contains("src=\"http") && !html.contains("href=\"http"),
        "external assets"
    );
    for _ in 0..6 {
        reqwest::get(edge.url("/status/503")).await.unwrap();
    }
    let edge_ref = &edge;
    wait_until(Duration::from_secs(10), "stats", || async move {
        let st = edge_ref.status().await;
        let total: u64 = st["pools"][0]["servers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["requests"].as_u64().unwrap())
            .sum();
        total == 6
    })
    .await;
    let st = edge.status().await;
    let servers = st["pools"][0]["servers"].as_array().unwrap();
    let errors: u64 = servers.iter().map(|s| s["errors"].as_u64().unwrap()).sum();
    assert_eq!(errors, 6);
    let counted: u64 = servers
        .iter()
        .flat_map(|s| s["latency_counts"].as_array().unwrap().iter())
        .map(|c| c.as_u64().unwrap())
        .sum();
    assert_eq!(counted, 6);
    assert!(st["latency_bounds_ms"].as_array().unwrap().len() > 5);
    assert!(st["cache"]["hits"].is_u64());
}

#[tokio::test]
async fn without_a_token_actions_need_the_admin_header() {
    let a = Origin::start("a").await;
    let b = Origin::start("b").await;
    let edge = Edge::start(&two_pool(&a, &b, "")).await;
    let addr = a.addr.to_string();
    // what a cross-site form or no-preflight fetch can send: a plain POST
    let plain = action_request(&edge, &addr, "drain").send().await.unwrap();
    assert_eq!(plain.status(), 403);
    assert!(plain.text().await.unwrap().contains("X-Wingman-Admin"));
    assert_eq!(
        edge.server_status("app", &addr).await["admin_state"],
        "enabled"
    );
    assert_eq!(plain_purge(&edge).await, 403);
    assert_eq!(action(&edge, &addr, "drain", None).await.status(), 200);
}

/// GET `path` on the admin listener with the given Host and Origin.
async fn admin_get(edge: &Edge, path: &str, host: &str, origin: Option<&str>) -> u16 {
    let mut req = reqwest::Client::new()
        .get(edge.admin_url(path))
        .header("host", host);
    if let Some(o) = origin {
        req = req.header("origin", o);
    }
    req.send().await.unwrap().status().as_u16()
}

#[tokio::test]
async fn admin_requests_for_another_host_are_refused() {
    let a = Origin::start("a").await;
    let b = Origin::start("b").await;
    let edge = Edge::start_with(
        "",
        "hosts = [\"edge-admin.internal\"]",
        &two_pool(&a, &b, ""),
    )
    .await;
    let port = edge.admin_port;
    // DNS rebinding: a page on evil.example whose name now points at 127.0.0.1
    assert_eq!(
        admin_get(&edge, "/status", &format!("evil.example:{port}"), None).await,
        403
    );
    assert_eq!(
        admin_get(&edge, "/metrics", "evil.example", None).await,
        403
    );
    assert_eq!(
        admin_get(&edge, "/status", &format!("127.0.0.1:{}", port + 1), None).await,
        403
    );
    for host in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        "localhost".to_owned(),
        format!("EDGE-admin.internal:{port}"),
    ] {
        assert_eq!(
            admin_get(&edge, "/status", &host, None).await,
            200,
            "{host}"
        );
    }
    let addr = a.addr.to_string();
    let rebound = action_request(&edge, &addr, "drain")
        .header("x-wingman-admin", "1")
        .header("host", "evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(rebound.status(), 403);
}

#[tokio::test]
async fn cross_origin_admin_requests_are_refused() {
    let a = Origin::start("a").await;
    let b = Origin::start("b").await;
    let edge = Edge::start_with("", "token = \"s3cret\"", &two_pool(&a, &b, "")).await;
    let port = edge.admin_port;
    let host = format!("127.0.0.1:{port}");
    assert_eq!(
        admin_get(&edge, "/status", &host, Some("http://evil.example")).await,
        403
    );
    assert_eq!(admin_get(&edge, "/status", &host, Some("null")).await, 403);
    assert_eq!(
        admin_get(&edge, "/status", &host, Some(&format!("http://{host}"))).await,
        200
    );
    let addr = a.addr.to_string();
    let send = |origin: String| {
        action_request(&edge, &addr, "drain")
            .bearer_auth("s3cret")
            .header("origin", origin)
            .send()
    };
    // even with the token (a page that learned it) from another origin
    let foreign = send("http://evil.example".into()).await.unwrap();
    assert_eq!(foreign.status(), 403);
    assert_eq!(
        edge.server_status("app", &addr).await["admin_state"],
        "enabled"
    );
    let same = send(format!("http://{host}")).await.unwrap();
    assert_eq!(same.status(), 200);
}

#[test]
fn check_refuses_an_admin_listener_off_loopback_without_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("edge.toml");
    let write = |admin: &str| {
        std::fs::write(
            &path,
            format!(
                "[[listeners]]\naddress = \"127.0.0.1:8080\"\n\n[admin]\n{admin}\n\n[[upstreams]]\nname = \"app\"\nservers = [{{ address = \"127.0.0.1:9\" }}]\n[[routes]]\nname = \"all\"\nupstream = \"app\"\n"
            ),
        )
        .unwrap()
    };
    let check = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_wingman-edge"))
            .arg("check")
            .arg("-c")
            .arg(&path)
            .output()
            .unwrap()
    };
    write("address = \"0.0.0.0:9901\"");
    let out = check();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("{}:5: admin.address:", path.display()))
            && err.contains("admin.token"),
        "{err}"
    );
    write("address = \"0.0.0.0:9901\"\ntoken = \"s3cret\"");
    let out = check();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
