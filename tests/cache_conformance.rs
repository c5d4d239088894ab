//! RFC 9111 / RFC 9213 conformance of the shared cache through a real edge and a
//! real origin, one behaviour per test, each naming its RFC section.

mod common;

use std::time::{Duration, SystemTime};

use common::{single_pool, Edge, Origin};

fn cached(origin: &Origin, extra_route: &str) -> String {
    format!(
        "{}\n[routes.cache]\nenabled = true\n{extra_route}\n",
        single_pool(origin, "")
    )
}

use common::{cache_status, get_with as get};

/// Fetches `path` twice; the second answer's status and Cache-Status, and how
/// often the origin was asked.
async fn twice(
    edge: &Edge,
    origin: &Origin,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String, usize) {
    let before = origin.requests();
    get(edge, path, headers).await.bytes().await.unwrap();
    let second = get(edge, path, headers).await;
    let status = second.status().as_u16();
    let cs = cache_status(&second);
    second.bytes().await.unwrap();
    (status, cs, origin.requests() - before)
}

fn enc(v: &str) -> String {
    v.replace('=', "%3D")
        .replace(',', "%2C")
        .replace(' ', "%20")
        .replace('"', "%22")
        .replace(';', "%3B")
}

/// RFC 9111 §3: a response with explicit freshness is storable whatever its final
/// status, known or not (5xx, 299, 499, 599 included); without freshness a 500 is
/// not (it is not heuristically cacheable).
#[tokio::test]
async fn any_final_status_with_explicit_freshness_is_stored() {
    let origin = Origin::start("a").await;
    let edge = Edge::start(&cached(&origin, "")).await;
    for status in [500, 503, 299, 499, 599, 302, 403] {
        let path = format!("/fixed?status={status}&cc={}", enc("max-age=60"));
        let (got, cs, n) = twice(&edge, &origin, &path, &[]).await;
        assert_eq!(got, status);
        assert!(cs.contains("hit"), "{status}: {cs}");
        assert_eq!(n, 1, "{status}");
    }
    let (_, cs, n) = twice(&edge, &origin, "/fixed?status=500", &[]).await;
    assert_eq!(n, 2, "a 500 without freshness is not stored: {cs}");
}

/// RFC 9111 §4.2.2: heuristic freshness only when the route turns it on: 10% of
/// the time since Last-Modified, capped by heuristic_max.
#[tokio::test]
async fn heuristic_freshness_is_off_by_default_and_a_tenth_of_the_last_modified_age() {
    let origin = Origin::start("a").await;
    let lm = httpdate::fmt_http_date(SystemTime::now() - Duration::from_secs(20_000));
    let path = format!("/fixed?lm={}", enc(&lm));
    let off = Edge::start(&cached(&origin, "")).await;
    let (_, _, n) = twice(&off, &origin, &path, &[]).await;
    assert_eq!(n, 2, "not stored without heuristic_freshness");
    let on = Edge::start(&cached(
        &origin,
        "heuristic_freshness = true\nheuristic_max = \"1h\"",
    ))
    .await;
    let (_, cs, n) = twice(&on, &origin, &path, &[]).await;
    assert_eq!(n, 1, "{cs}");
    let ttl: i64 = cs
        .split("ttl=")
        .nth(1)
        .and_then(|t| t.split(';').next())
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or_else(|| panic!("no ttl in {cs}"));
    assert!((1990..=2000).contains(&ttl), "10% of 20,000 s: {cs}");
    let old = httpdate::fmt_http_date(SystemTime::now() - Duration::from_secs(200_000));
    let (_, cs, _) = twice(&on, &origin, &format!("/fixed?lm={}", enc(&old)), &[]).await;
    assert!(
        cs.contains("ttl=3600") || cs.contains("ttl=3599"),
        "capped at 1h: {cs}"
    );
}

/// RFC 9111 §4.3.4: a 304 updates the stored response's header fields (all but
/// framing and content fields), so later hits carry what the origin said last.
#[tokio::test]
async fn a_304_updates_the_stored_header_fields() {
    let origin = Origin::start("a").await;
    let edge = Edge::start(&cached(&origin, "")).await;
    // stored stale at once (max-age=0 + a validator); the 304 makes it fresh for a
    // minute and adds a field
    let path = format!(
        "/fixed?etag={}&cc={}&cc304={}&x304=after-304",
        enc("\"v1\""),
        enc("max-age=0"),
        enc("max-age=60")
    );
    let first = get(&edge, &path, &[]).await;
    assert!(first.headers().get("x-updated").is_none());
    first.bytes().await.unwrap();
    let revalidated = get(&edge, &path, &[]).await;
    let cs = cache_status(&revalidated);
    assert!(cs.contains("fwd-status=304"), "{cs}");
    assert_eq!(revalidated.headers()["x-updated"], "after-304");
    assert_eq!(revalidated.headers()["cache-control"], "max-age=60");
    revalidated.bytes().await.unwrap();
    let before = origin.requests();
    let hit = get(&edge, &path, &[]).await;
    assert!(
        cache_status(&hit).contains("hit"),
        "fresh after the 304: {}",
        cache_status(&hit)
    );
    assert_eq!(hit.headers()["x-updated"], "after-304");
    assert_eq!(hit.headers()["cache-control"], "max-age=60");
    assert_eq!(hit.bytes().await.unwrap().len(), 4096);
    assert_eq!(origin.requests(), before);
}

/// RFC 9213 §2.1: the first targeted field (Wingman-Cache-Control, then
/// CDN-Cache-Control) with a valid value governs this cache instead of
/// Cache-Control, so an app can say "edge: 60 s, browsers: private". The field
/// travels on to clients unless the route strips it.
#[tokio::test]
async fn targeted_cache_control_governs_the_edge_and_browsers_keep_cache_control() {
    let origin = Origin::start("a").await;
    let edge = Edge::start(&cached(&origin, "")).await;
    let path = format!("/fixed?cc=private&cdn={}", enc("max-age=60"));
    let (_, cs, n) = twice(&edge, &origin, &path, &[]).await;
    assert!(cs.contains("hit") && n == 1, "{cs}");
    let resp = get(&edge, &path, &[]).await;
    assert_eq!(resp.headers()["cache-control"], "private");
    assert_eq!(resp.headers()["cdn-cache-control"], "max-age=60");
    // the edge-specific field wins over CDN-Cache-Control
    let path = format!("/fixed?cdn=no-store&wcc={}", enc("max-age=60"));
    let (_, cs, n) = twice(&edge, &origin, &path, &[]).await;
    assert!(cs.contains("hit") && n == 1, "{cs}");
    // an invalid targeted value is ignored: Cache-Control decides
    let path = format!("/fixed?cc={}&cdn={}", enc("no-store"), enc("max-age=\"6"));
    let (_, _, n) = twice(&edge, &origin, &path, &[]).await;
    assert_eq!(n, 2);
    // stripped on a route that says so
    let strip = Edge::start(&cached(&origin, "strip_targeted_cache_control = true")).await;
    let path = format!("/fixed?cc=private&cdn={}&s=1", enc("max-age=60"));
    let (_, cs, _) = twice(&strip, &origin, &path, &[]).await;
    assert!(cs.contains("hit"), "{cs}");
    let resp = get(&strip, &path, &[]).await;
    assert!(resp.headers().get("cdn-cache-control").is_none());
    assert!(resp.headers().get("wingman-cache-control").is_none());
}

/// RFC 9111 §5.2.2.3: with must-understand, a response of a status this cache
/// understands is stored despite no-store; one of an unknown status is not.
#[tokio::test]
async fn must_understand_stores_known_statuses_despite_no_store() {
    let origin = Origin::start("a").await;
    let edge = Edge::start(&cached(&origin, "")).await;
    let cc = enc("must-understand, no-store, max-age=60");
    let (_, cs, n) = twice(&edge, &origin, &format!("/fixed?cc={cc}"), &[]).await;
    assert!(cs.contains("hit") && n == 1, "{cs}");
    let (_, _, n) = twice(&edge, &origin, &format!("/fixed?cc={cc}&status=299"), &[]).await;
    assert_eq!(n, 2, "an unknown status with must-understand is not stored");
}

/// RFC 9111 §4.1: stored variants match requests whose varying fields are equal
/// after normalization (combined lines, whitespace, case, order of equal q).
#[tokio::test]
async fn vary_matches_normalized_accept_language() {
    let origin = Origin::start("a").await;
    let edge = Edge::start(&cached(&origin, "")).await;
    let path = format!("/fixed?cc={}&vary=Accept-Language", enc("max-age=60"));
    get(&edge, &path, &[("accept-language", "en, de;q=0.5, fr")])
        .await
        .bytes()
        .await
        .unwrap();
    let before = origin.requests();
    for same in ["fr,EN ,de ; q=0.5", "de;q=0.5, en, fr"] {
        let r = get(&edge, &path, &[("accept-language", same)]).await;
        assert!(
            cache_status(&r).contains("hit"),
            "{same:?}: {}",
            cache_status(&r)
        );
        r.bytes().await.unwrap();
    }
    assert_eq!(origin.requests(), before);
    let other = get(&edge, &path, &[("accept-language", "de, en;q=0.5")]).await;
    assert!(
        !cache_status(&other).contains("hit"),
        "a different preference is another variant"
    );
}

/// RFC 9111 §4.2.3, §5.1 and §4: Age is on every response served from storage
/// (hits and revalidated ones), it counts the origin's Age plus the time the origin
/// took, and the origin's Date is kept (not replaced by the time of the hit).
#[tokio::test]
async fn age_counts_the_response_delay_and_the_origin_date_is_kept() {
    let origin = Origin::start("a").await;
    let edge = Edge::start(&cached(&origin, "")).await;
    // the origin says Age: 100 and takes 1.5 s: the stored response is >= 101 s old
    let path = format!("/fixed?cc={}&age=100&delay=1500", enc("max-age=600"));
    let miss = get(&edge, &path, &[]).await;
    let origin_date = miss.headers()["date"].to_str().unwrap().to_owned();
    miss.bytes().await.unwrap();
    let hit = get(&edge, &path, &[]).await;
    assert!(cache_status(&hit).contains("hit"), "{}", cache_status(&hit));
    let age: u64 = hit.headers()["age"].to_str().unwrap().parse().unwrap();
    assert!(age >= 101, "age {age} misses the response delay");
    // wait for the wall clock to move to another second, then the hit still shows
    // the origin's Date
    let now = || httpdate::fmt_http_date(SystemTime::now());
    let started = now();
    common::wait_until(Duration::from_secs(3), "the clock to tick", || async {
        now() != started
    })
    .await;
    let later = get(&edge, &path, &[]).await;
    assert_eq!(later.headers()["date"].to_str().unwrap(), origin_date);
    // a revalidated response carries Age too
    let path = format!("/fixed?etag={}&cc={}", enc("\"v\""), enc("max-age=0"));
    get(&edge, &path, &[]).await.bytes().await.unwrap();
    let revalidated = get(&edge, &path, &[]).await;
    assert!(cache_status(&revalidated).contains("fwd-status=304"));
    assert!(
        revalidated.headers().contains_key("age"),
        "{:?}",
        revalidated.headers()
    );
}

/// RFC 9211: Cache-Status on every response through a cache route says what the
/// cache did: hit, fwd=uri-miss / vary-miss / request / method / stale, stored,
/// ttl, and the key when the route's debug option is on.
#[tokio::test]
async fn cache_status_names_each_forward_reason() {
    let origin = Origin::start("a").await;
    let edge = Edge::start(&cached(&origin, "cache_status_key = true")).await;
    let path = format!("/fixed?cc={}&vary=X-Mode", enc("max-age=60"));
    let status = |headers: &'static [(&'static str, &'static str)]| {
        let path = path.clone();
        let edge = &edge;
        async move {
            let r = get(edge, &path, headers).await;
            let cs = cache_status(&r);
            r.bytes().await.unwrap();
            cs
        }
    };
    let first = status(&[("x-mode", "a")]).await;
    assert!(first.contains("fwd=uri-miss; stored"), "{first}");
    assert!(first.contains("key=\"http 127.0.0.1 /fixed?"), "{first}");
    let hit = status(&[("x-mode", "a")]).await;
    assert!(hit.contains("; hit; ttl="), "{hit}");
    let vary = status(&[("x-mode", "b")]).await;
    assert!(vary.contains("fwd=vary-miss; stored"), "{vary}");
    let forced = status(&[("x-mode", "a"), ("cache-control", "no-cache")]).await;
    assert!(forced.contains("fwd=request"), "{forced}");
    let post = reqwest::Client::new()
        .post(edge.url(&path))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(cache_status(&post), "wingman-edge; fwd=method");
    // without the debug option the key is not shown
    let plain = Edge::start(&cached(&origin, "")).await;
    let r = get(&plain, &path, &[("x-mode", "a")]).await;
    assert!(!cache_status(&r).contains("key="), "{}", cache_status(&r));
}

/// An origin on a raw socket that answers every request with `answer` (then keeps
/// the connection for the next one). Returns its address and a request counter.
type Counter = std::sync::Arc<std::sync::atomic::AtomicUsize>;

async fn raw_origin(answer: &'static [u8]) -> (std::net::SocketAddr, Counter) {
    raw_origin_answering(answer, usize::MAX).await
}

/// Like [`raw_origin`], answering only the first `answered` requests; after them it
/// reads each request and closes the connection without a byte.
async fn raw_origin_answering(
    answer: &'static [u8],
    answered: usize,
) -> (std::net::SocketAddr, Counter) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = count.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        let n = seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        if n >= answered {
                            return; // close without answering
                        }
                        if s.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, count)
}

/// RFC 9110 §15.2: interim responses (here 103 Early Hints) reach the client
/// before the final response, and are never stored or merged into it: a hit has
/// neither the 103 nor its Link field.
#[tokio::test]
async fn early_hints_are_forwarded_in_order_and_never_stored() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (addr, count) = raw_origin(
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\nCache-Control: max-age=60\r\n\r\nok",
    )
    .await;
    let body = format!(
        "[[upstreams]]\nname = \"app\"\nservers = [{{ address = \"{addr}\" }}]\n[[routes]]\nname = \"all\"\nupstream = \"app\"\n[routes.cache]\nenabled = true\n"
    );
    let edge = Edge::start(&body).await;
    let exchange = || async {
        let mut s = tokio::net::TcpStream::connect(edge.addr()).await.unwrap();
        s.write_all(b"GET /page HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    };
    let first = exchange().await;
    assert!(first.starts_with("HTTP/1.1 103"), "{first}");
    let final_at = first
        .find("HTTP/1.1 200")
        .unwrap_or_else(|| panic!("{first}"));
    assert!(
        first[..final_at]
            .to_ascii_lowercase()
            .contains("link: </style.css>"),
        "{first}"
    );
    assert!(
        !first[final_at..].to_ascii_lowercase().contains("link:"),
        "merged: {first}"
    );
    let hit = exchange().await;
    assert!(hit.starts_with("HTTP/1.1 200"), "{hit}");
    assert!(
        hit.to_ascii_lowercase()
            .contains("cache-status: wingman-edge; hit"),
        "{hit}"
    );
    assert!(!hit.to_ascii_lowercase().contains("link:"), "{hit}");
    assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 1);
}

/// RFC 5861 §4 / RFC 9111 §4.2.4: within stale-if-error, an origin that closes the
/// connection without answering gets the stored response, marked stale.
#[tokio::test]
async fn stale_if_error_covers_an_origin_that_closes_without_answering() {
    let (addr, count) = raw_origin_answering(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nCache-Control: max-age=1, stale-if-error=60\r\n\r\nok",
        1,
    )
    .await;
    let body = format!(
        "[[upstreams]]\nname = \"app\"\nservers = [{{ address = \"{addr}\" }}]\n[upstreams.passive]\nconsecutive_failures = 0\n[[routes]]\nname = \"all\"\nupstream = \"app\"\n[routes.cache]\nenabled = true\n"
    );
    let edge = Edge::start(&body).await;
    get(&edge, "/p", &[]).await.bytes().await.unwrap();
    // poll until the stored response is stale: then the origin only hangs up
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let stale = loop {
        let r = get(&edge, "/p", &[]).await;
        if !cache_status(&r).contains("; hit; ttl=") {
            break r;
        }
        r.bytes().await.unwrap();
        assert!(std::time::Instant::now() < deadline, "never went stale");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(stale.status(), 200);
    let cs = cache_status(&stale);
    assert!(
        cs.contains("fwd=stale") && cs.contains("stale-if-error"),
        "{cs}"
    );
    assert_eq!(stale.bytes().await.unwrap(), "ok");
    assert!(
        count.load(std::sync::atomic::Ordering::SeqCst) >= 2,
        "the origin was asked"
    );
}
