//! Login: an unknown user name costs the same Argon2 work as a wrong password (no user
//! name oracle by timing), and failed logins are throttled per user name and per client
//! address (429 with Retry-After), also for logins sent in parallel.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use wingman_app::Options;

async fn attempt(app: &TestApp, name: &str, password: &str) -> (u16, Option<u64>) {
    let resp = app
        .http
        .post(app.url("/api/login"))
        .json(&json!({ "username": name, "password": password }))
        .send()
        .await
        .expect("login sent");
    let retry_after = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    (resp.status().as_u16(), retry_after)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_user_costs_the_same_argon2_work_as_a_wrong_password() {
    let db = TestDb::new(Backend::Sqlite).await;
    let mut settings = test_settings(&db.url);
    // the real cost (the tests' cheap hashing would hide the difference)
    let defaults = wingman_app::Settings::default();
    settings.auth.argon2_memory_kib = defaults.auth.argon2_memory_kib;
    settings.auth.argon2_iterations = defaults.auth.argon2_iterations;
    settings.auth.login_max_failures_per_user = 1000;
    settings.auth.login_max_failures_per_addr = 1000;
    let app = TestApp::start(settings, Options::default()).await;
    app.register("known").await;
    let (mut unknown, mut wrong) = (Vec::new(), Vec::new());
    for i in 0..7 {
        let started = Instant::now();
        assert_eq!(attempt(&app, &format!("nobody{i}"), "some password").await.0, 401);
        unknown.push(started.elapsed());
        let started = Instant::now();
        assert_eq!(attempt(&app, "known", "wrong password").await.0, 401);
        wrong.push(started.elapsed());
    }
    let (unknown, wrong) = (median(unknown), median(wrong));
    let ratio = unknown.as_secs_f64() / wrong.as_secs_f64();
    assert!(
        (0.6..=1.6).contains(&ratio),
        "unknown user {unknown:?} vs wrong password {wrong:?} (median of 7): the time tells whether a user exists"
    );
    app.stop().await;
    db.drop_db().await;
}

async fn start(per_user: u32, per_addr: u32) -> (TestApp, TestDb) {
    let db = TestDb::new(Backend::Sqlite).await;
    let mut settings = test_settings(&db.url);
    settings.auth.login_max_failures_per_user = per_user;
    settings.auth.login_max_failures_per_addr = per_addr;
    settings.auth.login_failure_window = Duration::from_secs(60);
    (TestApp::start(settings, Options::default()).await, db)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_are_throttled_per_user_name() {
    let (app, db) = start(3, 1000).await;
    app.register("target").await;
    app.register("neighbour").await;
    for name in ["target", "ghost"] {
        for _ in 0..3 {
            assert_eq!(attempt(&app, name, "wrong password").await.0, 401, "{name}");
        }
        // now even the right password waits: a guess that happens to be right must not
        // be told apart from the others
        let (status, retry_after) = attempt(&app, name, "correct horse battery").await;
        assert_eq!(status, 429, "{name}: the 4th attempt within the window");
        let retry_after = retry_after.expect("Retry-After");
        assert!((1..=60).contains(&retry_after), "Retry-After {retry_after}");
    }
    // other names from the same address are not affected
    assert_eq!(attempt(&app, "neighbour", "correct horse battery").await.0, 200);
    app.stop().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_are_throttled_per_client_address() {
    let (app, db) = start(1000, 5).await;
    app.register("someone").await;
    for i in 0..5 {
        assert_eq!(attempt(&app, &format!("guess{i}"), "wrong password").await.0, 401);
    }
    let (status, retry_after) = attempt(&app, "guess_next", "wrong password").await;
    assert_eq!(status, 429, "the 6th failure from one address within the window");
    assert!(retry_after.is_some_and(|s| (1..=60).contains(&s)), "{retry_after:?}");
    let (status, _) = attempt(&app, "someone", "correct horse battery").await;
    assert_eq!(status, 429, "the address is throttled for every name");
    app.stop().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_guesses_get_no_more_tries_than_the_limit() {
    let (app, db) = start(3, 1000).await;
    app.register("popular").await;
    let statuses = futures::future::join_all((0..24).map(|i| {
        let app = &app;
        async move { attempt(app, "popular", &format!("guess number {i}")).await.0 }
    }))
    .await;
    let verified = statuses.iter().filter(|s| **s == 401).count();
    let throttled = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!((verified, throttled), (3, 21), "{statuses:?}");
    app.stop().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successful_login_clears_its_name_s_failures() {
    let (app, db) = start(3, 1000).await;
    app.register("forgetful").await;
    for _ in 0..2 {
        assert_eq!(attempt(&app, "forgetful", "wrong password").await.0, 401);
    }
    assert_eq!(attempt(&app, "forgetful", "correct horse battery").await.0, 200);
    for _ in 0..3 {
        assert_eq!(attempt(&app, "forgetful", "wrong password").await.0, 401);
    }
    assert_eq!(attempt(&app, "forgetful", "wrong password").await.0, 429);
    app.stop().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_logins_from_one_address_are_not_refused_for_being_in_flight() {
    // (every client behind the edge shares the edge's address)
    let (app, db) = start(3, 5).await;
    let names: Vec<String> = (0..16).map(|i| format!("crowd{i}")).collect();
    for n in &names {
        app.register(n).await;
    }
    let statuses = futures::future::join_all(names.iter().map(|n| {
        let app = &app;
        async move { attempt(app, n, "correct horse battery").await.0 }
    }))
    .await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    app.stop().await;
    db.drop_db().await;
}
