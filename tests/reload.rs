//! SIGHUP reload: new rules apply, a bad file changes nothing, runtime state carries
//! over, no request is dropped, and reloads leave no tasks or fds behind.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{servers, wait_until, Edge, Origin};

fn route_to(pool: &str, a: &Origin, b: &Origin, extra: &str) -> String {
    format!(
        r#"
[[upstreams]]
name = "a"
servers = {a}
panic_threshold = 0
[upstreams.health_check]
interval = "100ms"
timeout = "500ms"
rise = 1
fall = 1

[[upstreams]]
name = "b"
servers = {b}

[[routes]]
name = "all"
upstream = "{pool}"
{extra}
"#,
        a = servers(&[a]),
        b = servers(&[b]),
    )
}

async fn body_of(edge: &Edge) -> String {
    reqwest::get(edge.url("/"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

#[tokio::test]
async fn reload_applies_new_routes_and_bumps_the_generation() {
    let a = Origin::start("a").await;
    let b = Origin::start("b").await;
    let edge = Edge::start(&route_to("a", &a, &b, "")).await;
    assert_eq!(body_of(&edge).await, "a");
    let generation = edge.reload(&route_to("b", &a, &b, "")).await;
    assert_eq!(generation, 2);
    assert_eq!(body_of(&edge).await, "b");
    assert_eq!(edge.status().await["generation"], 2);
}

#[tokio::test]
async fn reload_keeps_old_config_when_new_one_is_invalid() {
    let a = Origin::start("a").await;
    let b = Origin::start("b").await;
    let edge = Edge::start(&route_to("a", &a, &b, "")).await;
    // semantically invalid: the route names a missing pool
    edge.write_config(&route_to("missing", &a, &b, ""));
    edge.sighup();
    edge.wait_metric("wingman_edge_config_reloads_total{result=\"error\"}", 1.0)
        .await;
    assert_eq!(body_of(&edge).await, "a");
    assert_eq!(
        edge.metric("wingman_edge_config_generation").await,
        Some(1.0)
    );
    // syntactically invalid
    edge.write_raw_config("[[listeners]\nthis is not toml");
    edge.sighup();
    edge.wait_metric("wingman_edge_config_reloads_total{result=\"error\"}", 2.0)
        .await;
    assert_eq!(body_of(&edge).await, "a");
    assert!(
        edge.log()
            .contains("routes[0].upstream: no upstream pool is named \"missing\""),
        "the log names the problem:\n{}",
        edge.log()
    );
    // and a good file afterwards still applies
    assert_eq!(edge.reload(&route_to("b", &a, &b, "")).await, 2);
    assert_eq!(body_of(&edge).await, "b");
}

#[tokio::test]
async fn a_reload_with_sizes_past_their_bounds_keeps_the_old_config() {
    let a = Origin::start("a").await;
    let b = Origin::start("b").await;
    let edge = Edge::start(&route_to("a", &a, &b, "")).await;
    // each of these would have sized an allocation the process cannot make
    let huge = [
        "[routes.rate_limit]\nrate = 1.0\nmax_keys = 10000000000000",
        "[routes.rate_limit]\nrate = 1.0\nmax_keys = 100000000",
    ];
    for (i, extra) in huge.iter().enumerate() {
        edge.write_config(&route_to("b", &a, &b, extra));
        edge.sighup();
        edge.wait_metric(
            "wingman_edge_config_reloads_total{result=\"error\"}",
            (i + 1) as f64,
        )
        .await;
        assert_eq!(body_of(&edge).await, "a", "the old config still serves");
    }
    let hash_pool = route_to("b", &a, &b, "")
        .replace(
            "name = \"b\"\nservers = ",
            "name = \"b\"\nalgorithm = \"hash\"\nservers = ",
        )
        .replace(
            &format!("{{ address = \"{}\" }}", b.addr),
            &format!("{{ address = \"{}\", weight = 4000000000 }}", b.addr),
        );
    assert!(hash_pool.contains("weight = 4000000000"), "{hash_pool}");
    edge.write_config(&hash_pool);
    edge.sighup();
    edge.wait_metric("wingman_edge_config_reloads_total{result=\"error\"}", 3.0)
        .await;
    assert_eq!(body_of(&edge).await, "a");
    assert!(
        edge.log()
            .contains("upstreams[1].servers[0].weight: must be at most"),
        "the log names the problem:\n{}",
        edge.log()
    );
    assert_eq!(
        edge.metric("wingman_edge_config_generation").await,
        Some(1.0)
    );
}

#[tokio::test]
async fn a_server_that_stays_keeps_its_health_across_a_reload() {
    let a = Origin::start("a").await;
    let b = Origin::start("b").await;
    let edge = Edge::start(&route_to("a", &a, &b, "")).await;
    let addr = a.addr.to_string();
    a.set_healthy(false);
    wait_until(Duration::from_secs(10), "a marked down", || async {
        edge.server_status("a", &addr).await["healthy"] == false
    })
    .await;
    // a reload that changes something else (a route header) keeps the verdict
    let extra = "[routes.request_headers]\nset = { \"X-Gen\" = \"2\" }";
    edge.reload(&route_to("a", &a, &b, extra)).await;
    assert_eq!(edge.server_status("a", &addr).await["healthy"], false);
    let resp = reqwest::get(edge.url("/")).await.unwrap();
    assert_eq!(resp.status(), 503, "the pool's only server is still down");
}

#[tokio::test]
async fn reload_reports_listener_changes_as_needing_a_restart() {
    let a = Origin::start("a").await;
    let b = Origin::start("b").await;
    let edge = Edge::start(&route_to("a", &a, &b, "")).await;
    let moved = common::preamble(edge.dir.path(), common::free_port(), edge.admin_port);
    let before = edge.reload_count().await;
    edge.write_raw_config(&format!("{moved}\n{}", route_to("b", &a, &b, "")));
    edge.sighup();
    edge.wait_reloads(before + 1.0).await;
    assert_eq!(
        edge.metric("wingman_edge_config_restart_needed").await,
        Some(1.0)
    );
    // everything else applied; the old listener still serves
    assert_eq!(body_of(&edge).await, "b");
    // a second reload of the same file still says so; going back clears it
    edge.sighup();
    edge.wait_reloads(before + 2.0).await;
    assert_eq!(
        edge.metric("wingman_edge_config_restart_needed").await,
        Some(1.0)
    );
    edge.reload(&route_to("a", &a, &b, "")).await;
    assert_eq!(
        edge.metric("wingman_edge_config_restart_needed").await,
        Some(0.0)
    );
}

#[tokio::test]
async fn reloads_under_load_drop_no_request() {
    let a = Origin::start("a").await;
    let b = Origin::start("b").await;
    let edge = Arc::new(Edge::start(&route_to("a", &a, &b, "")).await);
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for keepalive in [true, false] {
        let (edge, stop, ok) = (edge.clone(), stop.clone(), ok.clone());
        clients.push(tokio::spawn(async move {
            let client = if keepalive {
                reqwest::Client::new()
            } else {
                common::fresh_client()
            };
            let mut failures = Vec::new();
            // bounded: at most 20 s or until told to stop
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while !stop.load(Ordering::SeqCst) && std::time::Instant::now() < deadline {
                match client.get(edge.url("/")).send().await {
                    Ok(r) if r.status() == 200 => {
                        ok.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(r) => failures.push(format!("status {}", r.status())),
                    Err(e) => failures.push(format!("{e}")),
                }
            }
            failures
        }));
    }
    for i in 0..10 {
        let pool = if i % 2 == 0 { "b" } else { "a" };
        edge.reload(&route_to(pool, &a, &b, "")).await;
    }
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        let failures = c.await.unwrap();
        assert!(failures.is_empty(), "failed requests: {failures:?}");
    }
    assert!(ok.load(Ordering::SeqCst) > 0);
    assert_eq!(
        edge.metric("wingman_edge_config_generation").await,
        Some(11.0)
    );
}

fn count_dir(path: String) -> usize {
    std::fs::read_dir(path).map(|d| d.count()).unwrap_or(0)
}

#[tokio::test]
async fn many_reloads_leave_threads_and_fds_unchanged() {
    let a = Origin::start("a").await;
    let b = Origin::start("b").await;
    let edge = Edge::start(&route_to("a", &a, &b, "")).await;
    let pid = edge.pid();
    // warm up: one reload and a request so every lazily created thing exists
    edge.reload(&route_to("b", &a, &b, "")).await;
    body_of(&edge).await;
    let threads = count_dir(format!("/proc/{pid}/task"));
    let fds = count_dir(format!("/proc/{pid}/fd"));
    for i in 0..100 {
        let pool = if i % 2 == 0 { "a" } else { "b" };
        edge.reload(&route_to(pool, &a, &b, "")).await;
    }
    body_of(&edge).await;
    assert_eq!(count_dir(format!("/proc/{pid}/task")), threads);
    let after = count_dir(format!("/proc/{pid}/fd"));
    assert!(
        after.abs_diff(fds) <= 5,
        "fds went from {fds} to {after} over 100 reloads"
    );
}
