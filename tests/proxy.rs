//! Proxying: forwarding headers, request ids, hop-by-hop stripping, routing, header
//! edits, upstream keep-alive, h2c, and the edge's own answers.

mod common;

use std::time::Duration;

use common::{raw_exchange, servers, Edge, Origin};

fn one_pool(origin: &Origin) -> String {
    common::single_pool(origin, "")
}

#[tokio::test]
async fn forwarding_headers_and_request_id_reach_the_origin() {
    let origin = Origin::start("a").await;
    let edge = Edge::start(&one_pool(&origin)).await;
    let resp = reqwest::Client::new()
        .get(edge.url("/hello?x=1"))
        .header("x-forwarded-for", "203.0.113.9")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let rid = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert_eq!(rid.len(), 32, "generated id: {rid}");
    let seen = origin.last_seen().unwrap();
    assert_eq!(seen.path, "/hello?x=1");
    assert_eq!(seen.headers["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(seen.headers["x-forwarded-proto"], "http");
    assert_eq!(
        seen.headers["x-forwarded-host"],
        format!("127.0.0.1:{}", edge.port)
    );
    assert_eq!(seen.headers["x-request-id"], rid);
}

#[tokio::test]
async fn a_request_id_from_the_client_is_kept() {
    let origin = Origin::start("a").await;
    let edge = Edge::start(&one_pool(&origin)).await;
    let resp = reqwest::Client::new()
        .get(edge.url("/"))
        .header("x-request-id", "trace-42")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-request-id"], "trace-42");
    assert_eq!(
        origin.last_seen().unwrap().headers["x-request-id"],
        "trace-42"
    );
}

#[tokio::test]
async fn hop_by_hop_and_connection_listed_headers_are_not_forwarded() {
    let origin = Origin::start("a").await;
    let edge = Edge::start(&one_pool(&origin)).await;
    let answer = raw_exchange(
        edge.addr(),
        b"GET /h HTTP/1.1\r\nHost: x\r\nConnection: close, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nProxy-Connection: keep-alive\r\nX-Kept: yes\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let seen = origin.last_seen().unwrap();
    for h in ["x-secret", "keep-alive", "te", "proxy-connection"] {
        assert!(
            !seen.headers.contains_key(h),
            "{h} forwarded: {:?}",
            seen.headers
        );
    }
    assert_eq!(seen.headers["x-kept"], "yes");
}

#[tokio::test]
async fn routes_match_by_host_then_longest_prefix() {
    let web = Origin::start("web").await;
    let api = Origin::start("api").await;
    let chat = Origin::start("chat").await;
    let body = format!(
        r#"
[[upstreams]]
name = "web"
servers = {web}
[[upstreams]]
name = "api"
servers = {api}
[[upstreams]]
name = "chat"
servers = {chat}

[[routes]]
name = "web"
upstream = "web"
[[routes]]
name = "api"
path_prefix = "/api/"
upstream = "api"
[[routes]]
name = "chat"
host = "*.chat.example"
path_prefix = "/"
upstream = "chat"
"#,
        web = servers(&[&web]),
        api = servers(&[&api]),
        chat = servers(&[&chat]),
    );
    let edge = Edge::start(&body).await;
    let c = reqwest::Client::new();
    let get = |host: &'static str, path: &'static str| {
        let c = c.clone();
        let url = edge.url(path);
        async move {
            c.get(url)
                .header("host", host)
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        }
    };
    assert_eq!(get("example.org", "/index.html").await, "web");
    assert_eq!(get("example.org", "/api/v1/messages").await, "api");
    assert_eq!(get("eu.chat.example", "/api/v1/messages").await, "chat");
    assert_eq!(get("EU.Chat.Example:8080", "/").await, "chat");
}

#[tokio::test]
async fn no_matching_route_answers_404_with_a_request_id() {
    let origin = Origin::start("a").await;
    let body = format!(
        r#"
[[upstreams]]
name = "app"
servers = {}
[[routes]]
name = "only-api"
path_prefix = "/api/"
upstream = "app"
"#,
        servers(&[&origin])
    );
    let edge = Edge::start(&body).await;
    let resp = reqwest::get(edge.url("/elsewhere")).await.unwrap();
    assert_eq!(resp.status(), 404);
    assert!(resp.headers().contains_key("x-request-id"));
    assert_eq!(origin.requests(), 0);
    edge.wait_metric(
        "wingman_edge_requests_total{class=\"4xx\",route=\"-\"}",
        1.0,
    )
    .await;
}

#[tokio::test]
async fn route_header_edits_apply_both_ways() {
    let origin = Origin::start("a").await;
    let body = format!(
        r#"
[[upstreams]]
name = "app"
servers = {}
[[routes]]
name = "all"
upstream = "app"
[routes.request_headers]
set = {{ "X-Edge" = "wingman" }}
remove = ["X-Debug"]
[routes.response_headers]
set = {{ "X-Frame-Options" = "DENY" }}
remove = ["X-Origin"]
"#,
        servers(&[&origin])
    );
    let edge = Edge::start(&body).await;
    let resp = reqwest::Client::new()
        .get(edge.url("/"))
        .header("x-debug", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-frame-options"], "DENY");
    assert!(!resp.headers().contains_key("x-origin"));
    let seen = origin.last_seen().unwrap();
    assert_eq!(seen.headers["x-edge"], "wingman");
    assert!(!seen.headers.contains_key("x-debug"));
}

#[tokio::test]
async fn upstream_connections_are_kept_alive_and_reused() {
    let origin = Origin::start("a").await;
    let edge = Edge::start(&one_pool(&origin)).await;
    let client = common::fresh_client();
    for _ in 0..20 {
        let r = client.get(edge.url("/")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
    }
    assert_eq!(origin.requests(), 20);
    assert!(
        origin.connections() <= 4,
        "20 sequential requests used {} upstream connections",
        origin.connections()
    );
}

#[tokio::test]
async fn h2c_with_prior_knowledge_is_served_on_the_cleartext_port() {
    let origin = Origin::start("a").await;
    let edge = Edge::start(&one_pool(&origin)).await;
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let resp = client.get(edge.url("/h2")).send().await.unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "a");
    // and HTTP/1.1 still works on the same port
    let resp = reqwest::get(edge.url("/h1")).await.unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_11);
}

#[tokio::test]
async fn metrics_count_requests_by_route_and_class_with_duration_buckets() {
    let origin = Origin::start("a").await;
    let edge = Edge::start(&one_pool(&origin)).await;
    for path in ["/", "/status/404", "/status/500"] {
        reqwest::get(edge.url(path)).await.unwrap();
    }
    edge.wait_metric(
        "wingman_edge_request_duration_seconds_count{route=\"all\"}",
        3.0,
    )
    .await;
    let m = edge.metrics_text().await;
    for series in [
        "wingman_edge_requests_total{class=\"2xx\",route=\"all\"} 1",
        "wingman_edge_requests_total{class=\"4xx\",route=\"all\"} 1",
        "wingman_edge_requests_total{class=\"5xx\",route=\"all\"} 1",
        "wingman_edge_request_duration_seconds_count{route=\"all\"} 3",
        "wingman_edge_upstream_server_up{pool=\"app\",",
        "wingman_edge_upstream_pool_in_flight{pool=\"app\"} 0",
        "wingman_edge_upstream_pool_queued{pool=\"app\"} 0",
        "wingman_edge_websockets_active 0",
        "wingman_edge_config_generation 1",
    ] {
        assert!(m.contains(series), "missing {series} in\n{m}");
    }
    assert!(m.contains("wingman_edge_request_duration_seconds_bucket{route=\"all\",le=\"0.1\"}"));
    let status = edge.status().await;
    assert_eq!(status["generation"], 1);
    assert_eq!(status["pools"][0]["name"], "app");
    assert_eq!(status["pools"][0]["servers"][0]["healthy"], true);
}
