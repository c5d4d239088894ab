//! Ownership under races: a conversation deleted while many reads of it are in flight
//! must leave nothing behind that lets its owner into the next conversation someone else
//! creates (an authorization decision cached by a read that raced the delete, plus an id
//! the database hands out again).

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;
use wingman_app::Options;

/// Round after round: alice creates a conversation and deletes it while 48 reads of it
/// (message pages and the conversation itself) are in flight; bob then creates a
/// conversation and writes into it. Alice must neither read bob's messages nor post into
/// his conversation through the id she held, and bob's conversation never gets it.
async fn a_raced_delete_never_lets_the_owner_into_the_next_conversation(app: &TestApp) {
    let (alice, _) = app.register("alice_race").await;
    let (bob, _) = app.register("bob_race").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    for round in 0..25 {
        if tokio::time::Instant::now() > deadline {
            break;
        }
        let old = app.new_conversation(&alice, &format!("alice {round}")).await;
        let reads = (0..48).map(|i| {
            let path = if i % 3 == 0 {
                format!("/api/conversations/{old}")
            } else {
                format!("/api/conversations/{old}/messages")
            };
            let alice = alice.clone();
            async move { app.call("GET", &path, Some(&alice), None).await.0 }
        });
        let delete = async {
            // let the first reads reach the database before the delete
            tokio::task::yield_now().await;
            app.call("DELETE", &format!("/api/conversations/{old}"), Some(&alice), None)
                .await
                .0
        };
        let (statuses, deleted) = tokio::join!(futures::future::join_all(reads), delete);
        assert_eq!(deleted, 204);
        assert!(statuses.iter().all(|s| *s == 200 || *s == 404), "{statuses:?}");

        // (an import: bob's conversation has a message without a post of his own)
        let (s, v) = app
            .call(
                "POST",
                "/api/conversations/import",
                Some(&bob),
                Some(json!({
                    "title": format!("bob {round}"),
                    "messages": [{ "role": "user", "content": format!("bob's secret {round}") }],
                })),
            )
            .await;
        assert_eq!(s, 201, "{v}");
        let new = v["conversation"]["id"].as_i64().expect("id");

        for target in [old, new] {
            let (s, v) = app.list_messages(&alice, target).await;
            assert_eq!(
                s, 404,
                "round {round}: alice reads conversation {target} (hers was {old}, bob's is {new}): {v}"
            );
            let (s, v) = app
                .call("GET", &format!("/api/conversations/{target}"), Some(&alice), None)
                .await;
            assert_eq!(
                s, 404,
                "round {round}: alice sees conversation {target} (hers was {old}, bob's is {new}): {v}"
            );
            let (s, v) = app
                .call(
                    "POST",
                    &format!("/api/conversations/{target}/messages"),
                    Some(&alice),
                    Some(json!({ "content": "alice was here" })),
                )
                .await;
            assert_eq!(
                s, 404,
                "round {round}: alice posts into conversation {target} (hers was {old}, bob's is {new}): {v}"
            );
        }
        let (_, v) = app.list_messages(&bob, new).await;
        let contents: Vec<&str> = v["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .filter_map(|m| m["content"].as_str())
            .collect();
        assert!(
            !contents.contains(&"alice was here"),
            "round {round}: alice's post landed in bob's conversation: {contents:?}"
        );
        assert_ne!(
            new, old,
            "round {round}: the deleted conversation's id was handed out again"
        );
    }
}

async fn run(backend: Backend, redis: bool) {
    let db = TestDb::new(backend).await;
    let mut settings = test_settings(&db.url);
    if redis {
        settings.redis.url = redis_url();
        settings.redis.prefix = format!("{}:", unique("wmown"));
    }
    let app = TestApp::start(settings, Options::default()).await;
    a_raced_delete_never_lets_the_owner_into_the_next_conversation(&app).await;
    app.stop().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_raced_delete_never_lets_the_owner_into_the_next_conversation() {
    run(Backend::Sqlite, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_with_redis_cache_a_raced_delete_never_lets_the_owner_into_the_next_conversation() {
    run(Backend::Sqlite, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_raced_delete_never_lets_the_owner_into_the_next_conversation() {
    run(Backend::Postgres, false).await;
}

/// The store itself refuses another user's conversation in every read and write of its
/// messages and exports (the ownership check is part of each statement).
async fn every_message_statement_checks_the_owner(backend: Backend) {
    use wingman_app::store::{self, Page};
    let db = TestDb::new(backend).await;
    let store = store::open(&test_settings(&db.url).database)
        .await
        .expect("open store")
        .store;
    let alice = store.create_user("alice_sql", "x", "Alice").await.expect("user").id;
    let bob = store.create_user("bob_sql", "x", "Bob").await.expect("user").id;
    let conv = store.create_conversation(alice, "hers").await.expect("conversation").id;
    let first = store
        .insert_message(alice, conv, "user", "alice's secret", None)
        .await
        .expect("insert")
        .expect("stored")
        .id;
    store
        .save_export(alice, conv, "{}")
        .await
        .expect("export")
        .expect("stored");
    let page = Page::After { after: 0, limit: 10 };

    assert_eq!(store.list_messages(bob, conv, page).await.expect("read"), None);
    let empty = store.create_conversation(bob, "empty").await.expect("conversation").id;
    assert_eq!(store.list_messages(bob, empty, page).await.expect("read"), Some(vec![]));
    for (role, reply_to) in [("user", None), ("assistant", Some(first))] {
        let stored = store
            .insert_message(bob, conv, role, "bob was here", reply_to)
            .await
            .expect("no error");
        assert_eq!(stored, None, "bob wrote into alice's conversation");
    }
    let with_job = store
        .insert_message_with_job(bob, conv, "user", "bob was here", "ai", Box::new(|_| Vec::new()))
        .await
        .expect("no error");
    assert_eq!(with_job, None, "bob posted into alice's conversation");
    let context = store.reply_context(bob, conv, first, 20).await.expect("read");
    assert!(
        context.history.is_empty(),
        "bob's job read alice's history: {:?}",
        context.history
    );
    assert!(store.save_export(bob, conv, "{}").await.expect("no error").is_none());
    assert!(store.latest_export(bob, conv).await.expect("read").is_none());

    // alice still has exactly her own
    let hers = store
        .list_messages(alice, conv, page)
        .await
        .expect("read")
        .expect("hers");
    let contents: Vec<&str> = hers.iter().map(|m| m.content.as_str()).collect();
    assert_eq!(contents, ["alice's secret"]);
    let context = store.reply_context(alice, conv, first, 20).await.expect("read");
    assert_eq!(context.history.len(), 1);
    assert!(store.latest_export(alice, conv).await.expect("read").is_some());
    store.close().await;
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_every_message_statement_checks_the_owner() {
    every_message_statement_checks_the_owner(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_every_message_statement_checks_the_owner() {
    every_message_statement_checks_the_owner(Backend::Postgres).await;
}

/// A database made before ids stopped being reused (the first two migrations only) is
/// migrated in place: rows, ids, sessions, the message counter and the cascades survive,
/// and from then on a deleted conversation's id is never handed out again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_an_existing_database_keeps_its_rows_and_stops_reusing_ids() {
    use sqlx::migrate::Migrator;
    use wingman_app::store::{self, Page};
    let db = TestDb::new(Backend::Sqlite).await;
    let old = tempfile::tempdir().expect("dir");
    let all = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations/sqlite");
    for name in ["20261127000001_init.sql", "20261127000002_message_counter_trigger.sql"] {
        std::fs::copy(all.join(name), old.path().join(name)).expect("copy migration");
    }
    {
        let opts: sqlx::sqlite::SqliteConnectOptions = db.url.parse().expect("url");
        let pool = sqlx::SqlitePool::connect_with(opts.create_if_missing(true).foreign_keys(true))
            .await
            .expect("open");
        Migrator::new(old.path())
            .await
            .expect("old migrations")
            .run(&pool)
            .await
            .expect("migrate");
        for sql in [
            "INSERT INTO users (username, password_hash, display_name, created_at) VALUES ('old_a', 'h', 'A', 1), ('old_b', 'h', 'B', 1)",
            "INSERT INTO sessions VALUES ('tokenhash', 1, 1, 9999999999999)",
            "INSERT INTO conversations (user_id, title, created_at, updated_at) VALUES (1, 'one', 1, 1), (2, 'two', 1, 1), (1, 'three', 1, 1)",
            "INSERT INTO messages (conversation_id, role, content, created_at) VALUES (1, 'user', 'hello', 2), (1, 'assistant', 'hi', 3), (2, 'user', 'yo', 4)",
            "INSERT INTO exports (conversation_id, body, created_at) VALUES (1, '{}', 5)",
        ] {
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&pool).await.expect(sql);
        }
        pool.close().await;
    }
    let store = store::open(&test_settings(&db.url).database)
        .await
        .expect("the migration runs on the old database")
        .store;
    let one = store.conversation(1, 1).await.expect("read").expect("kept");
    assert_eq!((one.title.as_str(), one.message_count), ("one", 2));
    assert_eq!(one.last_message_preview.as_deref(), Some("hi"));
    let page = Page::After { after: 0, limit: 10 };
    let messages = store.list_messages(1, 1, page).await.expect("read").expect("hers");
    assert_eq!(messages.iter().map(|m| m.id).collect::<Vec<_>>(), [1, 2]);
    assert!(store.latest_export(1, 1).await.expect("read").is_some());
    assert!(
        store.session_user("tokenhash", 0).await.expect("read").is_some(),
        "session kept"
    );
    // the counter trigger is back
    store
        .insert_message(2, 2, "user", "again", None)
        .await
        .expect("insert")
        .expect("stored");
    assert_eq!(
        store
            .conversation(2, 2)
            .await
            .expect("read")
            .expect("kept")
            .message_count,
        2
    );
    // ids: the newest conversation deleted, the next one gets a new id
    assert!(store.delete_conversation(1, 3).await.expect("delete"));
    let next = store.create_conversation(2, "next").await.expect("create").id;
    assert!(next > 3, "conversation id 3 was handed out again");
    // deletes still cascade to messages and exports
    assert!(store.delete_conversation(1, 1).await.expect("delete"));
    assert!(store.list_messages(1, 1, page).await.expect("read").is_none());
    store.close().await;
    // and a second start finds nothing left to migrate
    store::open(&test_settings(&db.url).database)
        .await
        .expect("reopen")
        .store
        .close()
        .await;
}
