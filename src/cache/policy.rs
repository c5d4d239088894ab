//! What the shared cache may store and reuse (RFC 9111), independent of pingora:
//! the cache key, bypass rules, the storage decision with freshness, age and stale
//! windows, the Vary variance and the `Cache-Status` header (RFC 9211).
//!
//! Rules kept here, so they are tested in one table:
//! - only GET and HEAD use the cache; HEAD is answered from a stored GET;
//! - `no-store` and `private` (a shared cache) are never stored; a response to a
//!   request with `Authorization` only with `public`, `s-maxage` or
//!   `must-revalidate`; `Set-Cookie` responses only when the route allows it;
//!   `Vary: *` is never reused, so never stored;
//! - freshness: `s-maxage`, then `max-age`, then `Expires - Date`; without any of
//!   them nothing is stored unless the route sets a heuristic `default_ttl`
//!   (a default TTL for responses that say nothing is otherwise wrong);
//!   `no-cache` stores the response as stale, so every reuse is revalidated;
//! - the age already spent upstream (`Age`, or now − `Date`) is subtracted, and
//!   the route's `max_ttl` caps the lifetime;
//! - `stale-while-revalidate` / `stale-if-error` (RFC 5861) from the response or the
//!   route, never with `must-revalidate`, `proxy-revalidate` or `s-maxage`.

use std::time::{Duration, SystemTime};

use http::header::{self, HeaderMap, HeaderName};
use pingora::cache::key::HashBinary;
use pingora::cache::VarianceBuilder;
use pingora::http::{RequestHeader, ResponseHeader};

/// Cache settings of a route.
#[derive(Debug, Clone)]
pub struct CachePolicy {
    /// Request headers whose values join the key.
    pub key_headers: Vec<HeaderName>,
    /// Cookies whose values join the key.
    pub key_cookies: Vec<String>,
    /// Query parameters left out of the key (tracking parameters and the like).
    pub ignore_query: Vec<String>,
    /// Upper bound on any stored response's freshness lifetime.
    pub max_ttl: Option<Duration>,
    /// Heuristic lifetime for responses without freshness information (off: None).
    pub default_ttl: Option<Duration>,
    /// stale-while-revalidate when the response gives none (seconds).
    pub stale_while_revalidate: u32,
    /// stale-if-error when the response gives none (seconds).
    pub stale_if_error: u32,
    /// Store responses that carry Set-Cookie.
    pub store_set_cookie: bool,
    /// Requests carrying any of these cookies skip the cache entirely.
    pub bypass_cookies: Vec<String>,
    /// Requests carrying any of these headers skip the cache entirely.
    pub bypass_headers: Vec<HeaderName>,
    /// How long concurrent misses wait for the one that fetches.
    pub lock_timeout: Duration,
    /// Heuristic freshness (RFC 9111 §4.2.2) for responses without explicit
    /// freshness: 10% of the time since `Last-Modified`, at most `heuristic_max`.
    pub heuristic_freshness: bool,
    pub heuristic_max: Duration,
    /// Targeted Cache-Control fields (RFC 9213) this cache obeys, most specific
    /// first (e.g. `wingman-cache-control`, `cdn-cache-control`): the first one with
    /// a valid, non-empty value replaces `Cache-Control` and `Expires`.
    pub targeted: Vec<HeaderName>,
    /// Remove the targeted fields from responses to clients.
    pub strip_targeted: bool,
    /// Show the cache key in Cache-Status (a debug aid).
    pub status_key: bool,
}

/// The key of a resource: scheme, host (as routing sees it: no port, no trailing
/// dot, lower case) and path with query (the route's ignored parameters removed).
/// Every stored variant of the resource has a primary key that is this, or this
/// followed by `\n` and the route's key headers and cookies (see [`primary_key`]),
/// so `CacheStore::invalidate_resource` finds them all.
pub fn resource_key(scheme: &str, host: &str, path_and_query: &str, ignore: &[String]) -> String {
    let host = crate::route::canonical_host(host);
    let pq = strip_ignored(path_and_query, ignore);
    let mut key = String::with_capacity(scheme.len() + host.len() + pq.len() + 2);
    key.push_str(scheme);
    key.push('\n');
    key.push_str(&host);
    key.push('\n');
    key.push_str(&pq);
    key
}

/// The primary cache key: the [`resource_key`], plus the route's extra headers and
/// cookies, each part framed so no two requests can collide by shifting bytes
/// between parts.
pub fn primary_key(scheme: &str, host: &str, req: &RequestHeader, policy: &CachePolicy) -> String {
    let pq = req.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut key = resource_key(scheme, host, pq, &policy.ignore_query);
    for h in &policy.key_headers {
        key.push('\n');
        key.push_str(h.as_str());
        key.push('=');
        for v in req.headers.get_all(h) {
            key.push_str(&String::from_utf8_lossy(v.as_bytes()));
            key.push('\u{1f}');
        }
    }
    for c in &policy.key_cookies {
        key.push_str("\ncookie:");
        key.push_str(c);
        key.push('=');
        if let Some(v) = cookie(&req.headers, c) {
            key.push_str(v);
        }
    }
    key
}

/// The key prefix of every object under `scheme://host/path_prefix` (for purges).
pub fn key_prefix(scheme: &str, host: &str, path_prefix: &str) -> String {
    format!(
        "{scheme}\n{}\n{path_prefix}",
        crate::route::canonical_host(host)
    )
}

/// Path and query with ignored parameters removed (order otherwise kept).
fn strip_ignored<'a>(pq: &'a str, ignore: &[String]) -> std::borrow::Cow<'a, str> {
    let (path, q) = match pq.split_once('?') {
        Some((path, q)) if !ignore.is_empty() => (path, q),
        _ => return std::borrow::Cow::Borrowed(pq),
    };
    let kept: Vec<&str> = q
        .split('&')
        .filter(|kv| {
            let name = kv.split('=').next().unwrap_or("");
            !ignore.iter().any(|i| i == name)
        })
        .collect();
    if kept.is_empty() {
        std::borrow::Cow::Borrowed(path)
    } else {
        std::borrow::Cow::Owned(format!("{path}?{}", kept.join("&")))
    }
}

/// The value of a cookie in the request.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// Whether a request skips the cache (neither looked up nor stored).
pub fn bypass(req: &RequestHeader, policy: &CachePolicy) -> bool {
    policy
        .bypass_headers
        .iter()
        .any(|h| req.headers.contains_key(h))
        || policy
            .bypass_cookies
            .iter()
            .any(|c| cookie(&req.headers, c).is_some())
}

/// Whether the client asks that a stored response be revalidated before reuse
/// (`Cache-Control: no-cache` or `max-age=0`, or `Pragma: no-cache`).
pub fn request_wants_revalidation(req: &RequestHeader) -> bool {
    let cc = directives(&req.headers);
    cc.iter()
        .any(|(k, v)| k == "no-cache" || (k == "max-age" && v.as_deref() == Some("0")))
        || req
            .headers
            .get(header::PRAGMA)
            .is_some_and(|p| p.as_bytes().eq_ignore_ascii_case(b"no-cache"))
}

/// The directives that govern this cache for a response, and whether they came
/// from a targeted field (RFC 9213 §2.1: the first field of the target list with a
/// valid, non-empty value, read as a structured Dictionary; then `Cache-Control`
/// and `Expires` are ignored). Otherwise `Cache-Control`'s.
fn response_directives(
    headers: &HeaderMap,
    targeted: &[HeaderName],
) -> (Vec<(String, Option<String>)>, bool) {
    for name in targeted {
        if let Some(d) = targeted_directives(headers, name) {
            return (d, true);
        }
    }
    (directives(headers), false)
}

/// One targeted field as directives, or None when it is absent, empty or not a
/// valid structured Dictionary (RFC 8941; its field lines joined by commas).
fn targeted_directives(
    headers: &HeaderMap,
    name: &HeaderName,
) -> Option<Vec<(String, Option<String>)>> {
    let mut joined = Vec::new();
    for v in headers.get_all(name) {
        if !joined.is_empty() {
            joined.extend_from_slice(b", ");
        }
        joined.extend_from_slice(v.as_bytes());
    }
    if joined.iter().all(u8::is_ascii_whitespace) {
        return None;
    }
    let dict = sfv::Parser::parse_dictionary(&joined).ok()?;
    let mut out = Vec::with_capacity(dict.len());
    for (k, entry) in dict.iter() {
        let sfv::ListEntry::Item(item) = entry else {
            continue; // an inner list is no directive value
        };
        let value = match &item.bare_item {
            sfv::BareItem::Boolean(true) => None,
            sfv::BareItem::Boolean(false) => continue,
            sfv::BareItem::Integer(n) if *n >= 0 => Some(n.to_string()),
            sfv::BareItem::Token(t) => Some(t.clone()),
            sfv::BareItem::String(t) => Some(t.clone()),
            // a negative or decimal number is no delta-seconds: the directive is
            // kept with an invalid value, so it gives no freshness
            _ => Some(String::from("invalid")),
        };
        out.push((k.clone(), value));
    }
    (!out.is_empty()).then_some(out)
}

/// Cache-Control directives, lower-cased, with their values unquoted.
fn directives(headers: &HeaderMap) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    for v in headers.get_all(header::CACHE_CONTROL) {
        let Ok(v) = v.to_str() else { continue };
        // split on commas outside quotes
        let mut cur = String::new();
        let mut quoted = false;
        for ch in v.chars().chain(std::iter::once(',')) {
            match ch {
                '"' => {
                    quoted = !quoted;
                    cur.push(ch);
                }
                ',' if !quoted => {
                    let d = cur.trim();
                    if !d.is_empty() {
                        let (k, val) = match d.split_once('=') {
                            Some((k, v)) => (k.trim(), Some(v.trim().trim_matches('"').to_owned())),
                            None => (d, None),
                        };
                        out.push((k.to_ascii_lowercase(), val));
                    }
                    cur.clear();
                }
                _ => cur.push(ch),
            }
        }
    }
    out
}

/// The largest delta-seconds a cache needs to represent: RFC 9111 §1.2.2 says a
/// larger value, or one whose calculations would overflow, counts as 2^31.
const DELTA_SECONDS_MAX: u64 = 1 << 31;

/// A delta-seconds value (`1*DIGIT`, RFC 9111 §1.2.2), clamped to 2^31 so that no
/// lifetime or age arithmetic can overflow however large the number sent.
fn delta_seconds(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(
        s.parse::<u64>()
            .map_or(DELTA_SECONDS_MAX, |n| n.min(DELTA_SECONDS_MAX)),
    )
}

/// The Age a response carries (RFC 9111 §5.1): of a list (or several field lines)
/// the first member counts; an invalid value (a sign, a suffix, a parameter) is
/// ignored.
fn age_value(headers: &HeaderMap) -> Option<Duration> {
    let first = headers.get(header::AGE)?.to_str().ok()?;
    let member = first.split(',').next()?.trim();
    delta_seconds(member).map(Duration::from_secs)
}

fn seconds(v: &Option<String>) -> Option<u64> {
    v.as_deref().and_then(delta_seconds)
}

fn http_date(headers: &HeaderMap, name: HeaderName) -> Option<SystemTime> {
    let mut it = headers.get_all(name).iter();
    let v = it.next()?;
    if it.next().is_some() {
        return None;
    }
    httpdate::parse_http_date(v.to_str().ok()?).ok()
}

/// Heuristically cacheable statuses (RFC 9110 §15.1).
fn heuristically_cacheable(code: u16) -> bool {
    matches!(
        code,
        200 | 203 | 204 | 206 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 451 | 501
    )
}

/// Whether a status may be stored (RFC 9111 §3): any final status, known or not,
/// but 206 and 304 (this cache stores neither a partial body nor a validation).
fn storable_status(code: u16) -> bool {
    code >= 200 && code != 206 && code != 304
}

/// Whether this cache understands a status (for `must-understand`, RFC 9111
/// §5.2.2.3): the statuses RFC 9110 defines.
fn understood_status(code: u16) -> bool {
    http::StatusCode::from_u16(code)
        .ok()
        .and_then(|s| s.canonical_reason())
        .is_some()
}

/// The storage decision for one response.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Store {
        fresh_until: SystemTime,
        /// When the response was generated (now minus its age), so Age on hits counts
        /// the time it spent upstream too.
        created: SystemTime,
        stale_while_revalidate: u32,
        stale_if_error: u32,
        /// Header fields that must not be stored (`private="..."`, `no-cache="..."`).
        strip: Vec<String>,
    },
    NoStore(&'static str),
}

/// Decides whether and how long a response may be stored by a shared cache.
///
/// `response_delay`: how long the origin took to answer since the request went out
/// (RFC 9111 §4.2.3's response_time - request_time), added to the Age the origin
/// sent, so the corrected initial age never makes a response younger than it is.
pub fn decide(
    request_has_authorization: bool,
    resp: &ResponseHeader,
    policy: &CachePolicy,
    now: SystemTime,
    response_delay: Duration,
) -> Decision {
    let (cc, targeted) = response_directives(&resp.headers, &policy.targeted);
    let has = |name: &str| cc.iter().any(|(k, _)| k == name);
    let value = |name: &str| cc.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let status = resp.status.as_u16();
    if has("must-understand") {
        // RFC 9111 §5.2.2.3: stored only when the status is understood, and then
        // no-store (sent for caches that do not know must-understand) is ignored
        if !understood_status(status) {
            return Decision::NoStore("must-understand");
        }
    } else if has("no-store") {
        return Decision::NoStore("no-store");
    }
    if cc.iter().any(|(k, v)| k == "private" && v.is_none()) {
        return Decision::NoStore("private");
    }
    if request_has_authorization && !(has("public") || has("s-maxage") || has("must-revalidate")) {
        return Decision::NoStore("authorization");
    }
    if resp.headers.contains_key(header::SET_COOKIE) && !policy.store_set_cookie {
        return Decision::NoStore("set-cookie");
    }
    if resp
        .headers
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim() == "*")
    {
        return Decision::NoStore("vary-star");
    }
    let date = http_date(&resp.headers, header::DATE);
    let s_maxage = value("s-maxage").and_then(|v| seconds(&v));
    let max_age = value("max-age").and_then(|v| seconds(&v));
    let expires_lifetime = || -> Option<Duration> {
        if targeted || !resp.headers.contains_key(header::EXPIRES) {
            return None;
        }
        // an invalid Expires means "already expired" (RFC 9111 §5.3)
        let expires = http_date(&resp.headers, header::EXPIRES).unwrap_or(SystemTime::UNIX_EPOCH);
        let base = date.unwrap_or(now);
        Some(expires.duration_since(base).unwrap_or(Duration::ZERO))
    };
    let explicit = s_maxage
        .or(max_age)
        .map(Duration::from_secs)
        .or_else(expires_lifetime);
    let no_cache = cc.iter().any(|(k, v)| k == "no-cache" && v.is_none());
    if !storable_status(status) {
        return Decision::NoStore("status");
    }
    // heuristics only for heuristically cacheable statuses or `public` (§4.2.2)
    let heuristic = || -> Option<Duration> {
        if !(heuristically_cacheable(status) || has("public")) {
            return None;
        }
        let from_last_modified = policy
            .heuristic_freshness
            .then(|| {
                let lm = http_date(&resp.headers, header::LAST_MODIFIED)?;
                let age = date.unwrap_or(now).duration_since(lm).ok()?;
                Some((age / 10).min(policy.heuristic_max))
            })
            .flatten()
            .filter(|d| !d.is_zero());
        from_last_modified.or(policy.default_ttl)
    };
    let lifetime = match (explicit, no_cache) {
        (_, true) => Duration::ZERO,
        (Some(l), false) => l,
        (None, false) => match heuristic() {
            Some(h) => h,
            None if heuristically_cacheable(status) || has("public") => {
                return Decision::NoStore("no-freshness")
            }
            None => return Decision::NoStore("status"),
        },
    };
    if no_cache && !has_validator(&resp.headers) {
        return Decision::NoStore("no-cache-without-validator");
    }
    let lifetime = policy
        .max_ttl
        .map_or(lifetime, |cap| lifetime.min(cap))
        .min(Duration::from_secs(DELTA_SECONDS_MAX));
    // RFC 9111 §4.2.3: corrected_initial_age = max(apparent_age, age_value +
    // response_delay)
    let corrected_age = age_value(&resp.headers).map_or(Duration::ZERO, |a| a + response_delay);
    let apparent = date
        .and_then(|d| now.duration_since(d).ok())
        .unwrap_or(Duration::ZERO);
    let age = corrected_age
        .max(apparent)
        .min(Duration::from_secs(DELTA_SECONDS_MAX));
    let created = now.checked_sub(age).unwrap_or(now);
    let fresh_until = if lifetime.is_zero() {
        // stored stale: every reuse is revalidated
        created
            .checked_sub(Duration::from_secs(1))
            .unwrap_or(created)
    } else {
        // lifetime is at most 2^31 s: no overflow for any clock this side of 2200
        created.checked_add(lifetime).unwrap_or(created)
    };
    let no_stale = has("must-revalidate") || has("proxy-revalidate") || s_maxage.is_some();
    let (swr, sie) = if no_stale {
        (0, 0)
    } else {
        let from = |name: &str, default: u32| {
            value(name)
                .and_then(|v| seconds(&v))
                .map_or(default, |s| s.min(u32::MAX as u64) as u32)
        };
        (
            from("stale-while-revalidate", policy.stale_while_revalidate),
            from("stale-if-error", policy.stale_if_error),
        )
    };
    let strip = cc
        .iter()
        .filter(|(k, v)| (k == "private" || k == "no-cache") && v.is_some())
        .flat_map(|(_, v)| {
            v.clone()
                .unwrap_or_default()
                .split(',')
                .map(|s| s.trim().to_ascii_lowercase())
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
        })
        .collect();
    Decision::Store {
        fresh_until,
        created,
        stale_while_revalidate: swr,
        stale_if_error: sie,
        strip,
    }
}

/// Updates a stored response's header from a 304 (RFC 9111 §3.2, §4.3.4): every
/// field the 304 carries replaces the stored one's values, except Content-Length,
/// framing and hop-by-hop fields, the fields the stored body depends on
/// (Content-Encoding, Content-Range, Content-Type) and Vary (the stored variance
/// stays; pingora keeps the old one).
pub fn update_from_304(stored: &mut ResponseHeader, fresh: &ResponseHeader) {
    let kept = |name: &HeaderName| {
        matches!(
            name.as_str(),
            "content-length"
                | "transfer-encoding"
                | "connection"
                | "keep-alive"
                | "te"
                | "trailer"
                | "upgrade"
                | "proxy-connection"
                | "content-encoding"
                | "content-range"
                | "content-type"
                | "vary"
        )
    };
    let names: Vec<HeaderName> = fresh.headers.keys().filter(|n| !kept(n)).cloned().collect();
    for name in names {
        stored.remove_header(&name);
        for v in fresh.headers.get_all(&name) {
            let _ = stored.append_header(name.clone(), v.clone());
        }
    }
}

fn has_validator(h: &HeaderMap) -> bool {
    h.contains_key(header::ETAG) || h.contains_key(header::LAST_MODIFIED)
}

/// The variance of a stored response for this request: the request's values of the
/// fields the response's Vary lists. Accept-Encoding is replaced by the coding the
/// edge negotiates for it (`encoding`), so clients that would get the same bytes share
/// one variant; there are at most as many variants as codings.
pub fn variance(
    stored: &ResponseHeader,
    req: &RequestHeader,
    encoding: &str,
) -> Option<HashBinary> {
    let names: Vec<String> = stored
        .headers
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect();
    if names.is_empty() {
        return None;
    }
    let mut b = VarianceBuilder::new();
    for name in names {
        let value: Vec<u8> = if name == "accept-encoding" {
            encoding.as_bytes().to_vec()
        } else {
            vary_value(req, &name)
        };
        b.add_owned_name_value(name, value);
    }
    b.finalize()
}

/// A request's value of a field named by Vary, normalized as RFC 9111 §4.1 allows,
/// so requests that mean the same share one variant: field lines are combined, and
/// for the content-negotiation lists (Accept, Accept-Charset, Accept-Language,
/// whose members are case-insensitive and whose order only matters through `q`)
/// whitespace is dropped, case folded and members sorted by q (descending), then
/// by value. Other fields keep their bytes (only leading and trailing whitespace of
/// each line goes, which no syntax makes significant).
fn vary_value(req: &RequestHeader, name: &str) -> Vec<u8> {
    let lines = req.headers.get_all(name);
    let negotiation = matches!(name, "accept" | "accept-charset" | "accept-language");
    if !negotiation {
        let mut v = Vec::new();
        for (i, x) in lines.iter().enumerate() {
            if i > 0 {
                v.extend_from_slice(b", ");
            }
            v.extend_from_slice(x.as_bytes().trim_ascii());
        }
        return v;
    }
    let mut members: Vec<(u16, String)> = lines
        .iter()
        .filter_map(|x| x.to_str().ok())
        .flat_map(|x| x.split(','))
        .filter_map(|m| {
            let mut parts = m.split(';').map(|p| {
                p.split('=')
                    .map(str::trim)
                    .collect::<Vec<_>>()
                    .join("=")
                    .to_ascii_lowercase()
            });
            let value = parts.next().filter(|v| !v.is_empty())?;
            let mut q = 1000u16;
            let mut params = Vec::new();
            for p in parts {
                match p.strip_prefix("q=") {
                    Some(w) => q = qvalue(w),
                    None if !p.is_empty() => params.push(p),
                    None => {}
                }
            }
            params.insert(0, value);
            Some((q, params.join(";")))
        })
        .collect();
    members.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    let mut v = Vec::new();
    for (i, (q, m)) in members.iter().enumerate() {
        if i > 0 {
            v.push(b',');
        }
        v.extend_from_slice(m.as_bytes());
        if *q != 1000 {
            v.extend_from_slice(format!(";q={q}").as_bytes());
        }
    }
    v
}

/// A qvalue (RFC 9110 §12.4.2) in thousandths; anything unparsable counts as 1.
fn qvalue(w: &str) -> u16 {
    match w.parse::<f32>() {
        Ok(q) if (0.0..=1.0).contains(&q) => (q * 1000.0).round() as u16,
        _ => 1000,
    }
}

/// How a request was served by the cache, for `Cache-Status` and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Served from storage, fresh.
    Hit,
    /// Served stale while one refresh runs in the background.
    StaleWhileRevalidate,
    /// Served stale because the origin failed.
    StaleIfError,
    /// Nothing stored for the URI; fetched.
    Miss,
    /// Something stored for the URI, but no variant matches this request's
    /// varying fields; fetched.
    VaryMiss,
    /// The client asked for revalidation (`no-cache`, `max-age=0`); fetched or
    /// revalidated.
    Request,
    /// In storage but expired; fetched again (or revalidated).
    Expired,
    /// Revalidated with the origin (304) and served from storage.
    Revalidated,
    /// The route's bypass rules skipped the cache.
    Bypass,
    /// Looked up but the response may not be stored.
    Uncacheable,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::StaleWhileRevalidate | Outcome::StaleIfError => "stale",
            Outcome::Miss | Outcome::VaryMiss => "miss",
            Outcome::Expired | Outcome::Revalidated | Outcome::Request => "expired",
            Outcome::Bypass => "bypass",
            Outcome::Uncacheable => "uncacheable",
        }
    }
}

/// The `Cache-Status` value (RFC 9211) for an outcome.
///
/// `key`: the cache key, shown only when the route's `cache_status_key` debug
/// option is on (it may hold header and cookie values).
pub fn cache_status(
    outcome: Outcome,
    ttl_secs: Option<i64>,
    stored: bool,
    detail: Option<&str>,
    key: Option<&str>,
) -> String {
    let mut s = String::from("wingman-edge");
    match outcome {
        Outcome::Hit => s.push_str("; hit"),
        // served stale: marked so (RFC 5861 answers; no Warning, which RFC 9111
        // obsoletes)
        Outcome::StaleWhileRevalidate => {
            s.push_str("; hit; fwd=stale; detail=stale-while-revalidate")
        }
        Outcome::StaleIfError => s.push_str("; hit; fwd=stale; detail=stale-if-error"),
        Outcome::Miss => s.push_str("; fwd=uri-miss"),
        Outcome::VaryMiss => s.push_str("; fwd=vary-miss"),
        Outcome::Request => s.push_str("; fwd=request"),
        Outcome::Expired => s.push_str("; fwd=stale"),
        Outcome::Revalidated => s.push_str("; fwd=stale; fwd-status=304"),
        Outcome::Bypass => s.push_str("; fwd=bypass"),
        Outcome::Uncacheable => s.push_str("; fwd=uri-miss"),
    }
    if let Some(t) = ttl_secs {
        s.push_str(&format!("; ttl={t}"));
    }
    if stored {
        s.push_str("; stored");
    }
    if let Some(k) = key {
        // an sf-string holds printable ASCII only: the key's separators become
        // spaces and commas
        s.push_str("; key=\"");
        for ch in k.chars() {
            match ch {
                '\n' => s.push(' '),
                '\u{1f}' => s.push(','),
                '"' | '\\' => {
                    s.push('\\');
                    s.push(ch);
                }
                c if (' '..='~').contains(&c) => s.push(c),
                _ => s.push('?'),
            }
        }
        s.push('"');
    }
    if let Some(d) = detail {
        if !matches!(
            outcome,
            Outcome::StaleWhileRevalidate | Outcome::StaleIfError
        ) {
            s.push_str(&format!("; detail={d}"));
        }
    }
    s
}

#[cfg(test)]
mod tests;
