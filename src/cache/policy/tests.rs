use super::*;

fn policy() -> CachePolicy {
    CachePolicy {
        key_headers: vec![],
        key_cookies: vec![],
        ignore_query: vec![],
        max_ttl: None,
        default_ttl: None,
        stale_while_revalidate: 0,
        stale_if_error: 0,
        store_set_cookie: false,
        bypass_cookies: vec![],
        bypass_headers: vec![],
        lock_timeout: Duration::from_secs(5),
        heuristic_freshness: false,
        heuristic_max: Duration::from_secs(86_400),
        targeted: vec![
            HeaderName::from_static("wingman-cache-control"),
            HeaderName::from_static("cdn-cache-control"),
        ],
        strip_targeted: false,
        status_key: false,
    }
}

fn resp(status: u16, headers: &[(&str, &str)]) -> ResponseHeader {
    let mut r = ResponseHeader::build(status, None).unwrap();
    for (k, v) in headers {
        r.append_header(k.to_string(), *v).unwrap();
    }
    r
}

fn now() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

fn date(offset: i64) -> String {
    let t = if offset >= 0 {
        now() + Duration::from_secs(offset as u64)
    } else {
        now() - Duration::from_secs((-offset) as u64)
    };
    httpdate::fmt_http_date(t)
}

/// The freshness lifetime left, in seconds, or the reason for not storing.
fn ttl(auth: bool, r: &ResponseHeader, p: &CachePolicy) -> Result<i64, &'static str> {
    match decide(auth, r, p, now(), Duration::ZERO) {
        Decision::Store { fresh_until, .. } => Ok(match fresh_until.duration_since(now()) {
            Ok(d) => d.as_secs() as i64,
            Err(e) => -(e.duration().as_secs() as i64),
        }),
        Decision::NoStore(why) => Err(why),
    }
}

#[test]
fn storage_and_freshness_table() {
    let p = policy();
    let d0 = date(0);
    let cases: Vec<(&str, bool, ResponseHeader, Result<i64, &str>)> = vec![
        (
            "max-age",
            false,
            resp(200, &[("cache-control", "max-age=60")]),
            Ok(60),
        ),
        (
            "s-maxage over max-age",
            false,
            resp(200, &[("cache-control", "max-age=60, s-maxage=10")]),
            Ok(10),
        ),
        (
            "max-age over Expires",
            false,
            resp(
                200,
                &[
                    ("cache-control", "max-age=60"),
                    ("date", &d0),
                    ("expires", &date(3600)),
                ],
            ),
            Ok(60),
        ),
        (
            "Expires judged against Date",
            false,
            resp(200, &[("date", &date(-1000)), ("expires", &date(-900))]),
            Ok(-900),
        ),
        (
            "Expires minus Date, origin clock ahead",
            false,
            resp(200, &[("date", &d0), ("expires", &date(120))]),
            Ok(120),
        ),
        (
            "invalid Expires is already expired",
            false,
            resp(200, &[("expires", "soon")]),
            Ok(-1),
        ),
        (
            "no freshness, no heuristic",
            false,
            resp(200, &[]),
            Err("no-freshness"),
        ),
        (
            "no-store",
            false,
            resp(200, &[("cache-control", "no-store, max-age=60")]),
            Err("no-store"),
        ),
        (
            "private",
            false,
            resp(200, &[("cache-control", "private, max-age=60")]),
            Err("private"),
        ),
        (
            "authorization without permission",
            true,
            resp(200, &[("cache-control", "max-age=60")]),
            Err("authorization"),
        ),
        (
            "authorization with public",
            true,
            resp(200, &[("cache-control", "public, max-age=60")]),
            Ok(60),
        ),
        (
            "authorization with s-maxage",
            true,
            resp(200, &[("cache-control", "s-maxage=30")]),
            Ok(30),
        ),
        (
            "authorization with must-revalidate",
            true,
            resp(200, &[("cache-control", "must-revalidate, max-age=5")]),
            Ok(5),
        ),
        (
            "set-cookie",
            false,
            resp(
                200,
                &[("cache-control", "max-age=60"), ("set-cookie", "a=b")],
            ),
            Err("set-cookie"),
        ),
        (
            "vary star",
            false,
            resp(
                200,
                &[("cache-control", "max-age=60"), ("vary", "Accept, *")],
            ),
            Err("vary-star"),
        ),
        (
            "no-cache with validator: stored stale",
            false,
            resp(200, &[("cache-control", "no-cache"), ("etag", "\"a\"")]),
            Ok(-1),
        ),
        (
            "no-cache without validator",
            false,
            resp(200, &[("cache-control", "no-cache")]),
            Err("no-cache-without-validator"),
        ),
        (
            "age is subtracted",
            false,
            resp(200, &[("cache-control", "max-age=60"), ("age", "50")]),
            Ok(10),
        ),
        (
            "apparent age from Date",
            false,
            resp(
                200,
                &[("cache-control", "max-age=60"), ("date", &date(-20))],
            ),
            Ok(40),
        ),
        (
            "206 never",
            false,
            resp(206, &[("cache-control", "max-age=60")]),
            Err("status"),
        ),
        (
            "302 with explicit freshness",
            false,
            resp(302, &[("cache-control", "max-age=60")]),
            Ok(60),
        ),
        // RFC 9111 §3: any final status with explicit freshness is storable
        (
            "500 with explicit freshness",
            false,
            resp(500, &[("cache-control", "max-age=60")]),
            Ok(60),
        ),
        (
            "unknown 599 with s-maxage",
            false,
            resp(599, &[("cache-control", "s-maxage=30")]),
            Ok(30),
        ),
        (
            "304 never",
            false,
            resp(304, &[("cache-control", "max-age=60")]),
            Err("status"),
        ),
        (
            "500 without freshness",
            false,
            resp(500, &[]),
            Err("status"),
        ),
        (
            "404 with max-age",
            false,
            resp(404, &[("cache-control", "max-age=5")]),
            Ok(5),
        ),
    ];
    for (name, auth, r, want) in cases {
        assert_eq!(ttl(auth, &r, &p), want, "{name}");
    }
}

#[test]
fn route_heuristic_and_ttl_cap_apply() {
    let mut p = policy();
    p.default_ttl = Some(Duration::from_secs(30));
    assert_eq!(ttl(false, &resp(200, &[]), &p), Ok(30));
    assert_eq!(ttl(false, &resp(302, &[]), &p), Err("status"));
    p.max_ttl = Some(Duration::from_secs(10));
    assert_eq!(
        ttl(false, &resp(200, &[("cache-control", "max-age=600")]), &p),
        Ok(10)
    );
    p.store_set_cookie = true;
    assert_eq!(
        ttl(
            false,
            &resp(
                200,
                &[("cache-control", "max-age=5"), ("set-cookie", "a=b")]
            ),
            &p
        ),
        Ok(5)
    );
}

fn stale_windows(r: &ResponseHeader, p: &CachePolicy) -> (u32, u32) {
    match decide(false, r, p, now(), Duration::ZERO) {
        Decision::Store {
            stale_while_revalidate,
            stale_if_error,
            ..
        } => (stale_while_revalidate, stale_if_error),
        other => panic!("not stored: {other:?}"),
    }
}

#[test]
fn stale_windows_come_from_the_response_or_the_route_and_revalidate_directives_forbid_them() {
    let mut p = policy();
    let r = resp(
        200,
        &[(
            "cache-control",
            "max-age=1, stale-while-revalidate=30, stale-if-error=300",
        )],
    );
    assert_eq!(stale_windows(&r, &p), (30, 300));
    p.stale_while_revalidate = 7;
    p.stale_if_error = 70;
    assert_eq!(
        stale_windows(&resp(200, &[("cache-control", "max-age=1")]), &p),
        (7, 70)
    );
    for forbid in ["must-revalidate", "proxy-revalidate", "s-maxage=1"] {
        let r = resp(
            200,
            &[(
                "cache-control",
                &format!("max-age=1, stale-if-error=300, {forbid}"),
            )],
        );
        assert_eq!(stale_windows(&r, &p), (0, 0), "{forbid}");
    }
}

#[test]
fn private_and_no_cache_field_lists_are_stripped_not_refused() {
    let r = resp(
        200,
        &[(
            "cache-control",
            "max-age=60, private=\"X-User, X-Token\", no-cache=\"Set-Login\"",
        )],
    );
    match decide(false, &r, &policy(), now(), Duration::ZERO) {
        Decision::Store { strip, .. } => assert_eq!(strip, ["x-user", "x-token", "set-login"]),
        other => panic!("{other:?}"),
    }
}

fn req(uri: &str, headers: &[(&str, &str)]) -> RequestHeader {
    let mut r = RequestHeader::build("GET", uri.as_bytes(), None).unwrap();
    for (k, v) in headers {
        r.append_header(k.to_string(), *v).unwrap();
    }
    r
}

#[test]
fn keys_frame_scheme_host_path_and_extras() {
    let mut p = policy();
    let r = req(
        "/a?x=1&utm_source=m&y=2",
        &[("x-tenant", "t1"), ("cookie", "lang=de; sid=9")],
    );
    assert_eq!(
        primary_key("http", "Chat.Example", &r, &p),
        "http\nchat.example\n/a?x=1&utm_source=m&y=2"
    );
    p.ignore_query = vec!["utm_source".into()];
    p.key_headers = vec![HeaderName::from_static("x-tenant")];
    p.key_cookies = vec!["lang".into()];
    assert_eq!(
        primary_key("https", "chat.example", &r, &p),
        "https\nchat.example\n/a?x=1&y=2\nx-tenant=t1\u{1f}\ncookie:lang=de"
    );
    assert!(
        primary_key("https", "chat.example", &r, &p).starts_with(&key_prefix(
            "https",
            "CHAT.example",
            "/a"
        ))
    );
}

#[test]
fn bypass_rules_and_client_revalidation() {
    let mut p = policy();
    p.bypass_cookies = vec!["sessionid".into()];
    p.bypass_headers = vec![HeaderName::from_static("authorization")];
    assert!(bypass(&req("/", &[("cookie", "a=1; sessionid=x")]), &p));
    assert!(bypass(&req("/", &[("authorization", "Bearer t")]), &p));
    assert!(!bypass(&req("/", &[("cookie", "a=1")]), &p));
    assert!(request_wants_revalidation(&req(
        "/",
        &[("cache-control", "no-cache")]
    )));
    assert!(request_wants_revalidation(&req(
        "/",
        &[("cache-control", "max-age=0")]
    )));
    assert!(request_wants_revalidation(&req(
        "/",
        &[("pragma", "no-cache")]
    )));
    assert!(!request_wants_revalidation(&req(
        "/",
        &[("cache-control", "max-age=10")]
    )));
}

#[test]
fn variance_uses_the_negotiated_coding_for_accept_encoding() {
    let stored = resp(200, &[("vary", "Accept-Encoding, X-Lang")]);
    let a = req("/", &[("accept-encoding", "gzip, br"), ("x-lang", "de")]);
    let b = req(
        "/",
        &[("accept-encoding", "br;q=1, gzip;q=0.5"), ("x-lang", "de")],
    );
    let c = req("/", &[("accept-encoding", "br"), ("x-lang", "fr")]);
    assert_eq!(variance(&stored, &a, "br"), variance(&stored, &b, "br"));
    assert_ne!(variance(&stored, &a, "br"), variance(&stored, &a, "gzip"));
    assert_ne!(variance(&stored, &a, "br"), variance(&stored, &c, "br"));
    assert_eq!(variance(&resp(200, &[]), &a, "br"), None);
}

#[test]
fn cache_status_values() {
    assert_eq!(
        cache_status(Outcome::Hit, Some(42), false, None, None),
        "wingman-edge; hit; ttl=42"
    );
    // RFC 9211 forward reasons: uri-miss, vary-miss, request
    assert_eq!(
        cache_status(Outcome::Miss, None, true, None, None),
        "wingman-edge; fwd=uri-miss; stored"
    );
    assert_eq!(
        cache_status(Outcome::VaryMiss, None, true, None, None),
        "wingman-edge; fwd=vary-miss; stored"
    );
    assert_eq!(
        cache_status(Outcome::Request, None, true, None, None),
        "wingman-edge; fwd=request; stored"
    );
    assert_eq!(
        cache_status(Outcome::Uncacheable, None, false, Some("set-cookie"), None),
        "wingman-edge; fwd=uri-miss; detail=set-cookie"
    );
    // stale answers are marked fwd=stale
    assert_eq!(
        cache_status(Outcome::StaleIfError, Some(-3), false, None, None),
        "wingman-edge; hit; fwd=stale; detail=stale-if-error; ttl=-3"
    );
    // the key, as an sf-string, when the debug option is on
    assert_eq!(
        cache_status(
            Outcome::Hit,
            None,
            false,
            None,
            Some("http\na\n/p?q=\"1\"\nx=y\u{1f}")
        ),
        "wingman-edge; hit; key=\"http a /p?q=\\\"1\\\" x=y,\""
    );
}

/// RFC 9111 §1.2.2: a delta-seconds too large to represent counts as 2^31; no
/// value, however large, may overflow the lifetime or age arithmetic.
#[test]
fn huge_max_age_s_maxage_and_age_are_clamped_to_2_pow_31() {
    let p = policy();
    let cap = 1i64 << 31;
    for cc in [
        "max-age=9223372036854775807",
        "max-age=9223372036854775808",
        "s-maxage=99999999999999999999999999",
        "max-age=18446744073709551615",
    ] {
        assert_eq!(
            ttl(false, &resp(200, &[("cache-control", cc)]), &p),
            Ok(cap),
            "{cc}"
        );
    }
    // an age near 2^63 makes the response as old as 2^31 s, never a panic
    let r = resp(
        200,
        &[
            ("cache-control", "max-age=9223372036854775807"),
            ("age", "9223372036854775807"),
        ],
    );
    assert!(matches!(
        decide(false, &r, &p, now(), Duration::ZERO),
        Decision::Store { .. }
    ));
    // a value that is not 1*DIGIT is no freshness at all
    assert_eq!(
        ttl(false, &resp(200, &[("cache-control", "max-age=-5")]), &p),
        Err("no-freshness")
    );
    assert_eq!(
        ttl(false, &resp(200, &[("cache-control", "max-age=+5")]), &p),
        Err("no-freshness")
    );
}

/// The key's host is the one routing uses: port, case and trailing dot do not
/// make another key, and a resource's key is a prefix of each of its variants'.
#[test]
fn key_host_is_normalized_like_routing_and_variants_extend_the_resource_key() {
    let mut p = policy();
    let r = req("/a?x=1", &[("x-tenant", "t1")]);
    let plain = primary_key("http", "chat.example", &r, &p);
    for host in [
        "Chat.Example",
        "chat.example:8080",
        "chat.example.",
        "CHAT.example.:80",
    ] {
        assert_eq!(primary_key("http", host, &r, &p), plain, "{host}");
    }
    assert_eq!(
        resource_key("http", "Chat.example:80", "/a?x=1", &[]),
        plain
    );
    p.key_headers = vec![HeaderName::from_static("x-tenant")];
    p.ignore_query = vec!["utm".into()];
    let r = req("/a?x=1&utm=z", &[("x-tenant", "t1")]);
    let variant = primary_key("http", "chat.example", &r, &p);
    let resource = resource_key("http", "chat.example", "/a?utm=q&x=1", &p.ignore_query);
    assert_eq!(resource, "http\nchat.example\n/a?x=1");
    assert!(variant.starts_with(&format!("{resource}\n")), "{variant:?}");
}

/// RFC 9111 §4.2.2: heuristic freshness only when the route turns it on, only for
/// heuristically cacheable statuses (or `public`), 10% of the time since
/// Last-Modified, capped by heuristic_max.
#[test]
fn heuristic_freshness_is_opt_in_tenth_of_last_modified_age_and_capped() {
    let mut p = policy();
    let lm = date(-10_000);
    let r = resp(200, &[("last-modified", &lm), ("date", &date(0))]);
    assert_eq!(ttl(false, &r, &p), Err("no-freshness"), "off by default");
    p.heuristic_freshness = true;
    assert_eq!(ttl(false, &r, &p), Ok(1000));
    p.heuristic_max = Duration::from_secs(300);
    assert_eq!(ttl(false, &r, &p), Ok(300));
    let r500 = resp(500, &[("last-modified", &lm)]);
    assert_eq!(ttl(false, &r500, &p), Err("status"), "500 is not heuristic");
    let public = resp(302, &[("last-modified", &lm), ("cache-control", "public")]);
    assert_eq!(ttl(false, &public, &p), Ok(300), "public allows heuristics");
}

/// RFC 9213: the first targeted field of the list with a valid value governs this
/// cache, replacing Cache-Control and Expires; an invalid one is ignored.
#[test]
fn targeted_cache_control_takes_precedence_and_invalid_values_are_ignored() {
    let p = policy();
    let cases: Vec<(&str, ResponseHeader, Result<i64, &str>)> = vec![
        (
            "CDN-Cache-Control over Cache-Control",
            resp(
                200,
                &[
                    ("cache-control", "private"),
                    ("cdn-cache-control", "max-age=60"),
                ],
            ),
            Ok(60),
        ),
        (
            "edge-specific over CDN-Cache-Control",
            resp(
                200,
                &[
                    ("cdn-cache-control", "no-store"),
                    ("wingman-cache-control", "max-age=30"),
                ],
            ),
            Ok(30),
        ),
        (
            "targeted no-store",
            resp(
                200,
                &[
                    ("cache-control", "max-age=60"),
                    ("cdn-cache-control", "no-store"),
                ],
            ),
            Err("no-store"),
        ),
        (
            "Expires is ignored under a targeted field",
            resp(
                200,
                &[
                    ("expires", &date(600)),
                    ("date", &date(0)),
                    ("cdn-cache-control", "must-revalidate"),
                ],
            ),
            Err("no-freshness"),
        ),
        (
            "invalid targeted value falls back to Cache-Control",
            resp(
                200,
                &[
                    ("cache-control", "max-age=60"),
                    ("cdn-cache-control", "max-age=\"x"),
                ],
            ),
            Ok(60),
        ),
        (
            "case-insensitive field name, private as a boolean",
            resp(
                200,
                &[
                    ("CDN-Cache-Control", "private"),
                    ("cache-control", "max-age=60"),
                ],
            ),
            Err("private"),
        ),
    ];
    for (what, r, expected) in cases {
        assert_eq!(ttl(false, &r, &p), expected, "{what}");
    }
}

/// RFC 9111 §5.2.2.3: must-understand stores a known status despite no-store, and
/// never an unknown one.
#[test]
fn must_understand_overrides_no_store_only_for_understood_statuses() {
    let p = policy();
    let known = resp(
        200,
        &[("cache-control", "must-understand, no-store, max-age=60")],
    );
    assert_eq!(ttl(false, &known, &p), Ok(60));
    let unknown = resp(
        299,
        &[("cache-control", "must-understand, no-store, max-age=60")],
    );
    assert_eq!(ttl(false, &unknown, &p), Err("must-understand"));
}

/// RFC 9111 §4.1: request values that mean the same share a variant: combined
/// field lines, whitespace around members, case and order of equal-q members of
/// the negotiation lists. Other fields keep their bytes.
#[test]
fn vary_matches_after_normalization() {
    let stored = resp(200, &[("vary", "Accept-Language, X-Mode")]);
    let v = |headers: &[(&str, &str)]| variance(&stored, &req("/a", headers), "identity");
    let base = v(&[("accept-language", "en, de;q=0.5, fr"), ("x-mode", "a")]);
    for same in [
        v(&[("accept-language", "fr,EN , de ; q=0.5"), ("x-mode", "a")]),
        v(&[
            ("accept-language", "en"),
            ("accept-language", "fr, de;q=0.5"),
            ("x-mode", " a"),
        ]),
    ] {
        assert_eq!(same, base);
    }
    assert_ne!(
        v(&[("accept-language", "en, de;q=0.6, fr"), ("x-mode", "a")]),
        base
    );
    assert_ne!(
        v(&[("accept-language", "en, de;q=0.5, fr"), ("x-mode", "A")]),
        base
    );
}

/// RFC 9111 §4.2.3 and §5.1: the corrected initial age adds the response delay to
/// Age; of a list the first member counts; an invalid Age is ignored.
#[test]
fn age_is_corrected_by_the_response_delay_and_parsed_as_the_rfc_says() {
    let p = policy();
    let left = |age: &str, delay: u64| {
        let r = resp(200, &[("cache-control", "max-age=100"), ("age", age)]);
        match decide(false, &r, &p, now(), Duration::from_secs(delay)) {
            Decision::Store { fresh_until, .. } => {
                fresh_until.duration_since(now()).map_or(0, |d| d.as_secs())
            }
            Decision::NoStore(why) => panic!("{why}"),
        }
    };
    assert_eq!(left("10", 0), 90);
    assert_eq!(left("10", 5), 85, "response delay counts");
    assert_eq!(left("10, 50", 0), 90, "first member of a list");
    for invalid in ["10a", "-10", "10;x=1", "abc", ""] {
        assert_eq!(left(invalid, 0), 100, "{invalid:?} is ignored");
    }
}
