use std::path::Path;

use super::*;

const MINIMAL: &str = r#"
[[listeners]]
address = "127.0.0.1:8080"

[[upstreams]]
name = "app"
servers = [{ address = "127.0.0.1:8001" }]

[[routes]]
name = "all"
upstream = "app"
"#;

fn problems(text: &str) -> Vec<String> {
    match parse(Path::new("edge.toml"), text) {
        Ok(_) => Vec::new(),
        Err(e) => e.problems.iter().map(|p| p.to_string()).collect(),
    }
}

#[test]
fn minimal_config_is_valid_and_takes_documented_defaults() {
    let c = parse(Path::new("edge.toml"), MINIMAL).expect("valid");
    assert_eq!(c.admin.address, "127.0.0.1:9901");
    assert_eq!(c.client.max_header_bytes, 32 * 1024);
    assert_eq!(c.client.max_conns_per_ip, 256);
    assert_eq!(c.routes[0].path_prefix, "/");
    assert_eq!(c.upstreams[0].servers[0].weight, 1);
    assert_eq!(c.upstreams[0].algorithm, Algorithm::RoundRobin);
    assert!(c.listeners[0].h2c);
}

#[test]
fn shipped_example_config_is_valid() {
    let text = include_str!("../../conf/edge.toml");
    if let Err(e) = parse(Path::new("conf/edge.toml"), text) {
        panic!("{e}");
    }
}

#[test]
fn every_unknown_key_is_reported_with_its_line() {
    let text = r#"
[[listeners]]
address = "127.0.0.1:8080"
colour = "blue"

[[upstreams]]
name = "app"
servers = [{ address = "127.0.0.1:8001", wieght = 3 }]

[[routes]]
name = "all"
upstream = "app"
[routes.timeouts]
raed = "1s"
"#;
    let p = problems(text);
    assert_eq!(
        p,
        vec![
            "edge.toml:4: listeners[0].colour: unknown key",
            "edge.toml:8: upstreams[0].servers[0].wieght: unknown key",
            "edge.toml:14: routes[0].timeouts.raed: unknown key",
        ]
    );
}

#[test]
fn semantic_problems_are_all_reported_at_once_with_lines() {
    let text = r#"
[[listeners]]
address = "127.0.0.1:99999"

[[upstreams]]
name = "app"
servers = [
  { address = "127.0.0.1:8001", weight = 0 },
  { address = "not a host:80", weight = 0 },
]

[[upstreams]]
name = "app"
servers = [{ address = "127.0.0.1:8002" }]

[[routes]]
name = "all"
upstream = "missing"
"#;
    let p = problems(text);
    let expect = [
        "edge.toml:3: listeners[0].address: \"127.0.0.1:99999\" is not an ip:port to listen on",
        "edge.toml:7: upstreams[0].servers: every server has weight 0, so none could be chosen",
        "edge.toml:9: upstreams[0].servers[1].address: \"not a host:80\": \"not a host\" is not a host name or IP address",
        "edge.toml:13: upstreams[1].name: pool \"app\" is already defined by upstreams[0]",
        "edge.toml:18: routes[0].upstream: no upstream pool is named \"missing\"",
    ];
    assert_eq!(p, expect);
}

#[test]
fn a_bad_duration_names_its_line() {
    let text = MINIMAL.replace(
        "name = \"all\"",
        "name = \"all\"\nwebsocket_idle_timeout = \"soon\"",
    );
    let p = problems(&text);
    assert_eq!(p.len(), 1, "{p:?}");
    assert!(
        p[0].starts_with("edge.toml:11: websocket_idle_timeout: invalid duration \"soon\""),
        "{}",
        p[0]
    );
}

#[test]
fn a_syntax_error_names_its_line() {
    let p = problems("[[listeners]]\naddress = \n");
    assert_eq!(p.len(), 1);
    assert!(p[0].starts_with("edge.toml:2:"), "{}", p[0]);
}

#[test]
fn host_patterns_and_hash_keys_are_checked() {
    assert!(check_host_pattern("api.example.com").is_ok());
    assert!(check_host_pattern("*.example.com").is_ok());
    assert!(check_host_pattern("*example.com").is_err());
    assert!(check_host_pattern("a b").is_err());
    assert_eq!(parse_hash_on("client_ip"), Ok(HashOn::ClientIp));
    assert!(matches!(parse_hash_on("cookie:sid"), Ok(HashOn::Cookie(c)) if c == "sid"));
    assert!(parse_hash_on("header:").is_err());
    assert!(parse_hash_on("ip").is_err());
}

#[test]
fn status_sets_parse_ranges_and_lists() {
    let s = parse_status_set("200,204,300-399").expect("valid");
    assert!(s.contains(200) && s.contains(204) && s.contains(302));
    assert!(!s.contains(201) && !s.contains(400));
    assert!(parse_status_set("299-200").is_err());
    assert!(parse_status_set("abc").is_err());
}

#[test]
fn panic_threshold_is_a_percentage() {
    let text = MINIMAL.replace(
        "name = \"app\"\n",
        "name = \"app\"\npanic_threshold = 101\n",
    );
    assert_eq!(
        problems(&text),
        ["edge.toml:7: upstreams[0].panic_threshold: must be 0 to 100 (percent)"]
    );
    let ok = parse(Path::new("edge.toml"), MINIMAL).unwrap();
    assert_eq!(ok.upstreams[0].panic_threshold, 50);
}

#[test]
fn cache_settings_of_this_session_are_checked_with_their_line() {
    let cache = format!("{MINIMAL}[routes.cache]\nenabled = true\n");
    let p = problems(&format!("{cache}heuristic_max = \"soon\"\n"));
    assert!(
        p.iter()
            .any(|l| l.starts_with("edge.toml:") && l.contains("heuristic_max")),
        "{p:?}"
    );
    let p = problems(&format!(
        "{cache}targeted_cache_control = [\"ok-name\", \"bad name\"]\nlog_queries = 1\n"
    ));
    assert!(
        p.iter().any(|l| l.contains("targeted_cache_control[1]")),
        "{p:?}"
    );
    assert!(
        p.iter()
            .any(|l| l.contains("log_queries") && l.contains("unknown key")),
        "{p:?}"
    );
    // the defaults are the documented ones
    let cfg = parse(Path::new("edge.toml"), MINIMAL).unwrap();
    let c = &cfg.routes[0].cache;
    assert_eq!(
        c.targeted_cache_control,
        ["wingman-cache-control", "cdn-cache-control"]
    );
    assert_eq!(c.heuristic_max.get(), DEFAULT_HEURISTIC_MAX);
    assert!(!c.heuristic_freshness && !c.strip_targeted_cache_control && !c.cache_status_key);
    assert_eq!(cfg.routes[0].log_query, None);
}
