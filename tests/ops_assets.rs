//! Guards the operations files against drift from the code: `conf/alerts.yml`
//! (Prometheus rules), its unit tests `conf/alerts.test.yml` and
//! `conf/grafana-dashboard.json` must parse, be well formed, and use only metric and
//! label names that `src/metrics.rs` registers (or that are announced in
//! [`PLANNED`]); and every registered metric must be on the dashboard. With
//! `promtool` installed, `-- --ignored` also runs Prometheus's checker and the
//! rules' unit tests.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

/// Metrics the rules and dashboard use before `src/metrics.rs` registers them, with
/// their labels. Remove an entry once the metric is registered.
const PLANNED: &[(&str, &[&str])] = &[("wingman_edge_rate_limited_total", &["route"])];

/// Labels every scraped series has, added by Prometheus.
const TARGET_LABELS: &[&str] = &["job", "instance"];

const PREFIX: &str = "wingman_edge_";

fn repo_file(rel: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// A registered metric: its label names, and whether it is a histogram (exposed
/// as `_bucket`, `_sum` and `_count` series, with an `le` label on buckets).
#[derive(Debug)]
struct Metric {
    labels: BTreeSet<String>,
    histogram: bool,
}

/// The metric definitions of `src/metrics.rs`: each `"wingman_edge_..."` literal is
/// a name; the `&["a", "b"]` that follows it (before the next name) its labels; a
/// `HistogramOpts::new(` just before it makes it a histogram.
fn registered_metrics() -> BTreeMap<String, Metric> {
    let src = repo_file("src/metrics.rs");
    let mut out = BTreeMap::new();
    let starts: Vec<usize> = src
        .match_indices(&format!("\"{PREFIX}"))
        .map(|(i, _)| i)
        .collect();
    for (n, &start) in starts.iter().enumerate() {
        let name_end = src[start + 1..]
            .find('"')
            .map(|e| start + 1 + e)
            .expect("closing quote");
        let name = &src[start + 1..name_end];
        let before = &src[start.saturating_sub(60)..start];
        let histogram = before.contains("HistogramOpts::new(");
        let region_end = starts.get(n + 1).copied().unwrap_or(src.len());
        let region = &src[name_end..region_end];
        // the label list, if any, is the first `&[` of string literals in the region
        let mut labels = BTreeSet::new();
        if let Some(open) = region.find("&[\"") {
            let close = region[open..].find(']').expect("closing ]") + open;
            for part in region[open + 2..close].split(',') {
                let l = part.trim().trim_matches('"');
                if !l.is_empty() {
                    labels.insert(l.to_owned());
                }
            }
        }
        out.insert(name.to_owned(), Metric { labels, histogram });
    }
    for (name, labels) in PLANNED {
        out.entry((*name).to_owned()).or_insert_with(|| Metric {
            labels: labels.iter().map(|l| (*l).to_owned()).collect(),
            histogram: false,
        });
    }
    out
}

fn ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Every `wingman_edge_*` name in a PromQL expression, with the label names of its
/// `{...}` selector if it has one.
fn metric_refs(expr: &str) -> Vec<(String, Vec<String>)> {
    let mut refs = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find(PREFIX) {
        let preceded_by_ident = rest[..i].chars().next_back().is_some_and(ident_char);
        let tail = &rest[i..];
        let len = tail.find(|c| !ident_char(c)).unwrap_or(tail.len());
        let name = &tail[..len];
        let mut labels = Vec::new();
        if let Some(sel) = tail[len..].strip_prefix('{') {
            let close = sel
                .find('}')
                .unwrap_or_else(|| panic!("unclosed selector in {expr}"));
            for matcher in sel[..close].split(',') {
                let label: String = matcher
                    .trim()
                    .chars()
                    .take_while(|&c| ident_char(c))
                    .collect();
                if !label.is_empty() {
                    labels.push(label);
                }
            }
        }
        if !preceded_by_ident {
            refs.push((name.to_owned(), labels));
        }
        rest = &tail[len..];
    }
    refs
}

/// Label names in `by (...)` and `without (...)` clauses.
fn grouping_labels(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    for kw in ["by", "without"] {
        let mut rest = expr;
        while let Some(i) = rest.find(kw) {
            let before_ok = rest[..i].chars().next_back().is_none_or(|c| !ident_char(c));
            let after = rest[i + kw.len()..].trim_start();
            if before_ok && after.starts_with('(') {
                let close = after.find(')').expect("closing )");
                out.extend(
                    after[1..close]
                        .split(',')
                        .map(|l| l.trim().to_owned())
                        .filter(|l| !l.is_empty()),
                );
            }
            rest = &rest[i + kw.len()..];
        }
    }
    out
}

/// `{{name}}` in a legend format, `{{ $labels.name }}` in an annotation.
fn template_labels(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("{{") {
        let Some(close) = rest[i..].find("}}") else {
            break;
        };
        let inner = rest[i + 2..i + close].trim();
        if let Some(l) = inner.strip_prefix("$labels.") {
            out.push(l.trim().to_owned());
        } else if inner.chars().all(ident_char) && !inner.is_empty() {
            out.push(inner.to_owned());
        }
        rest = &rest[i + close + 2..];
    }
    out
}

/// Checks one expression against the registry; returns its problems and the base
/// metric names it uses. `extra_text` holds templates whose labels must exist.
fn check_expr(
    registry: &BTreeMap<String, Metric>,
    where_: &str,
    expr: &str,
    templates: &[&str],
) -> (Vec<String>, BTreeSet<String>) {
    let mut problems = Vec::new();
    let mut used = BTreeSet::new();
    let mut known_labels: BTreeSet<String> =
        TARGET_LABELS.iter().map(|l| (*l).to_owned()).collect();
    for (name, selector_labels) in metric_refs(expr) {
        let (base, series) = match registry.get(&name) {
            Some(m) if m.histogram => {
                problems.push(format!(
                    "{where_}: histogram {name} used without _bucket/_sum/_count"
                ));
                (name.clone(), m)
            }
            Some(m) => (name.clone(), m),
            None => {
                let hist = ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
                    let base = name.strip_suffix(suffix)?;
                    registry
                        .get(base)
                        .filter(|m| m.histogram)
                        .map(|m| (base.to_owned(), m, *suffix == "_bucket"))
                });
                match hist {
                    Some((base, m, bucket)) => {
                        if bucket {
                            known_labels.insert("le".to_owned());
                        }
                        (base, m)
                    }
                    None => {
                        problems.push(format!(
                            "{where_}: {name} is not registered in src/metrics.rs \
                             (nor planned in tests/ops_assets.rs)"
                        ));
                        continue;
                    }
                }
            }
        };
        known_labels.extend(series.labels.iter().cloned());
        for l in selector_labels {
            let ok = series.labels.contains(&l)
                || TARGET_LABELS.contains(&l.as_str())
                || (l == "le" && series.histogram);
            if !ok {
                problems.push(format!("{where_}: {name} has no label {l:?}"));
            }
        }
        used.insert(base);
    }
    for l in grouping_labels(expr) {
        if !known_labels.contains(&l) {
            problems.push(format!("{where_}: grouping by unknown label {l:?}"));
        }
    }
    for t in templates {
        for l in template_labels(t) {
            if !known_labels.contains(&l) {
                problems.push(format!("{where_}: template uses unknown label {l:?}"));
            }
        }
    }
    (problems, used)
}

fn yaml_str<'a>(v: &'a serde_yaml::Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(|x| x.as_str())
}

#[test]
fn alert_rules_parse_and_use_only_registered_metrics() {
    let registry = registered_metrics();
    assert!(registry.len() > 20, "metrics.rs parsed: {registry:?}");
    let doc: serde_yaml::Value =
        serde_yaml::from_str(&repo_file("conf/alerts.yml")).expect("alerts.yml is YAML");
    let groups = doc
        .get("groups")
        .and_then(|g| g.as_sequence())
        .expect("top-level groups list");
    let mut problems = Vec::new();
    let mut names = BTreeSet::new();
    let mut used = BTreeSet::new();
    for group in groups {
        assert!(yaml_str(group, "name").is_some(), "group without name");
        let rules = group
            .get("rules")
            .and_then(|r| r.as_sequence())
            .expect("group rules list");
        for rule in rules {
            let Some(alert) = yaml_str(rule, "alert") else {
                problems.push(format!("rule without alert name: {rule:?}"));
                continue;
            };
            if !names.insert(alert.to_owned()) {
                problems.push(format!("{alert}: duplicate alert name"));
            }
            let expr = yaml_str(rule, "expr").unwrap_or_default();
            if expr.trim().is_empty() {
                problems.push(format!("{alert}: no expr"));
            }
            match rule.get("labels").and_then(|l| yaml_str(l, "severity")) {
                Some("critical" | "warning" | "info") => {}
                other => problems.push(format!("{alert}: severity {other:?}")),
            }
            let annotations = rule.get("annotations");
            let summary = annotations.and_then(|a| yaml_str(a, "summary"));
            let description = annotations.and_then(|a| yaml_str(a, "description"));
            if summary.is_none_or(str::is_empty) || description.is_none_or(str::is_empty) {
                problems.push(format!("{alert}: needs a summary and a description"));
            }
            if let Some(f) = yaml_str(rule, "for") {
                if humantime::parse_duration(f).is_err() {
                    problems.push(format!("{alert}: bad for: {f:?}"));
                }
            }
            let templates: Vec<&str> = [summary, description].into_iter().flatten().collect();
            let (p, u) = check_expr(&registry, alert, expr, &templates);
            problems.extend(p);
            used.extend(u);
        }
    }
    assert!(problems.is_empty(), "alerts.yml:\n{}", problems.join("\n"));
    // the alerts the edge is expected to have
    for metric in [
        "wingman_edge_requests_total",
        "wingman_edge_request_duration_seconds",
        "wingman_edge_upstream_server_up",
        "wingman_edge_upstream_queue_rejections_total",
        "wingman_edge_config_reloads_total",
        "wingman_edge_config_restart_needed",
        "wingman_edge_cache_lookups_total",
        "wingman_edge_rate_limited_total",
    ] {
        assert!(used.contains(metric), "no alert uses {metric}");
    }
}

#[test]
fn alert_unit_tests_use_only_registered_metrics() {
    let registry = registered_metrics();
    let doc: serde_yaml::Value =
        serde_yaml::from_str(&repo_file("conf/alerts.test.yml")).expect("alerts.test.yml is YAML");
    assert_eq!(
        doc["rule_files"][0].as_str(),
        Some("alerts.yml"),
        "the unit tests load the rules"
    );
    let tests = doc["tests"].as_sequence().expect("tests list");
    let mut problems = Vec::new();
    let mut series_count = 0;
    for test in tests {
        for input in test["input_series"].as_sequence().expect("input_series") {
            let series = input["series"].as_str().expect("series selector");
            series_count += 1;
            problems.extend(check_expr(&registry, series, series, &[]).0);
        }
    }
    assert!(series_count > 10, "input series found: {series_count}");
    assert!(
        problems.is_empty(),
        "alerts.test.yml:\n{}",
        problems.join("\n")
    );
}

/// Runs Prometheus's own rule checker and the unit tests of the rules. Needs
/// `promtool` on the PATH (Debian: `apt-get install prometheus`; `.ci/setup`
/// installs it).
#[test]
fn promtool_accepts_the_rules_and_their_unit_tests_pass() {
    let conf = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("conf");
    for args in [
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts.test.yml"],
    ] {
        let out = std::process::Command::new("promtool")
            .args(args)
            .current_dir(&conf)
            .output()
            .unwrap_or_else(|e| panic!("running promtool (is it installed?): {e}"));
        assert!(
            out.status.success(),
            "promtool {}:\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Every `expr` in the dashboard, with the legend format next to it.
fn dashboard_exprs(v: &serde_json::Value, out: &mut Vec<(String, String)>) {
    match v {
        serde_json::Value::Object(map) => {
            if let Some(expr) = map.get("expr").and_then(|e| e.as_str()) {
                let legend = map
                    .get("legendFormat")
                    .and_then(|l| l.as_str())
                    .unwrap_or_default();
                out.push((expr.to_owned(), legend.to_owned()));
            }
            map.values().for_each(|x| dashboard_exprs(x, out));
        }
        serde_json::Value::Array(items) => items.iter().for_each(|x| dashboard_exprs(x, out)),
        _ => {}
    }
}

fn dashboard() -> serde_json::Value {
    serde_json::from_str(&repo_file("conf/grafana-dashboard.json"))
        .expect("grafana-dashboard.json is JSON")
}

#[test]
fn dashboard_parses_and_uses_only_registered_metrics() {
    let registry = registered_metrics();
    let dash = dashboard();
    assert_eq!(dash["uid"], "wingman-edge");
    let panels = dash["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    for p in panels {
        let id = p["id"].as_u64().expect("panel id");
        assert!(ids.insert(id), "duplicate panel id {id}");
        assert!(p["gridPos"]["w"].as_u64().is_some_and(|w| w <= 24), "{p}");
        if p["type"] != "row" {
            let targets = p["targets"].as_array().expect("panel targets");
            assert!(!targets.is_empty(), "panel without queries: {}", p["title"]);
            assert_eq!(p["datasource"]["uid"], "${datasource}", "{}", p["title"]);
        }
    }
    let mut exprs = Vec::new();
    dashboard_exprs(&dash, &mut exprs);
    assert!(exprs.len() > 30, "dashboard queries found: {}", exprs.len());
    let mut problems = Vec::new();
    for (expr, legend) in &exprs {
        let (p, _) = check_expr(&registry, expr, expr, &[legend]);
        problems.extend(p);
    }
    // template variables query label_values(metric, label)
    for var in dash["templating"]["list"].as_array().expect("templating") {
        if let Some(q) = var["query"]["query"].as_str() {
            let (p, _) = check_expr(&registry, q, q, &[]);
            problems.extend(p);
        }
    }
    assert!(
        problems.is_empty(),
        "grafana-dashboard.json:\n{}",
        problems.join("\n")
    );
}

#[test]
fn every_registered_metric_is_on_the_dashboard() {
    let registry = registered_metrics();
    let mut exprs = Vec::new();
    dashboard_exprs(&dashboard(), &mut exprs);
    let mut used = BTreeSet::new();
    for (expr, _) in &exprs {
        used.extend(check_expr(&registry, expr, expr, &[]).1);
    }
    let missing: Vec<&String> = registry.keys().filter(|m| !used.contains(*m)).collect();
    assert!(
        missing.is_empty(),
        "metrics with no panel in conf/grafana-dashboard.json: {missing:?}"
    );
}

#[test]
fn drift_checker_catches_unknown_metrics_and_labels() {
    // the checker itself must be able to fail
    let registry = registered_metrics();
    let bad = [
        "rate(wingman_edge_requests_totl[5m])",
        "sum by (rout) (rate(wingman_edge_requests_total[5m]))",
        "wingman_edge_upstream_server_up{poool=\"a\"}",
        "wingman_edge_request_duration_seconds > 1",
        "wingman_edge_cache_bytes_bucket",
    ];
    for expr in bad {
        let (p, _) = check_expr(&registry, expr, expr, &[]);
        assert!(!p.is_empty(), "not caught: {expr}");
    }
    let (p, _) = check_expr(
        &registry,
        "legend",
        "sum by (route) (rate(wingman_edge_requests_total[5m]))",
        &["{{ $labels.server }}"],
    );
    assert!(!p.is_empty(), "unknown template label not caught");
    let good = "histogram_quantile(0.99, sum by (job, route, le) \
                (rate(wingman_edge_request_duration_seconds_bucket{route=~\"a\"}[5m])))";
    let (p, used) = check_expr(&registry, good, good, &["{{route}}"]);
    assert!(p.is_empty(), "{p:?}");
    assert!(used.contains("wingman_edge_request_duration_seconds"));
}
