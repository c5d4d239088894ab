//! Sessions end: logout revokes the token on the server (one session, or every session
//! of the user), expired and revoked tokens are refused at once although lookups are
//! cached (on every instance), expired sessions are pruned, a WebSocket ends with its
//! session, and the WebSocket never takes the token from its URL.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures::StreamExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message as WsMsg;
use wingman_app::{EventBus, InProcessBus, Options};

async fn me(app: &TestApp, token: &str) -> u16 {
    app.call("GET", "/api/me", Some(token), None).await.0
}

/// Polls `/api/me` until it answers `want`; panics after `within`.
async fn me_becomes(app: &TestApp, token: &str, want: u16, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let got = me(app, token).await;
        if got == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "/api/me still answers {got}, not {want}, after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens `/ws` with the token in `Sec-WebSocket-Protocol` (as the web page does).
async fn ws_with_subprotocol(app: &TestApp, token: &str) -> (Socket, Option<String>) {
    let mut req = format!("{}/ws", app.ws_base).into_client_request().expect("request");
    req.headers_mut().insert(
        "sec-websocket-protocol",
        HeaderValue::from_str(&format!("wingman, wingman.token.{token}")).expect("header"),
    );
    let (ws, resp) = tokio_tungstenite::connect_async(req).await.expect("ws connect");
    let chosen = resp
        .headers()
        .get("sec-websocket-protocol")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    (ws, chosen)
}

/// Reads until the server closes the socket; returns the close code (bounded).
async fn close_code(ws: &mut Socket, within: Duration) -> u16 {
    tokio::time::timeout(within, async {
        while let Some(frame) = ws.next().await {
            match frame {
                Ok(WsMsg::Close(Some(c))) => return u16::from(c.code),
                Ok(WsMsg::Close(None)) => return 1005,
                Ok(_) => continue,
                Err(e) => panic!("socket failed before a close frame: {e}"),
            }
        }
        panic!("socket ended without a close frame");
    })
    .await
    .expect("the server closes the socket in time")
}

async fn start_sqlite(tweak: impl FnOnce(&mut wingman_app::Settings)) -> (TestApp, TestDb) {
    let db = TestDb::new(Backend::Sqlite).await;
    let mut settings = test_settings(&db.url);
    tweak(&mut settings);
    (TestApp::start(settings, Options::default()).await, db)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logout_revokes_that_token_at_once_and_only_that_one() {
    let (app, db) = start_sqlite(|_| {}).await;
    let (first, _) = app.register("leaver").await;
    let second = app.login("leaver").await;
    assert_eq!(me(&app, &first).await, 200); // cached now
    let (s, v) = app.call("POST", "/api/logout", Some(&first), None).await;
    assert_eq!(s, 204, "{v}");
    assert_eq!(me(&app, &first).await, 401, "a logged-out token still works");
    assert_eq!(me(&app, &second).await, 200, "logout ended another session too");
    let (s, _) = app.call("POST", "/api/logout", Some(&first), None).await;
    assert_eq!(s, 401, "a second logout with the same token");
    app.stop().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logout_all_revokes_every_session_of_the_user() {
    let (app, db) = start_sqlite(|_| {}).await;
    let (first, _) = app.register("everywhere").await;
    let others = [app.login("everywhere").await, app.login("everywhere").await];
    let (bystander, _) = app.register("bystander").await;
    for t in others.iter().chain([&first, &bystander]) {
        assert_eq!(me(&app, t).await, 200);
    }
    let (s, v) = app.call("POST", "/api/logout?all=1", Some(&first), None).await;
    assert_eq!(s, 204, "{v}");
    for t in others.iter().chain([&first]) {
        assert_eq!(me(&app, t).await, 401, "a session survived logout?all=1");
    }
    assert_eq!(me(&app, &bystander).await, 200, "another user's session ended");
    let (s, v) = app.call("POST", "/api/logout?all=maybe", Some(&bystander), None).await;
    assert_eq!(s, 400, "{v}");
    app.stop().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_is_refused_at_once_although_lookups_are_cached() {
    let (app, db) = start_sqlite(|s| {
        s.auth.token_ttl = Duration::from_secs(1);
        s.cache.auth_ttl = Duration::from_secs(600);
    })
    .await;
    let (token, _) = app.register("shortlived").await;
    assert_eq!(me(&app, &token).await, 200);
    // the token expires 1 s after it was issued; the cached lookup lives 10 min
    me_becomes(&app, &token, 401, Duration::from_secs(3)).await;
    app.stop().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_sessions_are_pruned() {
    let (app, db) = start_sqlite(|s| {
        s.auth.token_ttl = Duration::from_secs(1);
        s.auth.session_prune_interval = Duration::from_millis(200);
    })
    .await;
    let (_token, _) = app.register("pruned").await;
    let pool = sqlx::SqlitePool::connect(&db.url).await.expect("open");
    let count = || async {
        let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM sessions")
            .fetch_one(&pool)
            .await
            .expect("count");
        n
    };
    assert_eq!(count().await, 1);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while count().await > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the expired session is still stored"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    pool.close().await;
    app.stop().await;
    db.drop_db().await;
}

/// A logout on A is honoured by B, which had the token's lookup cached, as soon as the
/// revocation reaches it over the bus (bounded here to 2 s; the cache lives 10 min).
async fn logout_reaches_the_other_instance(a: &TestApp, b: &TestApp) {
    let (token, _) = a.register("roamer").await;
    let other = a.login("roamer").await;
    assert_eq!(me(b, &token).await, 200);
    assert_eq!(me(b, &other).await, 200);
    let (s, _) = a.call("POST", "/api/logout", Some(&token), None).await;
    assert_eq!(s, 204);
    me_becomes(b, &token, 401, Duration::from_secs(2)).await;
    assert_eq!(me(b, &other).await, 200);
    let (s, _) = a.call("POST", "/api/logout?all=1", Some(&other), None).await;
    assert_eq!(s, 204);
    me_becomes(b, &other, 401, Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logout_on_one_instance_ends_the_session_on_another_in_process() {
    let db = TestDb::new(Backend::Sqlite).await;
    let bus: Arc<dyn EventBus> = Arc::new(InProcessBus::new());
    let mut settings = test_settings(&db.url);
    settings.cache.auth_ttl = Duration::from_secs(600);
    let start = |name: &str| {
        TestApp::start(
            settings.clone(),
            Options {
                bus: Some(bus.clone()),
                instance: Some(name.into()),
                ..Default::default()
            },
        )
    };
    let (a, b) = (start("a").await, start("b").await);
    logout_reaches_the_other_instance(&a, &b).await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logout_on_one_instance_ends_the_session_on_another_through_redis() {
    let db = TestDb::new(Backend::Postgres).await;
    let mut settings = test_settings(&db.url);
    settings.cache.auth_ttl = Duration::from_secs(600);
    settings.redis.url = redis_url();
    settings.redis.prefix = format!("{}:", unique("wmsess"));
    let a = TestApp::start(settings.clone(), Options::default()).await;
    let b = TestApp::start(settings, Options::default()).await;
    logout_reaches_the_other_instance(&a, &b).await;
    a.stop().await;
    b.stop().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_websocket_takes_its_token_from_the_subprotocol_never_the_url() {
    let (app, db) = start_sqlite(|_| {}).await;
    let (token, id) = app.register("socketeer").await;

    // in the URL (logged by every proxy on the way): refused
    let err = tokio_tungstenite::connect_async(format!("{}/ws?token={token}", app.ws_base))
        .await
        .expect_err("a token in the URL must be refused");
    assert!(err.to_string().contains("400"), "{err}");

    // in Sec-WebSocket-Protocol: accepted, and the server names the protocol it chose
    let (mut ws, chosen) = ws_with_subprotocol(&app, &token).await;
    assert_eq!(
        chosen.as_deref(),
        Some("wingman"),
        "RFC 6455: the server answers the chosen subprotocol"
    );
    let hello = loop {
        if let Some(Ok(WsMsg::Text(t))) = ws.next().await {
            break serde_json::from_str::<serde_json::Value>(t.as_str()).expect("json");
        }
    };
    assert_eq!(
        (hello["type"].as_str(), hello["user_id"].as_i64()),
        (Some("ready"), Some(id))
    );

    // a wrong token in the subprotocol: 401 before the upgrade
    let mut req = format!("{}/ws", app.ws_base).into_client_request().expect("request");
    req.headers_mut().insert(
        "sec-websocket-protocol",
        HeaderValue::from_static("wingman, wingman.token.bogus"),
    );
    let err = tokio_tungstenite::connect_async(req).await.expect_err("bogus token");
    assert!(err.to_string().contains("401"), "{err}");
    app.stop().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_ends_with_its_session() {
    let (app, db) = start_sqlite(|s| s.cache.auth_ttl = Duration::from_secs(600)).await;
    let (token, _) = app.register("hangup").await;
    let other = app.login("hangup").await;
    let (mut revoked, _) = ws_with_subprotocol(&app, &token).await;
    let (mut kept, _) = ws_with_subprotocol(&app, &other).await;
    let (s, _) = app.call("POST", "/api/logout", Some(&token), None).await;
    assert_eq!(s, 204);
    assert_eq!(close_code(&mut revoked, Duration::from_secs(5)).await, 4001);
    // the other session's socket stays open: it still answers a ping
    use futures::SinkExt;
    kept.send(WsMsg::Text(json!({"type": "ping"}).to_string().into()))
        .await
        .expect("send");
    let pong = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(frame)) = kept.next().await {
            if let WsMsg::Text(t) = frame {
                if t.as_str().contains("pong") {
                    return true;
                }
            }
        }
        false
    })
    .await
    .expect("pong in time");
    assert!(pong, "the other session's socket was closed");
    app.stop().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_ends_when_its_session_expires() {
    let (app, db) = start_sqlite(|s| s.auth.token_ttl = Duration::from_secs(1)).await;
    let (token, _) = app.register("expiring").await;
    let (mut ws, _) = ws_with_subprotocol(&app, &token).await;
    assert_eq!(close_code(&mut ws, Duration::from_secs(5)).await, 4001);
    app.stop().await;
    db.drop_db().await;
}

/// Round after round, a logout races 32 requests with the same (not yet cached) token:
/// once the logout has answered, no lookup that raced it may have been cached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_logout_racing_requests_leaves_no_cached_lookup_behind() {
    let (app, db) = start_sqlite(|s| s.cache.auth_ttl = Duration::from_secs(600)).await;
    app.register("racer").await;
    for round in 0..10 {
        let token = app.login("racer").await;
        let reads = futures::future::join_all((0..32).map(|_| me(&app, &token)));
        let logout = async {
            tokio::task::yield_now().await;
            app.call("POST", "/api/logout", Some(&token), None).await.0
        };
        let (statuses, out) = tokio::join!(reads, logout);
        assert_eq!(out, 204);
        assert!(statuses.iter().all(|s| *s == 200 || *s == 401), "{statuses:?}");
        assert_eq!(
            me(&app, &token).await,
            401,
            "round {round}: a raced lookup outlived the logout"
        );
    }
    app.stop().await;
    db.drop_db().await;
}
