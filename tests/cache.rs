//! The shared response cache through a real edge: what is stored and reused
//! (RFC 9111), variants, revalidation, request collapsing, stale answers, purges,
//! invalidation, and the interplay with compression.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{single_pool, wait_until, Edge, Origin};

fn cached(origin: &Origin, extra_route: &str) -> String {
    format!(
        "{}\n[routes.cache]\nenabled = true\n{extra_route}\n",
        single_pool(origin, "")
    )
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

use common::{cache_status as status_of, get_with as get};

/// Requests `path` twice (with `headers`); returns how many times the origin saw it
/// and the second Cache-Status.
async fn twice(
    edge: &Edge,
    origin: &Origin,
    path: &str,
    headers: &[(&str, &str)],
) -> (usize, String) {
    let before = origin.requests();
    let first = get(edge, path, headers).await;
    first.bytes().await.unwrap();
    let second = get(edge, path, headers).await;
    let cs = status_of(&second);
    second.bytes().await.unwrap();
    (origin.requests() - before, cs)
}

#[tokio::test]
async fn a_fresh_response_is_served_from_the_cache_with_age() {
    let origin = Origin::start("a").await;
    let edge = Edge::start(&cached(&origin, "")).await;
    let first = get(&edge, "/fixed?cc=max-age%3D60", &[]).await;
    assert!(
        status_of(&first).contains("fwd=uri-miss; stored"),
        "{}",
        status_of(&first)
    );
    let body = first.bytes().await.unwrap();
    let second = get(&edge, "/fixed?cc=max-age%3D60", &[]).await;
    assert!(
        status_of(&second).starts_with("wingman-edge; hit; ttl="),
        "{}",
        status_of(&second)
    );
    assert!(second.headers().contains_key("age"));
    assert_eq!(second.bytes().await.unwrap(), body);
    assert_eq!(origin.requests(), 1);
    edge.wait_metric("wingman_edge_cache_lookups_total{result=\"hit\"}", 1.0)
        .await;
}

/// (path, request headers, origin requests for two identical requests)
type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], usize);

#[tokio::test]
async fn what_a_shared_cache_must_not_reuse() {
    let origin = Origin::start("a").await;
    let edge = Edge::start(&cached(&origin, "")).await;
    let cases: &[Case] = &[
        ("/fixed?cc=max-age%3D60&k=1", &[], 1),
        ("/fixed?cc=no-store%2C%20max-age%3D60", &[], 2),
        ("/fixed?cc=private%2C%20max-age%3D60", &[], 2),
        ("/fixed?cc=max-age%3D60&sc=sid%3D42", &[], 2),
        ("/fixed?cc=max-age%3D60&vary=*", &[], 2),
        ("/fixed?k=no-freshness", &[], 2),
        (
            "/fixed?cc=max-age%3D60&k=auth",
            &[("authorization", "Bearer t")],
            2,
        ),
        (
            "/fixed?cc=public%2C%20max-age%3D60&k=auth-public",
            &[("authorization", "Bearer t")],
            1,
        ),
        (
            "/fixed?cc=s-maxage%3D60&k=auth-s",
            &[("authorization", "Bearer t")],
            1,
        ),
        // a 500 is reused only with explicit freshness (RFC 9111 §3; see
        // cache_conformance.rs), never heuristically
        ("/fixed?status=500", &[], 2),
        ("/fixed?cc=max-age%3D60&status=404&k=nf", &[], 1),
    ];
    for (path, headers, want) in cases {
        let (n, cs) = twice(&edge, &origin, path, headers).await;
        assert_eq!(
            n, *want,
            "{path} {headers:?}: origin saw {n} (second: {cs})"
        );
    }
}

#[tokio::test]
async fn a_private_or_cookie_setting_response_is_never_served_to_another_client() {
    let origin = Origin::start("a").await;
    let edge = Edge::start(&cached(&origin, "")).await;
    let alice = get(
        &edge,
        "/fixed?cc=max-age%3D60&sc=sid%3Dalice&k=me",
        &[("cookie", "sid=alice")],
    )
    .await;
    assert_eq!(alice.headers()["set-cookie"], "sid=alice");
    let bob = get(&edge, "/fixed?cc=max-age%3D60&sc=sid%3Dalice&k=me", &[]).await;
    assert!(!status_of(&bob).contains("hit"), "{}", status_of(&bob));
    assert_eq!(origin.requests(), 2);
}

#[tokio::test]
async fn vary_keeps_one_variant_per_listed_request_header() {
    let origin = Origin::start("a").await;
    let edge = Edge::start(&cached(&origin, "")).await;
    let path = "/fixed?cc=max-age%3D60&vary=X-Lang";
    for lang in ["de", "fr", "de", "fr", "de"] {
        get(&edge, path, &[("x-lang", lang)])
            .await
            .bytes()
            .await
            .unwrap();
    }
    assert_eq!(origin.requests(), 2, "one fetch per language");
}

#[tokio::test]
async fn a_compressed_variant_is_stored_once_per_coding_and_hits_are_not_recompressed() {
    let origin = Origin::start("a").await;
    let edge = Edge::start(&cached(&origin, "")).await;
    let path = "/fixed?cc=max-age%3D60";
    let mut bodies = Vec::new();
    for ae in [
        "gzip",
        "gzip",
        "br",
        "br, gzip",
        "identity",
        "zstd;q=0, gzip",
    ] {
        let resp = get(&edge, path, &[("accept-encoding", ae)]).await;
        let ce = resp
            .headers()
            .get("content-encoding")
            .map(|v| v.to_str().unwrap().to_owned());
        bodies.push((ae, ce, status_of(&resp), resp.bytes().await.unwrap().len()));
    }
    assert_eq!(
        origin.requests(),
        3,
        "gzip, br and identity variants: {bodies:#?}"
    );
    assert_eq!(bodies[1].1.as_deref(), Some("gzip"));
    assert!(bodies[1].2.contains("hit"), "{bodies:#?}");
    assert!(bodies[3].2.contains("hit") && bodies[3].1.as_deref() == Some("br"));
    assert!(bodies[5].2.contains("hit") && bodies[5].1.as_deref() == Some("gzip"));
    assert_eq!(bodies[4].1, None);
    assert_eq!(bodies[4].3, 4096);
    edge.wait_metric("wingman_edge_cache_lookups_total{result=\"hit\"}", 3.0)
        .await;
    // 2 compressions (gzip, br) for 5 compressed answers
    assert_eq!(
        edge.metric("wingman_edge_compressed_responses_total{algorithm=\"gzip\"}")
            .await,
        Some(1.0)
    );
}

#[tokio::test]
async fn head_is_answered_from_a_stored_get() {
    let origin = Origin::start("a").await;
    let edge = Edge::start(&cached(&origin, "")).await;
    get(&edge, "/fixed?cc=max-age%3D60", &[])
        .await
        .bytes()
        .await
        .unwrap();
    let head = client()
        .head(edge.url("/fixed?cc=max-age%3D60"))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 200);
    assert!(status_of(&head).contains("hit"), "{}", status_of(&head));
    assert_eq!(origin.requests(), 1);
}

#[tokio::test]
async fn a_stale_response_is_revalidated_with_its_etag_and_a_304_refreshes_it() {
    let origin = Origin::start("a").await;
    let edge = Edge::start(&cached(&origin, "")).await;
    let path = "/fixed?cc=no-cache&etag=%22v1%22";
    let first = get(&edge, path, &[]).await;
    assert_eq!(first.bytes().await.unwrap().len(), 4096);
    let second = get(&edge, path, &[]).await;
    assert_eq!(second.status(), 200);
    assert!(
        status_of(&second).contains("fwd=stale; fwd-status=304"),
        "{}",
        status_of(&second)
    );
    assert_eq!(second.bytes().await.unwrap().len(), 4096);
    let seen = origin.last_seen().unwrap();
    assert_eq!(
        seen.headers.get("if-none-match").map(String::as_str),
        Some("\"v1\"")
    );
    // a client's own validator gets a 304 from the edge
    let cond = get(&edge, path, &[("if-none-match", "\"v1\"")]).await;
    assert_eq!(cond.status(), 304);
}

#[tokio::test]
async fn a_hundred_concurrent_misses_make_one_origin_request() {
    let origin = Origin::start("a").await;
    let edge = std::sync::Arc::new(Edge::start(&cached(&origin, "")).await);
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let edge = edge.clone();
        tasks.push(tokio::spawn(async move {
            let resp = get(&edge, "/fixed?cc=max-age%3D60&delay=500", &[]).await;
            (resp.status(), resp.bytes().await.unwrap().len())
        }));
    }
    for t in tasks {
        let (status, len) = t.await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(len, 4096);
    }
    assert_eq!(origin.requests(), 1);
    edge.wait_metric("wingman_edge_cache_lock_waits_total", 99.0)
        .await;
}

#[tokio::test]
async fn a_fetch_slower_than_the_lock_timeout_is_still_stored_for_later_requests() {
    let origin = Origin::start("a").await;
    let edge = std::sync::Arc::new(Edge::start(&cached(&origin, "lock_timeout = \"300ms\"")).await);
    let path = "/fixed?cc=max-age%3D60&delay=1000";
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let edge = edge.clone();
        tasks.push(tokio::spawn(async move {
            let resp = get(&edge, path, &[]).await;
            (resp.status(), resp.bytes().await.unwrap().len())
        }));
    }
    for t in tasks {
        let (status, len) = t.await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(len, 4096);
    }
    // the waiters gave up on the lock and went to the origin themselves; the object
    // is in the cache all the same, and what follows are hits
    let fetched = origin.requests();
    assert!((1..=8).contains(&fetched), "{fetched} origin requests");
    for _ in 0..3 {
        let r = get(&edge, path, &[]).await;
        assert!(status_of(&r).contains("hit"), "{}", status_of(&r));
        r.bytes().await.unwrap();
    }
    assert_eq!(origin.requests(), fetched);
}

#[tokio::test]
async fn stale_while_revalidate_serves_stale_then_refreshes_once() {
    let origin = Origin::start("a").await;
    let edge = Edge::start(&cached(&origin, "")).await;
    let path = "/fixed?cc=max-age%3D1%2C%20stale-while-revalidate%3D60";
    get(&edge, path, &[]).await.bytes().await.unwrap();
    // let the response expire (the test is about time passing)
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let stale = get(&edge, path, &[]).await;
    assert!(
        status_of(&stale).contains("stale-while-revalidate"),
        "{}",
        status_of(&stale)
    );
    assert_eq!(
        stale.headers()["x-origin-n"],
        "1",
        "the stale copy is served"
    );
    stale.bytes().await.unwrap();
    // requests during the refresh get the stale copy; once it is stored, the new one
    let edge_ref = &edge;
    wait_until(Duration::from_secs(10), "refreshed copy", || async move {
        let r = get(edge_ref, path, &[]).await;
        let n = r.headers()["x-origin-n"].to_str().unwrap().to_owned();
        r.bytes().await.unwrap();
        n == "2"
    })
    .await;
    // counted as soon as the refreshed copy shows: it lives only 1 s itself, so a slow
    // machine may see it expire (and refresh again) a little later
    assert_eq!(origin.requests(), 2, "exactly one refresh");
    let fresh = get(&edge, path, &[]).await;
    assert!(status_of(&fresh).contains("hit"), "{}", status_of(&fresh));
}

#[tokio::test]
async fn stale_if_error_covers_an_origin_5xx_and_an_origin_down() {
    let origin = Origin::start("a").await;
    let edge = Edge::start(&cached(&origin, "")).await;
    let path = "/fixed?cc=max-age%3D1%2C%20stale-if-error%3D60";
    get(&edge, path, &[]).await.bytes().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    origin.state.force_status.store(503, Ordering::SeqCst);
    let stale = get(&edge, path, &[]).await;
    assert_eq!(stale.status(), 200);
    assert!(
        status_of(&stale).contains("stale-if-error"),
        "{}",
        status_of(&stale)
    );
    origin.stop();
    let down = get(&edge, path, &[]).await;
    assert_eq!(down.status(), 200);
    assert!(
        status_of(&down).contains("stale-if-error"),
        "{}",
        status_of(&down)
    );
}

#[tokio::test]
async fn must_revalidate_forbids_stale_if_error() {
    let origin = Origin::start("a").await;
    let edge = Edge::start(&cached(&origin, "stale_if_error = \"60s\"")).await;
    let path = "/fixed?cc=max-age%3D1%2C%20must-revalidate";
    get(&edge, path, &[]).await.bytes().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    origin.state.force_status.store(500, Ordering::SeqCst);
    let resp = get(&edge, path, &[]).await;
    assert_eq!(resp.status(), 500);
}

#[tokio::test]
async fn purge_removes_one_url_or_a_prefix() {
    let origin = Origin::start("a").await;
    let edge = Edge::start(&cached(&origin, "")).await;
    let host = format!("127.0.0.1:{}", edge.port);
    for p in ["/fixed?cc=max-age%3D60&p=1", "/fixed?cc=max-age%3D60&p=2"] {
        get(&edge, p, &[]).await.bytes().await.unwrap();
    }
    assert_eq!(origin.requests(), 2);
    let purge = |q: String| {
        let url = edge.admin_url(&format!("/cache/purge?{q}"));
        async move {
            let req = client().post(url).header("x-wingman-admin", "1");
            req.send().await.unwrap()
        }
    };
    let url = format!("http://{host}/fixed?cc=max-age%3D60&p=1");
    let resp = purge(format!(
        "url={}",
        url.replace('%', "%25")
            .replace('&', "%26")
            .replace('?', "%3F")
    ))
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "{\"purged\":1}");
    let (n, _) = twice(&edge, &origin, "/fixed?cc=max-age%3D60&p=1", &[]).await;
    assert_eq!(n, 1, "purged URL fetched again, then cached");
    let resp = purge(format!("prefix=http://{host}/fixed")).await;
    assert_eq!(resp.status(), 200);
    let before = origin.requests();
    get(&edge, "/fixed?cc=max-age%3D60&p=2", &[])
        .await
        .bytes()
        .await
        .unwrap();
    assert_eq!(origin.requests(), before + 1);
    assert_eq!(purge("nothing=1".into()).await.status(), 400);
}

#[tokio::test]
async fn a_successful_post_invalidates_the_stored_response_for_its_uri() {
    let origin = Origin::start("a").await;
    let edge = Edge::start(&cached(&origin, "")).await;
    let path = "/fixed?cc=max-age%3D60";
    get(&edge, path, &[]).await.bytes().await.unwrap();
    get(&edge, path, &[]).await.bytes().await.unwrap();
    assert_eq!(origin.requests(), 1);
    let post = client()
        .post(edge.url(path))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(post.status(), 200);
    post.bytes().await.unwrap();
    wait_until(Duration::from_secs(5), "invalidation", || async {
        edge.metric("wingman_edge_cache_purges_total{cause=\"invalidation\"}")
            .await
            .is_some()
    })
    .await;
    let after = get(&edge, path, &[]).await;
    assert!(!status_of(&after).contains("hit"), "{}", status_of(&after));
}

#[tokio::test]
async fn an_age_from_upstream_shortens_the_freshness() {
    let origin = Origin::start("a").await;
    let edge = Edge::start(&cached(&origin, "")).await;
    get(&edge, "/fixed?cc=max-age%3D60&age=50", &[])
        .await
        .bytes()
        .await
        .unwrap();
    let hit = get(&edge, "/fixed?cc=max-age%3D60&age=50", &[]).await;
    let cs = status_of(&hit);
    let ttl: i64 = cs
        .split("ttl=")
        .nth(1)
        .and_then(|t| t.split(';').next())
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no ttl in {cs}"));
    assert!((8..=10).contains(&ttl), "ttl {ttl}");
    let age: u64 = hit.headers()["age"].to_str().unwrap().parse().unwrap();
    assert!(age >= 50, "age {age}");
}

#[tokio::test]
async fn bypass_rules_skip_the_cache() {
    let origin = Origin::start("a").await;
    let edge = Edge::start(&cached(&origin, "bypass_cookies = [\"sessionid\"]")).await;
    let (n, cs) = twice(
        &edge,
        &origin,
        "/fixed?cc=max-age%3D60",
        &[("cookie", "sessionid=1")],
    )
    .await;
    assert_eq!(n, 2);
    assert!(cs.contains("fwd=bypass"), "{cs}");
}

#[tokio::test]
async fn a_response_cut_off_mid_body_is_not_stored() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let served = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = served.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncache-control: max-age=60\r\ncontent-length: 1000\r\ncontent-type: text/plain\r\n\r\nonly ten!!")
                    .await;
                // reset: dropped mid-body
            });
        }
    });
    let body = format!(
        r#"
[[upstreams]]
name = "app"
servers = [{{ address = "{addr}" }}]
[[routes]]
name = "all"
upstream = "app"
[routes.cache]
enabled = true
[routes.buffering]
response = false
"#
    );
    let edge = Edge::start(&body).await;
    for _ in 0..2 {
        // either a clean 502 (nothing was sent yet) or a cut connection: never a
        // complete-looking 200
        if let Ok(r) = client().get(edge.url("/cut")).send().await {
            let status = r.status();
            let body = r.bytes().await;
            assert!(
                status != 200 || body.is_err(),
                "a cut-off body looked complete: {status} {body:?}"
            );
        }
    }
    assert_eq!(
        served.load(Ordering::SeqCst),
        2,
        "the cut-off response was served from cache"
    );
}

#[tokio::test]
async fn the_disk_tier_serves_a_stored_response_after_a_restart() {
    let origin = Origin::start("a").await;
    let disk = tempfile::tempdir().unwrap();
    let body = format!(
        "{}\n[cache]\ndisk_dir = \"{}\"\n",
        cached(&origin, ""),
        disk.path().display()
    );
    let path = "/fixed?cc=max-age%3D300";
    // the key has the Host: keep it the same across the two edges' ports
    let host = [("host", "chat.example")];
    {
        let edge = Edge::start(&body).await;
        get(&edge, path, &host).await.bytes().await.unwrap();
        assert_eq!(origin.requests(), 1);
        let edge_ref = &edge;
        wait_until(Duration::from_secs(10), "object on disk", || async move {
            edge_ref
                .metric("wingman_edge_cache_objects")
                .await
                .unwrap_or(0.0)
                >= 2.0
        })
        .await;
    } // stopped
    let edge = Edge::start(&body).await;
    let resp = get(&edge, path, &host).await;
    assert!(status_of(&resp).contains("hit"), "{}", status_of(&resp));
    assert_eq!(resp.bytes().await.unwrap().len(), 4096);
    assert_eq!(origin.requests(), 1, "served from disk after the restart");
    edge.wait_metric("wingman_edge_cache_lookups_total{result=\"hit\"}", 1.0)
        .await;
    let objects = edge
        .metric("wingman_edge_cache_objects")
        .await
        .unwrap_or(0.0);
    assert!(objects >= 1.0, "objects {objects}");
}

/// RFC 9111 §1.2.2: a `max-age`/`s-maxage` (or `Age`) too large to represent is
/// taken as 2^31 seconds. A value near 2^63 once overflowed the lifetime
/// arithmetic and panicked the worker; now it is stored and hit like any other.
#[tokio::test]
async fn a_max_age_near_2_pow_63_is_clamped_and_cached_without_a_panic() {
    let origin = Origin::start("a").await;
    let edge = Edge::start(&cached(&origin, "")).await;
    for (i, cc) in [
        "max-age%3D9223372036854775807",
        "s-maxage%3D99999999999999999999999",
        "max-age%3D18446744073709551615",
    ]
    .iter()
    .enumerate()
    {
        let path = format!("/fixed?cc={cc}&n={i}");
        let (n, cs) = twice(&edge, &origin, &path, &[]).await;
        assert_eq!(n, 1, "{cc}: stored once, then hit ({cs})");
        assert!(cs.contains("hit"), "{cc}: {cs}");
    }
    let resp = get(&edge, "/fixed?cc=max-age%3D60", &[]).await;
    assert_eq!(resp.status(), 200, "the edge still serves");
}

/// The invalidation after an unsafe method (RFC 9111 §4.4) and an exact purge reach
/// every stored variant of the URI, also on a route whose key adds headers and
/// cookies and drops ignored query parameters: both derive from the one key
/// function.
#[tokio::test]
async fn invalidation_and_exact_purge_reach_variants_keyed_by_headers_cookies_and_query() {
    let origin = Origin::start("a").await;
    let edge = Edge::start(&cached(
        &origin,
        "key_headers = [\"X-Tenant\"]\nkey_cookies = [\"lang\"]\nignore_query_params = [\"utm\"]",
    ))
    .await;
    let path = "/fixed?cc=max-age%3D60";
    let variants: [&[(&str, &str)]; 3] = [
        &[("x-tenant", "t1"), ("cookie", "lang=de")],
        &[("x-tenant", "t2")],
        &[],
    ];
    let fill = || async {
        for v in variants {
            get(&edge, &format!("{path}&utm=x"), v)
                .await
                .bytes()
                .await
                .unwrap();
        }
    };
    let all_hits = || async {
        let mut hits = 0;
        for v in variants {
            let r = get(&edge, path, v).await;
            hits += usize::from(status_of(&r).contains("hit"));
            r.bytes().await.unwrap();
        }
        hits
    };
    fill().await;
    assert_eq!(all_hits().await, 3, "each variant is stored (utm ignored)");

    // a POST from tenant t1 invalidates every tenant's copy of the URI
    let post = client()
        .post(edge.url(&format!("{path}&utm=y")))
        .header("x-tenant", "t1")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(post.status(), 200);
    post.bytes().await.unwrap();
    wait_until(
        Duration::from_secs(5),
        "invalidation of all variants",
        || async {
            edge.metric("wingman_edge_cache_purges_total{cause=\"invalidation\"}")
                .await
                .unwrap_or(0.0)
                >= 3.0
        },
    )
    .await;
    assert_eq!(all_hits().await, 0, "no variant survives the POST");

    // an exact purge by URL (with an ignored parameter) does the same
    fill().await;
    assert_eq!(all_hits().await, 3);
    let url = format!("http://127.0.0.1:{}{path}&utm=z", edge.port);
    let q = url
        .replace('%', "%25")
        .replace('&', "%26")
        .replace('?', "%3F");
    let resp = client()
        .post(edge.admin_url(&format!("/cache/purge?url={q}")))
        .header("x-wingman-admin", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "{\"purged\":3}");
    assert_eq!(all_hits().await, 0, "no variant survives the purge");
}

/// The cache key's host is normalized as routing normalizes it: case, port and a
/// trailing dot name the same stored response.
#[tokio::test]
async fn host_case_port_and_trailing_dot_share_one_cache_entry() {
    let origin = Origin::start("a").await;
    let edge = Edge::start(&cached(&origin, "")).await;
    let path = "/fixed?cc=max-age%3D60";
    let first = get(&edge, path, &[("host", "chat.example")]).await;
    first.bytes().await.unwrap();
    for host in [
        "CHAT.example",
        "chat.example:8080",
        "chat.example.",
        "Chat.Example.:80",
    ] {
        let r = get(&edge, path, &[("host", host)]).await;
        assert!(status_of(&r).contains("hit"), "{host}: {}", status_of(&r));
        r.bytes().await.unwrap();
    }
    assert_eq!(origin.requests(), 1);
}
